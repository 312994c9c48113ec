"""Pair embeddings: in memory (:class:`PairEmbeddings`) or sharded on disk (:class:`EmbeddingStore`).

Both hold, for ``N`` preference pairs, ``chosen [N, D]`` and ``rejected [N, D]``: the backbone's
hidden state at the reward position of each response. Both expose the same reading interface,
which :mod:`.pca`, :mod:`.heads` and :mod:`.adapt` consume:

* ``num_pairs``, ``dim``;
* ``iter_pairs(chunk_size) -> Iterator[(chosen [n, D], rejected [n, D])]``;
* ``iter_diffs(chunk_size) -> Iterator[z [n, D]]`` with ``z = chosen - rejected``;
* ``load() -> PairEmbeddings`` (everything in memory).

The store writes safetensors shards of at most ``shard_size`` pairs, so a dataset larger than
memory is embedded and decomposed without ever being held whole: the chunked PCA solvers stream
the shards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

STORE_FORMAT = "fastrm.decompose.pairs/v1"


@dataclass
class PairEmbeddings:
    """``chosen [N, D]`` and ``rejected [N, D]`` embeddings of ``N`` pairs, in memory."""

    chosen: torch.Tensor
    rejected: torch.Tensor

    def __post_init__(self) -> None:
        if self.chosen.dim() != 2 or self.chosen.shape != self.rejected.shape:
            raise ValueError(
                f"chosen {tuple(self.chosen.shape)} and rejected {tuple(self.rejected.shape)} "
                "must both be [N, D]"
            )

    @property
    def num_pairs(self) -> int:
        return int(self.chosen.shape[0])

    @property
    def dim(self) -> int:
        return int(self.chosen.shape[1])

    def __len__(self) -> int:
        return self.num_pairs

    def diffs(self) -> torch.Tensor:
        """``[N, D]`` ``chosen - rejected``."""
        return self.chosen - self.rejected

    def iter_pairs(self, chunk_size: int = 4096) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.num_pairs, chunk_size):
            yield self.chosen[start : start + chunk_size], self.rejected[start : start + chunk_size]

    def iter_diffs(self, chunk_size: int = 4096) -> Iterator[torch.Tensor]:
        for c, r in self.iter_pairs(chunk_size):
            yield c - r

    def load(self) -> "PairEmbeddings":
        return self

    def select(self, index: torch.Tensor | Sequence[int]) -> "PairEmbeddings":
        """The pairs at ``index`` (a subset for few-shot adaptation or a split)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return PairEmbeddings(self.chosen[idx], self.rejected[idx])


class EmbeddingStore:
    """Pair embeddings in safetensors shards under a directory.

    Layout: ``<path>/meta.json`` (format, dim, dtype, num_pairs, shard sizes, free-form
    ``info``) and ``<path>/shard_00000.safetensors`` ... each with ``chosen`` and ``rejected``
    ``[n_s, D]`` tensors. Writing: :meth:`create`, :meth:`append` (buffers up to
    ``shard_size`` pairs), :meth:`close`. Reading: :meth:`open`, then the interface of the
    module docstring.
    """

    def __init__(self, path: str | Path, meta: dict) -> None:
        self.path = Path(path)
        self.meta = meta
        self._buffer_c: list[torch.Tensor] = []
        self._buffer_r: list[torch.Tensor] = []
        self._buffered = 0
        self._writable = False

    # -- writing -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, dim: int, shard_size: int = 65536,
               dtype: torch.dtype = torch.float32, info: Optional[dict] = None,
               overwrite: bool = False) -> "EmbeddingStore":
        """A new empty store at ``path`` for ``D = dim`` embeddings stored as ``dtype``."""
        path = Path(path)
        if (path / "meta.json").exists() and not overwrite:
            raise ValueError(f"an embedding store already exists at {path}; pass overwrite=True "
                             "or choose another output_dir")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        path.mkdir(parents=True, exist_ok=True)
        for old in path.glob("shard_*.safetensors"):
            old.unlink()
        meta = {"format": STORE_FORMAT, "dim": int(dim), "dtype": str(dtype).replace("torch.", ""),
                "num_pairs": 0, "shards": [], "shard_size": int(shard_size), "complete": False,
                "info": info or {}}
        store = cls(path, meta)
        store._writable = True
        store._write_meta()
        return store

    def append(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """Adds ``chosen [n, D]`` and ``rejected [n, D]`` (moved to CPU, cast to the store dtype)."""
        if not self._writable:
            raise ValueError(f"store {self.path} was opened for reading; use EmbeddingStore.create")
        d = self.dim
        if chosen.dim() != 2 or chosen.shape != rejected.shape or chosen.shape[1] != d:
            raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} "
                             f"must both be [n, {d}]")
        dtype = getattr(torch, self.meta["dtype"])
        self._buffer_c.append(chosen.detach().to("cpu", dtype))
        self._buffer_r.append(rejected.detach().to("cpu", dtype))
        self._buffered += chosen.shape[0]
        while self._buffered >= self.meta["shard_size"]:
            self._flush(self.meta["shard_size"])

    def _flush(self, n: int) -> None:
        c, r = torch.cat(self._buffer_c), torch.cat(self._buffer_r)
        name = f"shard_{len(self.meta['shards']):05d}.safetensors"
        save_file({"chosen": c[:n].contiguous(), "rejected": r[:n].contiguous()}, str(self.path / name))
        self.meta["shards"].append({"file": name, "num_pairs": int(n)})
        self.meta["num_pairs"] += int(n)
        self._buffer_c, self._buffer_r = ([c[n:]], [r[n:]]) if c.shape[0] > n else ([], [])
        self._buffered = c.shape[0] - n
        self._write_meta()

    def close(self) -> "EmbeddingStore":
        """Writes the last partial shard; the store is then read-only."""
        if self._writable and self._buffered:
            self._flush(self._buffered)
        self._writable = False
        self.meta["complete"] = True
        self._write_meta()
        return self

    def _write_meta(self) -> None:
        (self.path / "meta.json").write_text(json.dumps(self.meta, indent=1))

    # -- reading -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> "EmbeddingStore":
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.exists():
            raise ValueError(f"no embedding store at {path} (meta.json missing)")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != STORE_FORMAT:
            raise ValueError(f"{meta_file} has format {meta.get('format')!r}, expected {STORE_FORMAT}")
        return cls(path, meta)

    @property
    def num_pairs(self) -> int:
        return int(self.meta["num_pairs"]) + (self._buffered if self._writable else 0)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def complete(self) -> bool:
        """True once :meth:`close` ran (a store left by an interrupted run is incomplete)."""
        return bool(self.meta.get("complete", False))

    @property
    def info(self) -> dict:
        return self.meta["info"]

    def __len__(self) -> int:
        return self.num_pairs

    def iter_pairs(self, chunk_size: int = 4096) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._writable:
            raise ValueError(f"close() the store {self.path} before reading it")
        for shard in self.meta["shards"]:
            t = load_file(str(self.path / shard["file"]))
            c, r = t["chosen"], t["rejected"]
            for start in range(0, c.shape[0], chunk_size):
                yield c[start : start + chunk_size], r[start : start + chunk_size]

    def iter_diffs(self, chunk_size: int = 4096) -> Iterator[torch.Tensor]:
        for c, r in self.iter_pairs(chunk_size):
            yield c.float() - r.float()

    def load(self) -> PairEmbeddings:
        """All pairs in memory (float32)."""
        cs, rs = [], []
        for c, r in self.iter_pairs(1 << 30):
            cs.append(c.float())
            rs.append(r.float())
        if not cs:
            empty = torch.zeros(0, self.dim)
            return PairEmbeddings(empty, empty.clone())
        return PairEmbeddings(torch.cat(cs), torch.cat(rs))
