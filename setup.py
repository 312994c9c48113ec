"""Build script: drives CMakeLists.txt to build the native CPU extension ``fastrm._C``.

The extension is optional. It is skipped (with a warning) when CMake, a compiler or torch is
missing at build time, or when ``FASTRM_NO_NATIVE=1``; ``FASTRM_REQUIRE_NATIVE=1`` turns any build
failure into an error (CI uses it). Install with ``pip install --no-build-isolation -e .`` so the
extension is compiled against the torch already installed (build isolation would fetch another).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self) -> None:
        for ext in self.extensions:
            self.build_cmake(ext)

    def build_cmake(self, ext: Extension) -> None:
        required = os.environ.get("FASTRM_REQUIRE_NATIVE") == "1"
        if os.environ.get("FASTRM_NO_NATIVE") == "1":
            print("fastrm: FASTRM_NO_NATIVE=1, skipping the native extension")
            return
        try:
            self._cmake(ext)
        except Exception as err:  # the extension is optional: torch fallbacks cover every op
            if required:
                raise
            print(f"fastrm: WARNING: native extension not built ({err}); using torch fallbacks",
                  file=sys.stderr)

    def _cmake(self, ext: Extension) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found on PATH")
        import torch  # noqa: F401  (the extension is compiled against this torch)
        import torch.utils

        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        stem = out_path.name[: -len(".so")] if out_path.name.endswith(".so") else out_path.stem
        args = [
            cmake, str(ROOT), "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_path.parent}",
            f"-DFASTRM_OUTPUT_NAME={stem}",
            f"-DPython3_EXECUTABLE={sys.executable}",
        ]
        subprocess.run(args, cwd=build_dir, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)
        if not out_path.exists():
            raise RuntimeError(f"CMake finished but {out_path} was not produced")


setup(ext_modules=[CMakeExtension("fastrm._C")], cmdclass={"build_ext": CMakeBuild})
