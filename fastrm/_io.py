"""Atomic file writes: a reader (or a resumed run after a crash) sees the old file or the new
one, never half of one."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; when the block ends without an error, the
    temporary file replaces ``path`` (``os.replace``, atomic on POSIX); on an error it is
    removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_symlink(target: str, link: str | os.PathLike) -> None:
    """Points ``link`` at ``target`` (a relative name is resolved from ``link``'s folder),
    replacing an existing link atomically."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)
