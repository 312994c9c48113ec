"""``benchmarks/gpu_check.py`` (``make gpu-check``) rehearsed on CPU: its dry run goes through
every section (Triton kernels in the interpreter, attention backends, the packed model, a
``tune run`` of the recipe, the TRL benchmark's skip) and writes its report; a mismatch makes it
exit 1 after the remaining sections have run; without CUDA it refuses to run for real."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402

SECTIONS = ["head_kernel", "layer_ops", "attention", "smollm2_packed", "recipe", "bench_trl"]


def _report(out_dir: Path) -> dict:
    (path,) = out_dir.glob("gpu_check_dryrun_*.json")
    assert path.with_suffix(".md").is_file()
    return json.loads(path.read_text())


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_dry_run_runs_every_section_and_writes_the_report(tmp_path):
    assert gpu_check.main(["--dry-run", "--out-dir", str(tmp_path)]) == 0
    report = _report(tmp_path)
    assert report["dry_run"] and list(report["sections"]) == SECTIONS
    assert report["result"] == "PASS" and report["failed"] == []
    by_name = {(c["section"], c["name"]): c for s in report["sections"].values() for c in s["cases"]}
    for case in by_name.values():
        assert case["status"] in ("pass", "skip"), case
        if case["status"] == "pass" and case["section"] != "recipe":
            assert case["max_err"] <= case["tol"], case
        if case["status"] == "skip":
            assert case["detail"], case  # a skip always says why
    # the numeric sections compared something on CPU
    for section in ("head_kernel", "layer_ops", "attention", "smollm2_packed"):
        assert any(c["status"] == "pass" for (s, _), c in by_name.items() if s == section), section
    assert by_name[("head_kernel", "T*D>2^31")]["status"] == "skip"
    # the recipe ran (or, on a branch where its attention_backend key is broken, said so)
    tune = by_name[("recipe", "tune_run_sdpa_segments")]
    assert tune["status"] == "pass" or "attention_backend" in tune["detail"], tune
    assert by_name[("bench_trl", "quick_cuda")]["status"] == "skip"


def test_a_mismatch_fails_loudly_after_every_section(tmp_path, monkeypatch, capsys):
    """An RMSNorm kernel that is 1% off fails its cases; the attention section after it still
    runs; the exit status is 1 and the failures are named."""
    from fastrm.ops import rms_norm_triton

    real = rms_norm_triton.rms_norm_forward_triton

    def off_by_one_percent(x, weight, eps, block_d=None):
        y, rstd = real(x, weight, eps, block_d)
        return y * 1.01, rstd

    monkeypatch.setattr(rms_norm_triton, "rms_norm_forward_triton", off_by_one_percent)
    code = gpu_check.main(["--dry-run", "--out-dir", str(tmp_path), "--sections",
                           "layer_ops,attention"])
    assert code == 1
    report = _report(tmp_path)
    assert report["result"] == "FAIL"
    assert report["failed"] and all(f.startswith("layer_ops/rms_norm") for f in report["failed"])
    assert any(c["status"] == "pass" for c in report["sections"]["attention"]["cases"])
    assert "GPU CHECK FAILED" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_only_the_dry_run_runs(tmp_path, capsys):
    assert gpu_check.main(["--out-dir", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--out-dir", str(tmp_path), "--sections", "head"])
