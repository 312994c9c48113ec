"""Packed, prompt-once reward scoring: :class:`RewardScorer`.

Rows (:mod:`fastrm.inference.rows`) are tokenized into one :class:`PreferenceGroup` per row and
laid out by the training collator (:func:`fastrm.data.batch.collate_packed`): a prompt with
``K >= 2`` responses is one segment group ``[prompt][r_1]..[r_K]`` whose prompt tokens are
computed once and attended to by every response; single responses are plain segments. Groups are
planned into flat rows of at most ``batch_tokens`` tokens by the training planner
(:func:`fastrm.data.planner.plan_rows`, best-fit decreasing): no padding, no backward, the
forward runs under :func:`torch.inference_mode` and the head reads one hidden state per
response.

A best-of-N group that does not fit ``batch_tokens`` is split into subgroups of consecutive
responses, each with the prompt (computed once per subgroup). A single ``prompt + response``
longer than ``batch_tokens`` or than the model's RoPE range (``decoder.max_seq_len``) is an error
naming the row; nothing is truncated silently.

Rows are scored chunk after chunk (:meth:`RewardScorer.iter_score`), each chunk packed on its
own and yielded in input order, so the caller can write results incrementally
(:func:`fastrm.inference.store.score_file` journals them and resumes after a crash).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import torch

from fastrm.data.batch import collate_packed, shares_prefix
from fastrm.data.formats import check_text
from fastrm.data.group import PreferenceGroup
from fastrm.data.planner import plan_rows
from fastrm.inference.rows import parse_row, text_tokens, tokenize_row

__all__ = ["RewardScorer"]


class RewardScorer:
    """Scores rows, conversations or rendered texts with a :class:`~fastrm.models.RewardModel`.

    Args:
        model: the reward model (any torchtune decoder inside; its packed varlen attention is
            used). It is put in eval mode.
        tokenizer: the model's tokenizer (``tokenize_messages``; an
            :class:`~fastrm.models.tokenizer.HFChatTokenizer` for an HF checkpoint).
        batch_tokens: tokens per packed forward (the flat row ``[1, T]``, ``T <= batch_tokens``).
        normalize: return ``(r - reward_mean) / reward_std`` (the statistics stored with the
            checkpoint); an error when they are not given.
        reward_mean, reward_std: the normalization statistics.
        device: where the batches go (default: the model's device).
        chunk_tokens: tokens tokenized and packed together before a chunk of results is yielded
            (default ``4 * batch_tokens``): larger chunks pack a little fuller, smaller ones
            write results sooner.

    Example::

        scorer = RewardScorer.from_checkpoint("out/epoch_0")
        scorer.score([{"prompt": "2+2?", "responses": ["4", "5"]}])
        # [{"prompt": "2+2?", "responses": ["4", "5"], "rewards": [1.3, -0.2]}]
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        batch_tokens: int = 8192,
        normalize: bool = False,
        reward_mean: Optional[float] = None,
        reward_std: Optional[float] = None,
        device: Optional[torch.device | str] = None,
        chunk_tokens: Optional[int] = None,
    ) -> None:
        if batch_tokens < 2:
            raise ValueError(f"batch_tokens must be >= 2, got {batch_tokens}")
        if normalize:
            if reward_mean is None or reward_std is None:
                raise ValueError("normalize=True needs reward_mean and reward_std (the checkpoint "
                                 "stores none: train with reward statistics, or drop --normalize)")
            if not (math.isfinite(reward_std) and reward_std > 0 and math.isfinite(reward_mean)):
                raise ValueError(f"normalize=True needs a finite mean and a positive std, got "
                                 f"mean={reward_mean}, std={reward_std}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_tokens = int(batch_tokens)
        self.chunk_tokens = int(chunk_tokens or 4 * self.batch_tokens)
        self.normalize = bool(normalize)
        self.reward_mean, self.reward_std = reward_mean, reward_std
        if device is None:
            device = next(model.parameters()).device
        self.device = torch.device(device)
        decoder = getattr(model, "decoder", None)
        #: longest sequence the model's RoPE cache covers
        self.max_seq_len: Optional[int] = getattr(decoder, "max_seq_len", None)
        #: counters: rows, responses, forwards, tokens computed, prompt tokens not recomputed
        self.stats = {"rows": 0, "responses": 0, "forwards": 0, "tokens": 0,
                      "prompt_tokens_saved": 0}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, path: str, *, dtype: str = "float32", device: str = "cpu",
                        attention_backend: Optional[str] = None, **kwargs: Any) -> "RewardScorer":
        """A scorer over an HF reward-model directory (:func:`fastrm.hf.load_reward_model`:
        ``*ForSequenceClassification`` weights, tokenizer files and the stored reward mean/std).
        ``kwargs`` go to :class:`RewardScorer`."""
        from fastrm.hf import load_reward_model

        loaded = load_reward_model(path, dtype=dtype, device=device,
                                   attention_backend=attention_backend)
        return cls(loaded.model, loaded.tokenizer, reward_mean=loaded.reward_mean,
                   reward_std=loaded.reward_std, device=device, **kwargs)

    # ------------------------------------------------------------------ groups -> rewards
    def _units(self, groups: Sequence[PreferenceGroup]) -> tuple[list[PreferenceGroup], list[int]]:
        """Groups split to fit ``batch_tokens`` (consecutive responses, prompt kept), and the
        group each unit came from."""
        units: list[PreferenceGroup] = []
        owner: list[int] = []
        cap = self.batch_tokens
        for gi, g in enumerate(groups):
            p = len(g.prompt_tokens)
            if not g.responses:
                raise ValueError(f"row {g.source_index!r}: no response to score")
            longest = max(len(r) for r in g.responses)
            for limit, what, fix in (
                    (cap, f"batch_tokens={cap}", "raise --batch-tokens"),
                    (self.max_seq_len, f"the model's max_seq_len={self.max_seq_len}",
                     "shorten the prompt or use a model built with a longer max_seq_len")):
                if limit is not None and p + longest > limit:
                    raise ValueError(f"row {g.source_index!r}: prompt + response is {p + longest} "
                                     f"tokens, more than {what}; {fix}")
            if g.num_tokens(shares_prefix(g, True)) <= cap:
                units.append(g)
                owner.append(gi)
                continue
            start, used = 0, p
            for k, r in enumerate(g.responses):
                if k > start and used + len(r) > cap:
                    units.append(g.subset(range(start, k)))
                    owner.append(gi)
                    start, used = k, p
                used += len(r)
            units.append(g.subset(range(start, len(g.responses))))
            owner.append(gi)
        return units, owner

    def check_groups(self, groups: Sequence[PreferenceGroup]) -> None:
        """Raises the ``ValueError`` :meth:`score_groups` would raise for a group that cannot be
        scored (too long), without running the model."""
        self._units(groups)

    @torch.inference_mode()
    def score_groups(self, groups: Sequence[PreferenceGroup]) -> list[list[float]]:
        """Rewards ``[K_g]`` of every group's responses (raw model outputs; see
        :meth:`normalized`). Groups are packed together (prompt once per group)."""
        units, owner = self._units(groups)
        out: list[list[float]] = [[] for _ in groups]
        if not units:
            return out
        sizes = [u.num_tokens(shares_prefix(u, True)) for u in units]
        unit_rewards: list[Optional[list[float]]] = [None] * len(units)
        for row in plan_rows(sizes, self.batch_tokens):
            row = sorted(row)
            batch = collate_packed([units[u] for u in row], prefix_sharing=True)
            rewards = self.model.rewards(batch.to(self.device)).float().cpu().tolist()
            self.stats["forwards"] += 1
            self.stats["tokens"] += batch.num_tokens
            self.stats["prompt_tokens_saved"] += batch.prompt_tokens_saved
            at = 0
            for u in row:
                k = len(units[u].responses)
                unit_rewards[u] = rewards[at:at + k]
                at += k
        for u, gi in enumerate(owner):  # subgroups are consecutive responses, in order
            out[gi].extend(unit_rewards[u])
        self.stats["responses"] += sum(len(g.responses) for g in groups)
        return out

    def normalized(self, rewards: list[float]) -> list[float]:
        """``rewards`` normalized with the stored mean / std when ``normalize`` is on."""
        if not self.normalize:
            return rewards
        return [(r - self.reward_mean) / self.reward_std for r in rewards]

    # ------------------------------------------------------------------ public scoring
    def prepare_rows(self, rows: Iterable[Mapping[str, Any]], start: int = 0) -> list[tuple]:
        """Parses and tokenizes rows: ``(row, parsed, group)`` per row; ``start`` is the index of
        the first row (for error messages)."""
        out = []
        for i, row in enumerate(rows, start):
            parsed = parse_row(row, i)
            out.append((row, parsed, tokenize_row(parsed, self.tokenizer)))
        return out

    def iter_score(self, rows: Iterable[Mapping[str, Any]], start: int = 0
                   ) -> Iterator[list[dict]]:
        """Scores ``rows`` chunk by chunk; yields each chunk's output rows in input order
        (every input column kept, plus ``reward`` or ``rewards``). ``start`` is the index of
        the first row (for error messages when resuming)."""
        chunk: list[tuple] = []
        tokens = 0
        for i, row in enumerate(rows, start):
            item = self.prepare_rows([row], i)[0]
            chunk.append(item)
            tokens += item[2].num_tokens(shares_prefix(item[2], True))
            if tokens >= self.chunk_tokens:
                yield self.finish_rows(chunk, self.score_groups([g for _, _, g in chunk]))
                chunk, tokens = [], 0
        if chunk:
            yield self.finish_rows(chunk, self.score_groups([g for _, _, g in chunk]))

    def finish_rows(self, prepared: Sequence[tuple], rewards: Sequence[list[float]]) -> list[dict]:
        """Output rows of :meth:`prepare_rows` items given their groups' raw rewards: each input
        row with ``reward`` (one response) or ``rewards`` (best-of-N), normalized if on."""
        out = []
        for (row, parsed, _), r in zip(prepared, rewards):
            r = self.normalized(r)
            res = dict(row)
            res[parsed.output_field] = r if parsed.best_of_n else r[0]
            out.append(res)
        self.stats["rows"] += len(out)
        return out

    def score(self, rows: Iterable[Mapping[str, Any]]) -> list[dict]:
        """Every row of ``rows`` with its ``reward`` (``response`` / ``messages`` rows) or
        ``rewards`` (``responses`` rows), in input order (see :mod:`fastrm.inference.rows`)."""
        return [r for chunk in self.iter_score(rows) for r in chunk]

    def tokenize_texts(self, texts: Sequence[str], min_shared: int = 16
                       ) -> tuple[list[PreferenceGroup], list[tuple[int, int]]]:
        """Rendered conversation texts (OpenRLHF ``query``: ``prompt + response`` as one string)
        as groups: texts whose token sequences share a prefix of at least ``min_shared`` tokens
        (the same prompt with different responses, as a PPO batch sends them) become one group
        whose common prefix is computed once; the others are prompt-free one-response groups.
        Returns the groups and, per text, ``(group, response)`` where its reward lands. Exact:
        a prefix shared by causal attention is the same computation
        (:func:`fastrm.inference.rows.text_tokens` gives the tokens)."""
        seqs = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"query {i} is a {type(t).__name__}, not a string")
            seqs.append(text_tokens(self.tokenizer, check_text(t, i, "query")))  # valid Unicode
        # runs of lexicographically sorted sequences: a run grows while the prompt tokens it
        # saves, (members - 1) * shared prefix, grow (a long shared system prompt does not
        # swallow the longer prompts that follow it)
        def lcp(a: list[int], b: list[int], limit: int) -> int:
            k = 0
            while k < limit and a[k] == b[k]:
                k += 1
            return k

        runs: list[tuple[list[int], int]] = []
        members: list[int] = []
        shared = 0
        for i in sorted(range(len(seqs)), key=lambda i: seqs[i]):
            if members:
                first = seqs[members[0]]
                p = lcp(first, seqs[i], min(shared, len(seqs[i]) - 1))
                if p >= min_shared and len(members) * p > (len(members) - 1) * shared:
                    members.append(i)
                    shared = p
                    continue
                runs.append((members, shared))
            members, shared = [i], len(seqs[i]) - 1
        if members:
            runs.append((members, shared))
        groups: list[PreferenceGroup] = []
        where: list[tuple[int, int]] = [(0, 0)] * len(seqs)
        for members, shared in runs:
            if len(members) == 1:
                where[members[0]] = (len(groups), 0)
                groups.append(PreferenceGroup(prompt_tokens=[], responses=[seqs[members[0]]],
                                              comparisons=[], source_index=f"query {members[0]}"))
                continue
            members.sort()
            for k, i in enumerate(members):
                where[i] = (len(groups), k)
            groups.append(PreferenceGroup(
                prompt_tokens=seqs[members[0]][:shared],
                responses=[seqs[i][shared:] for i in members], comparisons=[],
                source_index=f"queries {members[:4]}"))
        return groups, where

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """One reward per rendered conversation text (``prompt + response`` as the chat template
        writes it): what ``POST /get_reward`` returns. Shared prompts are computed once."""
        groups, where = self.tokenize_texts(texts)
        rewards = self.score_groups(groups)
        return [self.normalized([rewards[g][k]])[0] for g, k in where]
