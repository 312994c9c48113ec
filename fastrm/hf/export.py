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
                             above ``max_shard_bytes``)
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
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import save_file

from fastrm._io import atomic_dir
from fastrm.hf.families import family_for, to_hf

__all__ = ["choose_pad_token", "export_reward_model", "write_hf_directory"]

log = logging.getLogger(__name__)

#: bytes per safetensors file before the weights are sharded (HF's default for save_pretrained)
MAX_SHARD_BYTES = 5 * 1024**3
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


def write_weights(out: Path, sd: Mapping[str, torch.Tensor],
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """``model.safetensors``, or shards + ``model.safetensors.index.json`` (HF's layout)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(sd):
        n = sd[k].numel() * sd[k].element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = sd[k]
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names + ["model.safetensors.index.json"]


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


def write_hf_directory(out: Path, model_sd: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                       tokenizer, *, reward_mean: Optional[float] = None,
                       reward_std: Optional[float] = None,
                       generation_config: Optional[Path] = None,
                       max_shard_bytes: int = MAX_SHARD_BYTES) -> dict[str, Any]:
    """Writes the HF reward model files into the existing folder ``out`` (not atomic: see
    :func:`export_reward_model`). ``model_sd``: a fastrm reward-model state dict (``decoder.*``
    with LoRA already merged, ``head.weight``); ``config``: the base model's ``config.json``;
    ``tokenizer``: the run's :class:`~fastrm.models.tokenizer.HFChatTokenizer` (its files are
    copied). Returns the written ``config.json`` contents."""
    fam = family_for(config)
    hf_sd = to_hf(model_sd, config)
    pad_text, pad_id = choose_pad_token(tokenizer)
    dtype = next(iter(hf_sd.values())).dtype
    cfg = dict(config)
    for k in ("torch_dtype", "dtype"):
        cfg.pop(k, None)
    cfg.update(
        architectures=[fam.classification_class(config)],
        id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
        pad_token_id=pad_id,
        dtype=str(dtype).removeprefix("torch."),
    )
    cfg.pop("num_labels", None)
    if reward_mean is not None and reward_std is not None:
        # OpenRLHF's RewardModel reads config.mean / config.std (normalize_reward)
        cfg.update(mean=float(reward_mean), std=float(reward_std))
    else:
        cfg.pop("mean", None)
        cfg.pop("std", None)
    write_weights(out, hf_sd, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    _copy_tokenizer(Path(tokenizer.files.directory), out, pad_text)
    _write_training_template(tokenizer, out)
    if generation_config is not None and Path(generation_config).is_file():
        shutil.copy(generation_config, out / "generation_config.json")
    return cfg


def export_reward_model(out_dir, model, config: Mapping[str, Any], tokenizer, *,
                        reward_mean: Optional[float] = None, reward_std: Optional[float] = None,
                        lora_rank: Optional[int] = None, lora_alpha: Optional[float] = None,
                        max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Writes ``model`` (a :class:`~fastrm.models.RewardModel` or its state dict) as an HF
    reward model directory ``out_dir``, atomically (built beside it, then renamed).

    Args:
        out_dir: the directory to create (replaced if it exists).
        model: the reward model or its full state dict (``decoder.*``, ``head.weight``).
        config: the base model's HF ``config.json`` (a dict or its path / directory).
        tokenizer: an :class:`~fastrm.models.tokenizer.HFChatTokenizer` or a directory with
            tokenizer files.
        reward_mean, reward_std: written as ``mean`` / ``std`` (OpenRLHF's normalization).
        lora_rank, lora_alpha: merge LoRA adapters in the state dict with these.
    """
    from fastrm.hf.families import read_config
    from fastrm.models.tokenizer import HFChatTokenizer

    if not isinstance(config, Mapping):
        config = read_config(config)
    if not isinstance(tokenizer, HFChatTokenizer):
        tokenizer = HFChatTokenizer(tokenizer)
    sd = model.state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    sd = merge_lora(sd, lora_rank, lora_alpha)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        write_hf_directory(tmp, sd, config, tokenizer, reward_mean=reward_mean,
                           reward_std=reward_std, max_shard_bytes=max_shard_bytes)
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
