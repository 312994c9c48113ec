"""Random Llama-shaped HF checkpoints written layer by layer: the base checkpoints of the
distributed tests and of ``benchmarks/bench_fsdp_memory.py`` (a 0.4B model never has to
exist in one process's memory to be written).

The files are what ``LlamaForCausalLM.save_pretrained`` writes (HF parameter names,
``config.json``, ``model.safetensors.index.json`` over one file per group of layers), so
torchtune's ``FullModelHFCheckpointer`` (``model_type: LLAMA3``) and transformers both load
them, plus a byte-level tokenizer (:func:`write_byte_tokenizer`: 256 bytes and 5 Llama 3-style
special tokens, ids < 261, with a chat template), so the directory is a complete model that
``fastrm.models.tokenizer.hf_tokenizer`` reads and the recipe exports as an HF reward model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from fastrm._io import atomic_path


def _layer_shapes(prefix: str, d: int, n_heads: int, n_kv: int, hd: int, f: int) -> dict[str, tuple]:
    return {
        f"{prefix}.input_layernorm.weight": (d,),
        f"{prefix}.self_attn.q_proj.weight": (n_heads * hd, d),
        f"{prefix}.self_attn.k_proj.weight": (n_kv * hd, d),
        f"{prefix}.self_attn.v_proj.weight": (n_kv * hd, d),
        f"{prefix}.self_attn.o_proj.weight": (d, n_heads * hd),
        f"{prefix}.post_attention_layernorm.weight": (d,),
        f"{prefix}.mlp.gate_proj.weight": (f, d),
        f"{prefix}.mlp.up_proj.weight": (f, d),
        f"{prefix}.mlp.down_proj.weight": (d, f),
    }


def _draw(shape: tuple, name: str, gen: torch.Generator, std: float) -> torch.Tensor:
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    return std * torch.randn(shape, generator=gen)


#: the byte tokenizer's special tokens (ids 256..260) and chat template (Llama 3's layout)
SPECIAL_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|pad|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def write_byte_tokenizer(out_dir: str | os.PathLike) -> None:
    """``tokenizer.json`` (byte-level BPE without merges: one token per byte, ids 0..255, then
    :data:`SPECIAL_TOKENS` as 256..260) and ``tokenizer_config.json`` (bos / eos / pad tokens,
    :data:`CHAT_TEMPLATE`) into ``out_dir``, atomically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: ord(c))
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    out = Path(out_dir)
    with atomic_path(out / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS[0],
              "eos_token": SPECIAL_TOKENS[3], "pad_token": SPECIAL_TOKENS[4],
              "chat_template": CHAT_TEMPLATE, "model_max_length": 1 << 20}
    with atomic_path(out / "tokenizer_config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2))


def write_random_llama_checkpoint(
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 261,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    embed_dim: int = 64,
    intermediate_dim: Optional[int] = None,
    max_seq_len: int = 2048,
    rope_base: float = 500_000.0,
    norm_eps: float = 1e-5,
    seed: int = 0,
    std: float = 0.02,
    layers_per_file: int = 4,
) -> dict[str, Any]:
    """Writes a random Llama 3-shaped HF checkpoint into ``out_dir``, one safetensors file per
    ``layers_per_file`` decoder layers (plus one for the embeddings, final norm and LM head),
    each written atomically, and the byte tokenizer (``vocab_size`` must be at least 261);
    weights ``~ N(0, std^2)``, norm scales ``1 + N(0, 0.01)``, drawn from ``seed``. Returns a ``checkpointer`` config section for the reward-model recipe
    (torchtune's ``FullModelHFCheckpointer``, ``model_type: LLAMA3``).

    ``intermediate_dim`` defaults to torchtune's Llama 3 rule (``scale_hidden_dim_for_mlp``),
    so ``fastrm.models.builders.tiny_llama3`` with the same arguments builds the matching
    decoder."""
    from safetensors.torch import save_file
    from torchtune.models.llama3._model_utils import scale_hidden_dim_for_mlp

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size}: the byte tokenizer needs at least "
                         f"{256 + len(SPECIAL_TOKENS)} ids")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hd = embed_dim // num_heads
    f = intermediate_dim or scale_hidden_dim_for_mlp(embed_dim)
    gen = torch.Generator().manual_seed(seed)

    def groups() -> Iterator[tuple[str, dict[str, tuple]]]:
        yield "model-embed.safetensors", {
            "model.embed_tokens.weight": (vocab_size, embed_dim),
            "model.norm.weight": (embed_dim,),
            "lm_head.weight": (vocab_size, embed_dim),
        }
        for start in range(0, num_layers, layers_per_file):
            shapes: dict[str, tuple] = {}
            for i in range(start, min(start + layers_per_file, num_layers)):
                shapes.update(_layer_shapes(f"model.layers.{i}", embed_dim, num_heads,
                                            num_kv_heads, hd, f))
            yield f"model-layers-{start:04d}.safetensors", shapes

    weight_map: dict[str, str] = {}
    files: list[str] = []
    total = 0
    for fname, shapes in groups():
        tensors = {n: _draw(s, n, gen, std) for n, s in shapes.items()}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        with atomic_path(out / fname) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        del tensors
        weight_map.update({n: fname for n in shapes})
        files.append(fname)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab_size, "hidden_size": embed_dim, "intermediate_size": f,
        "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads, "head_dim": hd, "max_position_embeddings": max_seq_len,
        "rope_theta": rope_base, "rms_norm_eps": norm_eps, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "float32",
    }
    config.update(bos_token_id=256, eos_token_id=259, pad_token_id=260)
    for name, obj in (("model.safetensors.index.json", index), ("config.json", config)):
        with atomic_path(out / name) as tmp:
            tmp.write_text(json.dumps(obj, indent=2))
    write_byte_tokenizer(out)
    return {
        "_component_": "torchtune.training.FullModelHFCheckpointer",
        "checkpoint_dir": str(out),
        "checkpoint_files": files,
        "model_type": "LLAMA3",
        # torchtune refuses an output folder inside the checkpoint's
        "output_dir": str(out.parent / f"{out.name}_torchtune_out"),
    }
