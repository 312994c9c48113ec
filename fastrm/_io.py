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


def partial_dir(path: str | os.PathLike) -> Path:
    """The folder a directory ``path`` is built in before :func:`commit_dir` renames it into
    place (``.<name>.partial`` beside it; the same name on every rank of a run). A stale one
    left by a crashed save is removed."""
    import shutil

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Moves the complete folder ``tmp`` to ``path``. An existing ``path`` is first moved aside
    and removed only after the rename, so at every moment either the old or the new directory
    is complete at ``path`` (except for the instant between the two renames, when a reader
    finds no directory rather than half of one)."""
    import shutil

    tmp, path = Path(tmp), Path(path)
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty folder beside ``path``; when the block ends without an error it becomes
    ``path`` (:func:`commit_dir`), on an error it is removed and ``path`` is left as it was."""
    import shutil

    tmp = partial_dir(path)
    try:
        yield tmp
        commit_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
