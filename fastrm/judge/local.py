"""Local generation backend: any torchtune decoder + tokenizer, batched sampling with a KV cache.

The decoding loop follows :func:`torchtune.generation.generate` (left-padded prompts, a
``[B, T, T]`` boolean causal mask built by
:func:`~torchtune.generation.get_causal_mask_from_padding_mask`, position ids shifted past the
padding by :func:`~torchtune.generation.get_position_ids_from_padding_mask`, KV caches set up per
batch with :func:`~torchtune.modules.common_utils.local_kv_cache`) and adds what a preference-data
pipeline needs and torchtune's loop does not have:

* an explicit padding mask (torchtune infers padding from ``pad_id``, which breaks when the pad
  id is also a real token, as in SmolLM2 where ``pad == eos``);
* top-p next to temperature and top-k, stop strings (the text ends before the first one, as
  OpenAI-compatible servers do), and a per-row random generator seeded from each
  request's seed, so one response does not depend on which other rows shared its batch (up to
  floating-point batch effects), and a resumed run samples the same rows as an uninterrupted one;
* per-token log-probabilities of the chosen tokens and the ``top_logprobs`` alternatives, under
  the raw model distribution (before temperature / top-k / top-p), as OpenAI-compatible servers
  return them; the judge reads answer-token probabilities from them;
* a chunked prefill, so the ``[B, chunk, vocab]`` logits of the prompt are never materialised
  for the whole prompt at once (SmolLM2 has a 49k vocabulary);
* :meth:`LocalBackend.score`: teacher-forced log-probabilities of a given response, for the
  order-independent mean-log-probability judge.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules.common_utils import delete_kv_caches, local_kv_cache

from fastrm.judge.types import (
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    GenerationRequest,
    Messages,
    SamplingParams,
    TokenLogprob,
)

log = logging.getLogger(__name__)


def _maybe_instantiate(node: Any) -> Any:
    """Instantiate a ``{"_component_": ...}`` config node (torchtune's ``instantiate`` is not
    recursive, so a builder that takes nested components instantiates them itself)."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        DictConfig = dict  # type: ignore
    if isinstance(node, DictConfig) or (isinstance(node, dict) and "_component_" in node):
        from omegaconf import OmegaConf
        from torchtune import config as tt_config

        cfg = node if isinstance(node, DictConfig) else OmegaConf.create(node)
        if "_component_" in cfg:
            return tt_config.instantiate(cfg)
    return node


def encode_chat_prompt(tokenizer: Any, messages: Messages) -> List[int]:
    """Token ids of a chat prompt followed by the assistant header (the generation prompt).

    Works with any torchtune ``ModelTokenizer`` (``tokenize_messages``), in this order of
    preference: a tokenizer method ``encode_chat_prompt(messages) -> List[int]`` (plain dict
    messages); ``tokenize_messages(..., add_end_tokens=False, add_generation_prompt=True)``
    (:class:`fastrm.models.tokenizer.HFChatTokenizer`); otherwise an empty assistant message is
    appended, as torchtune's generate recipe does, with the end-of-sequence flag off (llama3
    calls it ``add_end_tokens``, qwen2 ``add_eos``).

    Raises:
        ValueError: the ids end on a stop token (the tokenizer closed the assistant turn, so the
            model would stop at once).
    """
    if hasattr(tokenizer, "encode_chat_prompt"):
        ids = list(tokenizer.encode_chat_prompt(messages))
    else:
        from torchtune.data import Message

        msgs = [Message(role=m["role"], content=m["content"]) for m in messages]
        params = inspect.signature(tokenizer.tokenize_messages).parameters
        kwargs: Dict[str, Any] = {}
        for flag in ("add_end_tokens", "add_eos"):
            if flag in params:
                kwargs[flag] = False
        if "add_generation_prompt" in params:
            kwargs["add_generation_prompt"] = True
        else:
            msgs.append(Message(role="assistant", content=""))
        ids, _ = tokenizer.tokenize_messages(msgs, **kwargs)
        ids = list(ids)
    if ids and ids[-1] in _stop_ids(tokenizer):
        raise ValueError(
            f"{type(tokenizer).__name__} ends the generation prompt on stop token {ids[-1]}; it must "
            "leave the assistant turn open (support add_generation_prompt or encode_chat_prompt)"
        )
    return ids


def _stop_ids(tokenizer: Any) -> List[int]:
    """Token ids that end a response: ``tokenizer.stop_tokens`` if it has them, else the
    end-of-turn token (``end_token_id`` / ``im_end_id``) and ``eos_id``."""
    ids = getattr(tokenizer, "stop_tokens", None)
    if not ids:
        ids = [getattr(tokenizer, a, None) for a in ("end_token_id", "im_end_id", "eos_id")]
    return sorted({int(i) for i in ids if i is not None})


def _sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Sample one token per row.

    Args:
        logits (torch.Tensor): ``[B, V]`` float32 next-token logits.
        params (SamplingParams): temperature (0 = greedy), top_k, top_p.
        generators (Sequence[torch.Generator]): one CPU generator per row.

    Returns:
        torch.Tensor: ``[B]`` int64 token ids. Sampling uses the exponential-race trick of
        torchtune (``argmax(p / q)``, ``q ~ Exp(1)``), which draws exactly from ``p``.
    """
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    x = logits / params.temperature
    vocab = x.size(-1)
    if params.top_k is not None and params.top_k < vocab:
        kth = torch.topk(x, params.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        sorted_p = torch.softmax(sorted_x, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (the top token stays)
        drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= params.top_p
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)
    probs = torch.softmax(x, dim=-1)
    q = torch.stack([torch.empty(vocab).exponential_(1, generator=g) for g in generators]).to(probs.device)
    return torch.argmax(probs / q, dim=-1)


class LocalBackend:
    """Generate with a torchtune decoder in this process.

    Args:
        model (torch.nn.Module): a torchtune ``TransformerDecoder`` (or a config node with
            ``_component_``), weights already loaded unless ``checkpointer`` is given.
        tokenizer (Any): a torchtune ``ModelTokenizer`` (``tokenize_messages``, ``encode``,
            ``decode``, ``stop_tokens``) or a config node.
        checkpointer (Optional[Any]): a torchtune checkpointer (or config node); its
            ``load_checkpoint()["model"]`` state dict is loaded into ``model``.
        name (str): the model name written into every output row.
        device (str): torch device.
        dtype (str): ``"auto"`` / ``"fp32"`` / ``"bf16"`` / ``"fp16"``; weights and KV cache
            use it (``auto`` as in training: :func:`fastrm.training.dtype.resolve_dtype`).
        max_batch_size (int): rows decoded together; larger requests are split.
        max_seq_len (Optional[int]): prompt + new tokens limit (default: the model's
            ``max_seq_len``). A longer request fails (``finish_reason="error"``), it is never
            silently truncated.
        prefill_chunk_size (int): prompt tokens per prefill forward; bounds the
            ``[B, chunk, vocab]`` logits buffer.
    """

    supports_logprobs = True

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        checkpointer: Optional[Any] = None,
        name: str = "local",
        device: str = "cpu",
        dtype: str = "fp32",
        max_batch_size: int = 8,
        max_seq_len: Optional[int] = None,
        prefill_chunk_size: int = 256,
    ) -> None:
        from fastrm.training.dtype import resolve_dtype

        resolved = resolve_dtype(dtype, device)  # the one resolver; unknown names are errors
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1, got {prefill_chunk_size}")
        self.name = name
        self.device = torch.device(device)
        self.dtype = resolved
        model = _maybe_instantiate(model)
        checkpointer = _maybe_instantiate(checkpointer)
        if checkpointer is not None:
            state = checkpointer.load_checkpoint()
            model.load_state_dict(state["model"] if "model" in state else state)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = _maybe_instantiate(tokenizer)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len or getattr(model, "max_seq_len", None) or 4096
        self.prefill_chunk_size = prefill_chunk_size
        self.stop_ids = _stop_ids(self.tokenizer)
        self.pad_id = int(getattr(self.tokenizer, "pad_id", 0) or 0)
        self._token_text: Dict[int, str] = {}

    # ------------------------------------------------------------------ helpers
    def _text(self, token_id: int) -> str:
        t = self._token_text.get(token_id)
        if t is None:
            t = self.tokenizer.decode([token_id])
            self._token_text[token_id] = t
        return t

    def _left_pad(self, seqs: Sequence[Sequence[int]], extra: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-pad ``seqs`` and build mask / positions for ``extra`` more tokens.

        Returns ``tokens [B, L]``, ``pad_mask [B, L + extra]`` (True = real token),
        ``masks [B, L + extra, L + extra]`` (True = may attend), ``input_pos [B, L + extra]``.
        """
        B, L = len(seqs), max(len(s) for s in seqs)
        tokens = torch.full((B, L), self.pad_id, dtype=torch.long)
        pad_mask = torch.zeros(B, L + extra, dtype=torch.bool)
        for b, s in enumerate(seqs):
            tokens[b, L - len(s):] = torch.tensor(list(s), dtype=torch.long)
            pad_mask[b, L - len(s):] = True
        masks = get_causal_mask_from_padding_mask(pad_mask, target_seq_len=L + extra)
        input_pos = get_position_ids_from_padding_mask(pad_mask)
        return tokens.to(self.device), pad_mask.to(self.device), masks.to(self.device), input_pos.to(self.device)

    def _forward_chunks(self, tokens: torch.Tensor, masks: torch.Tensor, input_pos: torch.Tensor):
        """Feed ``tokens [B, L]`` through the cached model in chunks; yields ``(start, logits)``
        with ``logits [B, chunk, V]`` float32 for positions ``start .. start + chunk - 1``."""
        L = tokens.size(1)
        for c0 in range(0, L, self.prefill_chunk_size):
            c1 = min(L, c0 + self.prefill_chunk_size)
            out = self.model(tokens[:, c0:c1], input_pos=input_pos[:, c0:c1], mask=masks[:, c0:c1, :])
            yield c0, out.float()

    def _ensure_no_caches(self) -> None:
        if self.model.caches_are_setup():
            delete_kv_caches(self.model)

    # ------------------------------------------------------------------ generation
    def generate(self, requests: Sequence[GenerationRequest]) -> List[Completion]:
        """Sample one response per request (batches of ``max_batch_size`` rows sharing
        sampling settings). Never raises for one bad request: it comes back as an error."""
        out: List[Optional[Completion]] = [None] * len(requests)
        groups: Dict[SamplingParams, List[int]] = {}
        encoded: Dict[int, List[int]] = {}
        for i, r in enumerate(requests):
            try:
                ids = encode_chat_prompt(self.tokenizer, r.messages)
            except Exception as e:  # a malformed prompt must not take the batch down
                out[i] = Completion(None, FINISH_ERROR, error=f"tokenization failed: {e!r}")
                continue
            if len(ids) + r.params.max_new_tokens > self.max_seq_len:
                out[i] = Completion(
                    None, FINISH_ERROR,
                    error=(f"prompt has {len(ids)} tokens; with max_new_tokens="
                           f"{r.params.max_new_tokens} it exceeds max_seq_len={self.max_seq_len}"),
                )
                continue
            encoded[i] = ids
            groups.setdefault(r.params, []).append(i)
        for params, idx in groups.items():
            # sort by length so a batch pads little
            idx = sorted(idx, key=lambda i: len(encoded[i]))
            for s in range(0, len(idx), self.max_batch_size):
                chunk = idx[s:s + self.max_batch_size]
                res = self._generate_batch([encoded[i] for i in chunk], params, [requests[i].seed for i in chunk])
                for i, c in zip(chunk, res):
                    out[i] = c
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_batch(self, prompts: List[List[int]], params: SamplingParams, seeds: List[Optional[int]]) -> List[Completion]:
        B, L, new = len(prompts), max(len(p) for p in prompts), params.max_new_tokens
        total = L + new
        tokens, _, masks, input_pos = self._left_pad(prompts, new)
        gens = []
        for b, s in enumerate(seeds):
            g = torch.Generator()
            g.manual_seed(int(s) if s is not None else params.seed * 1_000_003 + b)
            gens.append(g)
        stop = torch.tensor(self.stop_ids, dtype=torch.long, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        gen_ids: List[List[int]] = [[] for _ in range(B)]
        lps: List[List[TokenLogprob]] = [[] for _ in range(B)]
        finish = [FINISH_LENGTH] * B
        stopped_by_string = [False] * B
        want_lp = params.logprobs or params.top_logprobs > 0
        self._ensure_no_caches()
        with local_kv_cache(self.model, batch_size=B, device=self.device, dtype=self.dtype, decoder_max_seq_len=total):
            logits = None
            for _, chunk_logits in self._forward_chunks(tokens, masks[:, :L], input_pos[:, :L]):
                logits = chunk_logits[:, -1]
            for step in range(new):
                nxt = _sample_tokens(logits, params, gens)
                logp = torch.log_softmax(logits, dim=-1) if want_lp else None
                if params.top_logprobs > 0:
                    top_v, top_i = torch.topk(logp, min(params.top_logprobs, logp.size(-1)), dim=-1)
                for b in range(B):
                    if done[b]:
                        continue
                    t = int(nxt[b])
                    gen_ids[b].append(t)
                    if want_lp:
                        top: Dict[str, float] = {}
                        if params.top_logprobs > 0:
                            for v, i in zip(top_v[b].tolist(), top_i[b].tolist()):
                                # several ids can decode to one string: keep the likeliest
                                top.setdefault(self._text(i), v)
                        lps[b].append(TokenLogprob(self._text(t), float(logp[b, t]), top))
                is_stop = torch.isin(nxt, stop) if stop.numel() else torch.zeros_like(done)
                if params.stop:  # stop strings: checked on the decoded text of each live row
                    for b in range(B):
                        if not done[b] and not is_stop[b] and any(x in self.tokenizer.decode(gen_ids[b]) for x in params.stop):
                            is_stop[b] = True
                            stopped_by_string[b] = True
                for b in torch.nonzero(is_stop & ~done).flatten().tolist():
                    finish[b] = FINISH_STOP
                done |= is_stop
                if bool(done.all()) or step == new - 1:
                    break
                pos = L + step
                fed = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
                logits = self.model(
                    fed[:, None], input_pos=input_pos[:, pos:pos + 1], mask=masks[:, pos:pos + 1, :]
                )[:, -1].float()
        out = []
        for b in range(B):
            ids = gen_ids[b]
            text_ids = ids[:-1] if finish[b] == FINISH_STOP and not stopped_by_string[b] else ids
            text = self.tokenizer.decode(text_ids)
            if stopped_by_string[b]:  # OpenAI semantics: the text ends before the stop string
                text = text[: min(text.find(x) for x in params.stop if x in text)]
            out.append(Completion(
                text=text,
                finish_reason=finish[b],
                num_tokens=len(ids),
                logprobs=lps[b] if want_lp else None,
            ))
        return out

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def score(self, items: Sequence[Tuple[Messages, str]]) -> List[Tuple[float, int]]:
        """Teacher-forced log-probability of each response after its chat prompt.

        Args:
            items: ``(messages, response)`` pairs; the response is encoded without special
                tokens and appended to :func:`encode_chat_prompt` of the messages.

        Returns:
            ``(sum_logprob, num_tokens)`` per item, where
            ``sum_logprob = sum_t log p(y_t | x, y_<t)`` over the response tokens. The mean
            log-probability is ``sum_logprob / num_tokens``.
        """
        seqs, starts = [], []
        for messages, response in items:
            p = encode_chat_prompt(self.tokenizer, messages)
            r = list(self.tokenizer.encode(response, add_bos=False, add_eos=False))
            if not r:
                raise ValueError("score: response is empty (encodes to no tokens); drop empty responses first")
            if len(p) + len(r) > self.max_seq_len:
                raise ValueError(f"score: prompt+response has {len(p) + len(r)} tokens > max_seq_len={self.max_seq_len}")
            seqs.append(p + r)
            starts.append(len(p))
        results: List[Tuple[float, int]] = [(0.0, 0)] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for s in range(0, len(order), self.max_batch_size):
            chunk = order[s:s + self.max_batch_size]
            batch = [seqs[i] for i in chunk]
            tokens, _, masks, input_pos = self._left_pad(batch, 0)
            B, T = tokens.shape
            # position t of the padded row predicts token t+1; response token j of row b sits
            # at padded index (T - len_b) + start_b + j
            first = torch.tensor([T - len(seqs[i]) + starts[i] for i in chunk], device=self.device)
            total_lp = torch.zeros(B, dtype=torch.float64, device=self.device)
            self._ensure_no_caches()
            with local_kv_cache(self.model, batch_size=B, device=self.device, dtype=self.dtype, decoder_max_seq_len=T):
                for c0, lg in self._forward_chunks(tokens, masks, input_pos):
                    c1 = c0 + lg.size(1)
                    tgt_end = min(c1 + 1, T)
                    targets = tokens[:, c0 + 1:tgt_end]  # [B, c] or [B, c-1] on the last chunk
                    lg = lg[:, : targets.size(1)]
                    lp = torch.log_softmax(lg, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
                    tpos = torch.arange(c0 + 1, tgt_end, device=self.device)
                    keep = tpos[None, :] >= first[:, None]
                    total_lp += (lp.double() * keep).sum(-1)
            for b, i in enumerate(chunk):
                results[i] = (float(total_lp[b]), len(seqs[i]) - starts[i])
        return results
