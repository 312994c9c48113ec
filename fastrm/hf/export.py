"""Write a fastrm reward model as a standard HF reward model directory.

The directory loads with ``AutoModelForSequenceClassification.from_pretrained(dir)`` (no missing
or unexpected keys), TRL, OpenRLHF (``--reward_pretrain dir --value_head_prefix score``), vLLM
and RewardBench::

    config.json              the base model's config with architectures
                             ["<Family>ForSequenceClassification"], num_labels 1 (id2label),
                             pad_token_id (see below), dtype, and OpenRLHF's normalization
                             keys "mean" / "std" (validation reward mean / std) when known
    model.safetensors        model.* (HF names) + score.weight [1, D]; no lm_head, LoRA merged
                             (model-0000k-of-0000n.safetensors + model.safetensors.index.json
                             above ``max_shard_size``; written one layer at a
                             time, :func:`write_hf_directory`)
    tokenizer files          tokenizer.json, tokenizer_config.json (pad_token set),
                             chat_template.jinja, special_tokens_map.json, ... as the base had them

The reward equals fastrm's: fastrm reads it at the last token of ``apply_chat_template(messages)``
(:mod:`fastrm.models.tokenizer`); transformers reads it at the rightmost token that is not
``pad_token_id``. :func:`choose_pad_token` therefore picks a pad token that is never the last
token of a rendered conversation, preferring one the chat template never writes at all (the
tokenizer's own pad token when it qualifies, then special tokens named ``*pad*``, then
``<|endoftext|>`` / ``<|end_of_text|>``-like ones, then any other special token). The same token is
the tokenizer's ``pad_token``, so a consumer that pads with ``tokenizer.pad_token_id`` pads with
what the model skips. HF's ``score`` has no bias, and neither has fastrm's head.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
from safetensors.torch import save_file

from fastrm._io import atomic_dir
from fastrm.hf.families import HEAD_KEY, family_for, to_hf

__all__ = ["choose_pad_token", "export_reward_model", "write_hf_directory"]

log = logging.getLogger(__name__)

#: size of one safetensors file before the weights are sharded (transformers' classic default)
MAX_SHARD_SIZE = "5GB"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")
_PROBES = (
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a color"},
     {"role": "assistant", "content": "Blue\n"}, {"role": "user", "content": "Another"},
     {"role": "assistant", "content": " green "}],
)


def choose_pad_token(tokenizer) -> tuple[str, int]:
    """``(text, id)`` of the pad token for the exported model (see the module docstring).

    Args:
        tokenizer: a :class:`fastrm.models.tokenizer.HFChatTokenizer`.

    Raises:
        ValueError: every special token can be the reward token (add a pad token).
    """
    last, used = set(), set()
    errors = []
    for conv in _PROBES:
        try:  # templates may refuse some shapes (Gemma, Mistral v0.1: no system turn)
            ids, _ = tokenizer.tokenize_messages(conv)
        except ValueError as err:
            errors.append(str(err))
            continue
        last.add(ids[-1])
        used.update(ids)
    if not last:
        raise ValueError(f"the chat template of {tokenizer.files.directory} renders none of the probe "
                         f"conversations (user/assistant turns): {errors[0]}")
    specials = dict(tokenizer.special_tokens)  # text -> id
    own = tokenizer.files.special_tokens.get("pad_token")

    def rank(item):
        text, i = item
        low = text.lower()
        return (0 if text == own else 1 if "pad" in low else
                2 if ("endoftext" in low or "end_of_text" in low) else
                3 if i != tokenizer.bos_id else 4, i)

    ordered = sorted(specials.items(), key=rank)
    for text, i in ordered:  # a token the template never writes
        if i not in used:
            return text, i
    for text, i in ordered:  # else one that is never the last token
        if i not in last:
            return text, i
    raise ValueError(
        f"the tokenizer of {tokenizer.files.directory} has no special token that differs from the "
        f"reward token(s) {sorted(last)}: add a pad token (e.g. '<|pad|>') to the tokenizer and "
        "the embeddings before training")


def parse_shard_size(size: int | str) -> int:
    """Bytes of ``max_shard_size``: an int, or a string like transformers' (``"5GB"`` = 5e9,
    ``"40KB"``, ``"2GiB"``)."""
    if isinstance(size, str):
        from huggingface_hub.serialization._base import parse_size_to_int

        try:
            size = parse_size_to_int(size)
        except ValueError as err:
            raise ValueError(f"max_shard_size={size!r}: {err}") from None
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"max_shard_size={size!r}: give a positive number of bytes or a size "
                         "string such as '5GB' or '500MB'")
    return size


class ShardWriter:
    """Writes tensors into safetensors files of at most ``max_shard_size`` bytes as they come,
    in HF's layout (``save_pretrained``'s): ``model.safetensors`` when everything fits in one
    file, else ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``. A
    tensor that would tip the current shard over the limit starts a new one (a tensor larger
    than the limit gets a shard of its own), so the writer holds at most about one shard, or
    the largest tensor, at a time: ``held_bytes`` / ``peak_bytes`` count the tensor bytes it
    holds. Shards are written under temporary names and renamed in :meth:`close`, when their
    number is known (the folder ``out`` is the caller's atomic directory)."""

    def __init__(self, out: Path, max_shard_size: int | str = MAX_SHARD_SIZE) -> None:
        self.out = Path(out)
        self.max_bytes = parse_shard_size(max_shard_size)
        self._shard: dict[str, torch.Tensor] = {}
        self._files: list[tuple[str, list[str]]] = []  # (temporary name, keys)
        self._keys: set[str] = set()
        self.held_bytes = self.peak_bytes = self.total_bytes = 0
        self.dtype: Optional[torch.dtype] = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._keys:
            raise ValueError(f"tensor {name!r} written twice")
        t = tensor.detach().cpu().contiguous()
        n = t.numel() * t.element_size()
        if self._shard and self.held_bytes + n > self.max_bytes:
            self._flush()
        self._keys.add(name)
        self._shard[name] = t
        self.dtype = self.dtype or t.dtype
        self.held_bytes += n
        self.total_bytes += n
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)

    def _flush(self) -> None:
        if not self._shard:
            return
        name = f".shard-{len(self._files):05d}.safetensors"
        save_file(self._shard, str(self.out / name), metadata={"format": "pt"})
        self._files.append((name, list(self._shard)))
        self._shard, self.held_bytes = {}, 0

    def close(self) -> list[str]:
        """Writes the last shard, names the files, writes the index; returns the file names."""
        self._flush()
        if not self._files:
            raise ValueError("no tensors were written")
        if len(self._files) == 1:
            (self.out / self._files[0][0]).rename(self.out / "model.safetensors")
            return ["model.safetensors"]
        n = len(self._files)
        weight_map, names = {}, []
        for i, (tmp, keys) in enumerate(self._files):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out / tmp).rename(self.out / name)
            weight_map.update({k: name for k in keys})
            names.append(name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names + ["model.safetensors.index.json"]


def write_weights(out: Path, sd: Mapping[str, torch.Tensor],
                  max_shard_size: int | str = MAX_SHARD_SIZE) -> list[str]:
    """``sd`` through a :class:`ShardWriter` (HF's single-file or sharded layout)."""
    writer = ShardWriter(out, max_shard_size)
    for k, v in sd.items():
        writer.add(k, v)
    return writer.close()


def _group_key(name: str) -> str:
    m = re.match(r"decoder\.layers\.\d+\.", name)
    return m.group(0) if m else name


def iter_layers(tensors: Iterable[tuple[str, Optional[torch.Tensor]]]
                ) -> Iterator[dict[str, torch.Tensor]]:
    """Groups a stream of ``(fastrm key, tensor)`` into one dict per decoder layer
    (``decoder.layers.N.*``: everything a conversion needs together, e.g. a linear's LoRA
    ``lora_a`` / ``lora_b`` / base weight) and one per other tensor, in stream order. ``None``
    tensors (ranks > 0 of :func:`~fastrm.training.distributed.iter_full_tensors`) are drained
    and dropped."""
    group: dict[str, torch.Tensor] = {}
    key = None
    for name, t in tensors:
        if t is None:
            continue
        k = _group_key(name)
        if group and k != key:
            yield group
            group = {}
        key = k
        group[name] = t
    if group:
        yield group


def iter_hf_tensors(tensors: Iterable[tuple[str, Optional[torch.Tensor]]],
                    config: Mapping[str, Any], *, lora_rank: Optional[int] = None,
                    lora_alpha: Optional[float] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(HF key, tensor)`` of a stream of fastrm reward-model tensors, converted one layer at
    a time (:func:`iter_layers`): LoRA merged (:func:`merge_lora`), then the family's key
    mapping and q / k permutation (:func:`~fastrm.hf.families.to_hf`, per tensor). At most one
    layer is held. Raises ValueError when the stream has no ``head.weight``."""
    seen_head = False
    for group in iter_layers(tensors):
        seen_head = seen_head or HEAD_KEY in group
        hf = to_hf(merge_lora(group, lora_rank, lora_alpha), config, partial=True)
        del group
        yield from hf.items()
        del hf
    if not seen_head:
        raise ValueError("the reward model state dict has no head.weight")


def _copy_tokenizer(src: Path, out: Path, pad_text: str) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    if (src / "additional_chat_templates").is_dir():
        shutil.copytree(src / "additional_chat_templates", out / "additional_chat_templates")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = out / name
        if p.is_file() or name == "tokenizer_config.json":
            data = json.loads(p.read_text()) if p.is_file() else {}
            data["pad_token"] = pad_text
            p.write_text(json.dumps(data, indent=2, ensure_ascii=False))


def _write_training_template(tokenizer, out: Path) -> None:
    """The exported tokenizer renders conversations as training did: a template chosen by name
    or given as a string (``hf_tokenizer(chat_template=...)``) becomes the directory's
    ``chat_template.jinja`` (which transformers prefers to ``tokenizer_config.json``'s)."""
    if not tokenizer.chat:
        if tokenizer.files.chat_templates:
            log.warning("trained in plain mode (chat=False) but %s has a chat template: consumers "
                        "that apply it will score other token ids than training saw",
                        tokenizer.files.directory)
        return
    try:
        default = tokenizer.files.chat_template(None)
    except ValueError:  # several templates and no default
        default = None
    if tokenizer.template.source != default:
        (out / "chat_template.jinja").write_text(tokenizer.template.source)
        cfg_path = out / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("chat_template", None)
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    extra = set(tokenizer.template.variables) - set(tokenizer.files.special_tokens)
    if extra:
        log.warning("the chat template was rendered with template_kwargs %s; pass the same keyword "
                    "arguments to apply_chat_template when using the exported model", sorted(extra))


def write_hf_directory(out: Path, model_sd: Mapping[str, torch.Tensor] | Iterable[tuple[str, Optional[torch.Tensor]]],
                       config: Mapping[str, Any], tokenizer, *, reward_mean: Optional[float] = None,
                       reward_std: Optional[float] = None,
                       generation_config: Optional[Path] = None,
                       max_shard_size: int | str = MAX_SHARD_SIZE,
                       lora_rank: Optional[int] = None,
                       lora_alpha: Optional[float] = None) -> dict[str, Any]:
    """Writes the HF reward model files into the existing folder ``out`` (not atomic: see
    :func:`export_reward_model`). ``model_sd``: a fastrm reward-model state dict (``decoder.*``,
    ``head.weight``) or a stream of its ``(key, tensor)`` pairs in state-dict order (e.g.
    :func:`~fastrm.training.distributed.iter_full_tensors`, gathered one tensor at a time); it
    is converted and written one decoder layer at a time (:func:`iter_hf_tensors`, LoRA
    adapters merged with ``lora_rank`` / ``lora_alpha``) into safetensors shards of at most
    ``max_shard_size`` (:class:`ShardWriter`), so about one layer plus one shard is held, never
    the whole model. ``config``: the base model's ``config.json``; ``tokenizer``: the run's
    :class:`~fastrm.models.tokenizer.HFChatTokenizer` (its files are copied). Returns the
    written ``config.json`` contents."""
    fam = family_for(config)
    pad_text, pad_id = choose_pad_token(tokenizer)
    writer = ShardWriter(out, max_shard_size)
    items = model_sd.items() if isinstance(model_sd, Mapping) else model_sd
    for k, v in iter_hf_tensors(items, config, lora_rank=lora_rank, lora_alpha=lora_alpha):
        writer.add(k, v)
        del v
    writer.close()
    cfg = dict(config)
    for k in ("torch_dtype", "dtype"):
        cfg.pop(k, None)
    cfg.update(
        architectures=[fam.classification_class(config)],
        id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
        pad_token_id=pad_id,
        dtype=str(writer.dtype).removeprefix("torch."),
    )
    cfg.pop("num_labels", None)
    if reward_mean is not None and reward_std is not None:
        # OpenRLHF's RewardModel reads config.mean / config.std (normalize_reward)
        cfg.update(mean=float(reward_mean), std=float(reward_std))
    else:
        cfg.pop("mean", None)
        cfg.pop("std", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    _copy_tokenizer(Path(tokenizer.files.directory), out, pad_text)
    _write_training_template(tokenizer, out)
    if generation_config is not None and Path(generation_config).is_file():
        shutil.copy(generation_config, out / "generation_config.json")
    return cfg


def export_reward_model(out_dir, model, config: Mapping[str, Any], tokenizer, *,
                        reward_mean: Optional[float] = None, reward_std: Optional[float] = None,
                        lora_rank: Optional[int] = None, lora_alpha: Optional[float] = None,
                        max_shard_size: int | str = MAX_SHARD_SIZE) -> Path:
    """Writes ``model`` (a :class:`~fastrm.models.RewardModel` or its state dict) as an HF
    reward model directory ``out_dir``, atomically (built beside it, then renamed), one layer
    at a time (:func:`write_hf_directory`).

    Args:
        out_dir: the directory to create (replaced if it exists).
        model: the reward model or its full state dict (``decoder.*``, ``head.weight``).
        config: the base model's HF ``config.json`` (a dict or its path / directory).
        tokenizer: an :class:`~fastrm.models.tokenizer.HFChatTokenizer` or a directory with
            tokenizer files.
        reward_mean, reward_std: written as ``mean`` / ``std`` (OpenRLHF's normalization).
        lora_rank, lora_alpha: merge LoRA adapters in the state dict with these.
        max_shard_size: bytes (or ``"5GB"``-like string) per safetensors file; above it the
            weights are sharded as transformers shards them.
    """
    from fastrm.hf.families import read_config
    from fastrm.models.tokenizer import HFChatTokenizer

    if not isinstance(config, Mapping):
        config = read_config(config)
    if not isinstance(tokenizer, HFChatTokenizer):
        tokenizer = HFChatTokenizer(tokenizer)
    sd = model.state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        write_hf_directory(tmp, sd, config, tokenizer, reward_mean=reward_mean,
                           reward_std=reward_std, max_shard_size=max_shard_size,
                           lora_rank=lora_rank, lora_alpha=lora_alpha)
    return out


def merge_lora(sd: Mapping[str, torch.Tensor], rank: Optional[int],
               alpha: Optional[float]) -> dict[str, torch.Tensor]:
    """LoRA / DoRA adapters merged into their base weights (torchtune's ``get_merged_lora_ckpt``);
    a state dict without adapters is returned as it is."""
    sd = dict(sd)
    if not any("lora_" in k for k in sd):
        return sd
    if rank is None or alpha is None:
        raise ValueError("the state dict has LoRA adapters: pass lora_rank and lora_alpha to merge them")
    from torchtune.modules.peft import get_merged_lora_ckpt

    # torchtune merges in place (``weight += ...``): the tensors of a live model's state dict
    # share storage with its parameters, so merge into copies of the adapted weights
    for k in [k for k in sd if k.endswith(".lora_a.weight")]:
        base = k[: -len(".lora_a.weight")] + ".weight"
        sd[base] = sd[base].clone()
    return get_merged_lora_ckpt(sd, rank=int(rank), alpha=float(alpha))
