"""Read a llama-architecture GGUF file and write it out as a Hugging Face checkpoint.

GGUF (the llama.cpp file format) stores one model in one file: metadata (architecture
hyper-parameters, the tokenizer's vocabulary and merges, the chat template) and tensors, some of
them block-quantized (Q4_0, Q4_1, Q8_0, K-quants, ...). This module turns such a file into what
torchtune and transformers read from a local directory::

    model.safetensors         weights in HF LlamaForCausalLM names and layout, fp32 (or bf16)
    config.json               LlamaConfig fields (torchtune's HF checkpointer reads the head counts here)
    generation_config.json    bos / eos / pad ids
    tokenizer.json            byte-level BPE rebuilt from the GGUF vocabulary + merges
    tokenizer_config.json     special tokens and chat template
    special_tokens_map.json

Layout of attention weights (why there is a permutation at all). Rotary embeddings rotate
pairs of query/key features. Meta's original code and torchtune rotate *interleaved* pairs
``(x[2i], x[2i+1])``; HF ``transformers`` rotates *halves* ``(x[i], x[i + head_dim/2])``. HF
checkpoints therefore store ``W_q`` / ``W_k`` with the rows of each head permuted, and torchtune's
``convert_weights.hf_to_tune`` undoes that permutation when it loads one. llama.cpp's converter
applies the inverse permutation again when it writes a GGUF (llama.cpp rotates interleaved pairs
too), so **GGUF q/k weights are already in torchtune's layout**: :func:`load_gguf_state_dict`
returns them untouched, and :func:`convert_gguf_to_hf` passes the whole state dict through
``convert_weights.tune_to_hf`` so that the written checkpoint is a true HF one (transformers and
torchtune's ``FullModelHFCheckpointer`` both read it correctly). The tests check this on logits,
not shapes: shapes are identical under either layout.

Dequantization uses ``gguf.quants.dequantize`` (exact: block scale * quant + block min, computed
in fp32), so the fp32 checkpoint holds exactly the values llama.cpp computes with.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

__all__ = [
    "GGUFLlamaConfig",
    "GGUFTokenizerSpec",
    "convert_gguf_to_hf",
    "dequantize_gguf_tensor",
    "gguf_reader",
    "gguf_to_tune_key",
    "load_gguf_state_dict",
    "read_gguf_metadata",
    "build_hf_tokenizer",
]

# GGUF tensor name (per block: ``blk.{n}.``) -> torchtune TransformerDecoder state-dict key.
_GGUF_TO_TUNE: Dict[str, str] = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.scale",
    "output.weight": "output.weight",
    "blk.{}.attn_norm.weight": "layers.{}.sa_norm.scale",
    "blk.{}.attn_q.weight": "layers.{}.attn.q_proj.weight",
    "blk.{}.attn_k.weight": "layers.{}.attn.k_proj.weight",
    "blk.{}.attn_v.weight": "layers.{}.attn.v_proj.weight",
    "blk.{}.attn_output.weight": "layers.{}.attn.output_proj.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.mlp_norm.scale",
    "blk.{}.ffn_gate.weight": "layers.{}.mlp.w1.weight",
    "blk.{}.ffn_down.weight": "layers.{}.mlp.w2.weight",
    "blk.{}.ffn_up.weight": "layers.{}.mlp.w3.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")

# GGUF token types (llama.cpp ``llama_token_type``).
_TOKEN_TYPE_NORMAL = 1
_TOKEN_TYPE_UNKNOWN = 2
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4
_TOKEN_TYPE_UNUSED = 5
_TOKEN_TYPE_BYTE = 6

# ``tokenizer.ggml.pre`` values whose pre-tokenizer is "split every digit, then GPT-2's regex"
# (llama.cpp groups these under one regex list: ``\p{N}`` then the GPT-2 pattern).
_PRE_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"}
# ``tokenizer.ggml.pre`` values that use GPT-2's regex alone.
_PRE_GPT2 = {"gpt2", "default", "mpt", "olmo", "jais"}

PathLike = Union[str, Path]


def gguf_reader(path: PathLike):
    """Open ``path`` with ``gguf.GGUFReader`` (memory-mapped; nothing is dequantized yet).

    Raises:
        ValueError: if the file does not exist or is not a GGUF file.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"gguf_path: no file at {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises bare ValueError/struct errors on a bad magic or version
        raise ValueError(f"gguf_path: {path} is not a readable GGUF file ({e})") from e


def read_gguf_metadata(reader_or_path) -> Dict[str, Any]:
    """All key/value metadata of a GGUF file as plain Python values (lists stay lists)."""
    reader = gguf_reader(reader_or_path) if isinstance(reader_or_path, (str, Path)) else reader_or_path
    return {name: f.contents() for name, f in reader.fields.items()}


def gguf_to_tune_key(name: str) -> str:
    """Map a GGUF tensor name to torchtune's llama state-dict key.

    ``blk.3.attn_q.weight -> layers.3.attn.q_proj.weight``, ``token_embd.weight ->
    tok_embeddings.weight``, ...

    Raises:
        ValueError: for a tensor this llama mapping does not know (e.g. ``rope_freqs.weight``,
            which llama-3.1-style GGUFs carry for scaled RoPE: not supported here).
    """
    m = _BLOCK_RE.match(name)
    if m is not None:
        template = "blk.{}." + m.group(2)
        if template in _GGUF_TO_TUNE:
            return _GGUF_TO_TUNE[template].format(m.group(1))
    elif name in _GGUF_TO_TUNE:
        return _GGUF_TO_TUNE[name]
    raise ValueError(
        f"GGUF tensor {name!r} has no torchtune llama equivalent; supported names: "
        f"{sorted(_GGUF_TO_TUNE)} (blk.N.* per layer)"
    )


def dequantize_gguf_tensor(tensor) -> torch.Tensor:
    """Dequantize one ``gguf.ReaderTensor`` to a contiguous fp32 ``torch.Tensor``.

    Shape: GGUF lists dimensions fastest-first (``ne = [in_features, out_features]``); the
    returned tensor is in PyTorch order ``[out_features, in_features]`` (``nn.Linear.weight``),
    ``[vocab, dim]`` for the embedding, ``[dim]`` for norm scales.

    Raises:
        ValueError: for a quantization type ``gguf.quants`` cannot dequantize.
    """
    from gguf.quants import dequantize

    try:
        arr = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ValueError(
            f"GGUF tensor {tensor.name!r}: quantization {tensor.tensor_type.name} is not supported "
            f"by gguf.quants.dequantize ({e}); re-export the model with a supported type"
        ) from e
    shape = tuple(int(d) for d in reversed(tensor.shape))
    # F32 comes back as a view of the read-only memmap: copy so torch owns writable memory.
    out = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True).reshape(shape))
    return out


@dataclass
class GGUFLlamaConfig:
    """Hyper-parameters of a llama-architecture GGUF, named as torchtune's builders name them.

    ``head_dim = embed_dim // num_heads``; ``tie_word_embeddings`` is True when the file has no
    ``output.weight`` (the LM head reuses ``token_embd.weight``).
    """

    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int
    norm_eps: float
    rope_base: float
    tie_word_embeddings: bool
    head_dim: int = field(init=False)
    name: str = ""

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embedding_length {self.embed_dim} is not divisible by head_count {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"head_count {self.num_heads} is not divisible by head_count_kv {self.num_kv_heads}")
        self.head_dim = self.embed_dim // self.num_heads

    @classmethod
    def from_metadata(cls, meta: Dict[str, Any], tensor_names: List[str]) -> "GGUFLlamaConfig":
        """Read the ``llama.*`` keys. Raises ValueError for another architecture or scaled RoPE."""
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"general.architecture is {arch!r}; only 'llama' GGUF files are supported")

        def need(key: str):
            if key not in meta:
                raise ValueError(f"GGUF metadata lacks {key!r}, which a llama model must have")
            return meta[key]

        scaling = meta.get("llama.rope.scaling.type")
        if scaling not in (None, "none") or "rope_freqs.weight" in tensor_names:
            raise ValueError(
                f"GGUF uses scaled RoPE (llama.rope.scaling.type={scaling!r}); only plain RoPE is supported"
            )
        head_count = int(need("llama.attention.head_count"))
        embed = int(need("llama.embedding_length"))
        rope_dim = meta.get("llama.rope.dimension_count")
        if rope_dim is not None and int(rope_dim) != embed // head_count:
            raise ValueError(
                f"llama.rope.dimension_count={rope_dim} != head_dim={embed // head_count}: partial RoPE is not supported"
            )
        vocab = meta.get("llama.vocab_size")
        if vocab is None:
            vocab = len(need("tokenizer.ggml.tokens"))
        # float32 in the file (1e-5 is stored as 9.9999997e-06): round to the shortest repr.
        eps = float(str(np.float32(need("llama.attention.layer_norm_rms_epsilon"))))
        return cls(
            vocab_size=int(vocab),
            num_layers=int(need("llama.block_count")),
            num_heads=head_count,
            num_kv_heads=int(meta.get("llama.attention.head_count_kv", head_count)),
            embed_dim=embed,
            intermediate_dim=int(need("llama.feed_forward_length")),
            max_seq_len=int(need("llama.context_length")),
            norm_eps=eps,
            rope_base=float(meta.get("llama.rope.freq_base", 10000.0)),
            tie_word_embeddings="output.weight" not in tensor_names,
            name=str(meta.get("general.name", "")),
        )

    def expected_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """torchtune key -> shape, for every tensor the model needs."""
        d, h, kv, hd, f = self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_dim
        shapes: Dict[str, Tuple[int, ...]] = {"tok_embeddings.weight": (self.vocab_size, d), "norm.scale": (d,)}
        if not self.tie_word_embeddings:
            shapes["output.weight"] = (self.vocab_size, d)
        for i in range(self.num_layers):
            p = f"layers.{i}."
            shapes.update(
                {
                    p + "sa_norm.scale": (d,),
                    p + "attn.q_proj.weight": (h * hd, d),
                    p + "attn.k_proj.weight": (kv * hd, d),
                    p + "attn.v_proj.weight": (kv * hd, d),
                    p + "attn.output_proj.weight": (d, h * hd),
                    p + "mlp_norm.scale": (d,),
                    p + "mlp.w1.weight": (f, d),
                    p + "mlp.w2.weight": (d, f),
                    p + "mlp.w3.weight": (f, d),
                }
            )
        return shapes

    def to_hf_config(self, *, bos_token_id: Optional[int], eos_token_id: Optional[int],
                     pad_token_id: Optional[int], torch_dtype: str = "float32") -> Dict[str, Any]:
        """``config.json`` for ``LlamaForCausalLM`` (the fields torchtune's checkpointer and
        transformers read)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.embed_dim,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_dim,
            "max_position_embeddings": self.max_seq_len,
            "mlp_bias": False,
            "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads,
            "pretraining_tp": 1,
            "rms_norm_eps": self.norm_eps,
            "rope_scaling": None,
            "rope_theta": self.rope_base,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": torch_dtype,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }


def _iter_tensors(reader, progress: bool) -> Iterator:
    tensors = list(reader.tensors)
    if progress:
        from tqdm.auto import tqdm

        return iter(tqdm(tensors, desc="dequantize GGUF", unit="tensor"))
    return iter(tensors)


def load_gguf_state_dict(
    path_or_reader, *, progress: bool = False
) -> Tuple[Dict[str, torch.Tensor], GGUFLlamaConfig]:
    """Dequantize every tensor of a llama GGUF into a torchtune state dict (fp32).

    No q/k permutation is applied: GGUF already stores ``W_q``/``W_k`` in the interleaved-RoPE
    layout torchtune's ``MultiHeadAttention`` + ``RotaryPositionalEmbeddings`` use (see the module
    docstring). The result loads with ``strict=True`` into a decoder built from the returned
    config (``fastrm.models.smollm2.smollm2`` with these hyper-parameters).

    Returns:
        (state_dict, config): ``state_dict`` maps torchtune keys to fp32 tensors of the shapes in
        ``config.expected_shapes()``.

    Raises:
        ValueError: unknown tensor names, duplicate names, missing tensors, or shape mismatches
            (every tensor in the file must be used; nothing is dropped silently).
    """
    reader = gguf_reader(path_or_reader) if isinstance(path_or_reader, (str, Path)) else path_or_reader
    meta = read_gguf_metadata(reader)
    names = [t.name for t in reader.tensors]
    config = GGUFLlamaConfig.from_metadata(meta, names)
    expected = config.expected_shapes()
    state: Dict[str, torch.Tensor] = {}
    for t in _iter_tensors(reader, progress):
        key = gguf_to_tune_key(t.name)
        if key in state:
            raise ValueError(f"GGUF tensor {t.name!r} appears twice")
        if key not in expected:
            raise ValueError(f"GGUF tensor {t.name!r} ({key}) is not part of a {config.num_layers}-layer model")
        value = dequantize_gguf_tensor(t)
        if tuple(value.shape) != expected[key]:
            raise ValueError(f"GGUF tensor {t.name!r} has shape {tuple(value.shape)}, expected {expected[key]}")
        state[key] = value
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"GGUF file lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}")
    return state, config


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


@dataclass
class GGUFTokenizerSpec:
    """The tokenizer part of GGUF metadata (``tokenizer.ggml.*`` and ``tokenizer.chat_template``)."""

    tokens: List[str]
    token_types: List[int]
    merges: List[str]
    pre: str
    bos_id: Optional[int]
    eos_id: Optional[int]
    pad_id: Optional[int]
    unk_id: Optional[int]
    add_bos: bool
    add_eos: bool
    chat_template: Optional[str]
    model_max_length: int

    @classmethod
    def from_metadata(cls, meta: Dict[str, Any]) -> "GGUFTokenizerSpec":
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') tokenizers are supported"
            )
        tokens = list(meta["tokenizer.ggml.tokens"])
        types = list(meta.get("tokenizer.ggml.token_type", [_TOKEN_TYPE_NORMAL] * len(tokens)))
        if len(types) != len(tokens):
            raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")

        def opt_id(key: str) -> Optional[int]:
            v = meta.get(key)
            return None if v is None else int(v)

        return cls(
            tokens=tokens,
            token_types=[int(t) for t in types],
            merges=list(meta.get("tokenizer.ggml.merges", [])),
            pre=str(meta.get("tokenizer.ggml.pre", "default")),
            bos_id=opt_id("tokenizer.ggml.bos_token_id"),
            eos_id=opt_id("tokenizer.ggml.eos_token_id"),
            pad_id=opt_id("tokenizer.ggml.padding_token_id"),
            unk_id=opt_id("tokenizer.ggml.unknown_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
            model_max_length=int(meta.get("llama.context_length", 2048)),
        )

    @property
    def special_ids(self) -> List[int]:
        """Ids of control / user-defined tokens (matched whole in text, never split by BPE)."""
        return [i for i, t in enumerate(self.token_types) if t in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)]

    def token(self, idx: Optional[int]) -> Optional[str]:
        return None if idx is None else self.tokens[idx]


def build_hf_tokenizer(spec: GGUFTokenizerSpec):
    """A ``tokenizers.Tokenizer`` equivalent to llama.cpp's tokenizer for this vocabulary.

    Byte-level BPE: the vocabulary and merge ranks come from the GGUF; the pre-tokenizer is
    chosen from ``tokenizer.ggml.pre`` the way llama.cpp chooses its regex list (for ``smollm``:
    every digit is its own piece, then GPT-2's regex); control tokens (``<|im_start|>`` ...) are
    added as special tokens so they are matched whole and never merged with neighbours.

    Raises:
        ValueError: duplicate vocabulary entries, malformed merges, or an unknown pre-tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(spec.tokens)}
    if len(vocab) != len(spec.tokens):
        raise ValueError(f"tokenizer.ggml.tokens has {len(spec.tokens) - len(vocab)} duplicate entries")
    merges: List[Tuple[str, str]] = []
    for rank, m in enumerate(spec.merges):
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"tokenizer.ggml.merges[{rank}] = {m!r} is not two space-separated symbols")
        merges.append((parts[0], parts[1]))

    if spec.pre in _PRE_DIGITS_THEN_GPT2:
        pre = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif spec.pre in _PRE_GPT2:
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise ValueError(
            f"tokenizer.ggml.pre={spec.pre!r} is not supported; known: "
            f"{sorted(_PRE_DIGITS_THEN_GPT2 | _PRE_GPT2)}"
        )

    # Byte-level BPE covers every byte, so there is no unknown token inside the model.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(
        [AddedToken(spec.tokens[i], special=True, normalized=False, lstrip=False, rstrip=False)
         for i in spec.special_ids]
    )
    return tok


def hf_tokenizer_config(spec: GGUFTokenizerSpec) -> Dict[str, Any]:
    """``tokenizer_config.json`` (transformers ``PreTrainedTokenizerFast`` fields)."""
    added = {
        str(i): {"content": spec.tokens[i], "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i in spec.special_ids
    }
    extra = [t for t in (spec.token(spec.bos_id), spec.token(spec.eos_id)) if t is not None]
    cfg: Dict[str, Any] = {
        "add_bos_token": spec.add_bos,
        "add_eos_token": spec.add_eos,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(dict.fromkeys(extra)),
        "bos_token": spec.token(spec.bos_id),
        "eos_token": spec.token(spec.eos_id),
        "pad_token": spec.token(spec.pad_id),
        "unk_token": spec.token(spec.unk_id),
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.model_max_length,
        # the generic class: transformers 5 then loads tokenizer.json as it is. Model-specific
        # classes rebuild the pipeline; GPT2Tokenizer would drop SmolLM2's Digits pre-tokenizer
        "tokenizer_class": "PreTrainedTokenizerFast",
        "vocab_size": len(spec.tokens),
    }
    if spec.chat_template:
        cfg["chat_template"] = spec.chat_template
    return cfg


# --------------------------------------------------------------------------------------------
# Whole conversion
# --------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def convert_gguf_to_hf(
    gguf_path: PathLike,
    output_dir: PathLike,
    *,
    dtype: str = "float32",
    progress: bool = True,
) -> List[Path]:
    """Write a GGUF llama model as an HF checkpoint directory (see the module docstring).

    Weights: ``load_gguf_state_dict`` (torchtune keys, interleaved q/k) ->
    ``torchtune.models.convert_weights.tune_to_hf`` (HF keys, q/k rows permuted to the
    rotate-halves layout) -> ``model.safetensors``. Tied models get no ``lm_head.weight`` (as in
    the HF originals); torchtune's ``TiedLinear`` and transformers' ``tie_word_embeddings`` both
    rebuild it from the embedding.

    Args:
        gguf_path: the ``.gguf`` file.
        output_dir: directory to write into (created; existing files of the same names are
            overwritten).
        dtype: ``"float32"`` (default; exact dequantized values), ``"bfloat16"`` or ``"float16"``.
        progress: show a tqdm bar while dequantizing.

    Returns:
        The paths written.

    Raises:
        ValueError: unsupported architecture / tokenizer / quantization, or a bad ``dtype``.
    """
    from safetensors.torch import save_file
    from torchtune.models import convert_weights

    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {sorted(_DTYPES)}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = gguf_reader(gguf_path)
    meta = read_gguf_metadata(reader)
    state, config = load_gguf_state_dict(reader, progress=progress)
    spec = GGUFTokenizerSpec.from_metadata(meta)
    if len(spec.tokens) != config.vocab_size:
        raise ValueError(f"tokenizer has {len(spec.tokens)} tokens but the model's vocab_size is {config.vocab_size}")

    hf_state = convert_weights.tune_to_hf(
        state,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        dim=config.embed_dim,
        head_dim=config.head_dim,
    )
    hf_state = {k: v.to(_DTYPES[dtype]).contiguous() for k, v in hf_state.items()}
    written: List[Path] = []

    path = out / "model.safetensors"
    save_file(hf_state, str(path), metadata={"format": "pt"})
    written.append(path)

    def dump(name: str, obj: Dict[str, Any]) -> None:
        p = out / name
        p.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        written.append(p)

    dump("config.json", config.to_hf_config(bos_token_id=spec.bos_id, eos_token_id=spec.eos_id,
                                             pad_token_id=spec.pad_id, torch_dtype=dtype))
    gen = {"bos_token_id": spec.bos_id, "eos_token_id": spec.eos_id}
    if spec.pad_id is not None:
        gen["pad_token_id"] = spec.pad_id
    dump("generation_config.json", gen)

    tok = build_hf_tokenizer(spec)
    path = out / "tokenizer.json"
    tok.save(str(path))
    written.append(path)
    tcfg = hf_tokenizer_config(spec)
    dump("tokenizer_config.json", tcfg)
    dump(
        "special_tokens_map.json",
        {k: tcfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token", "additional_special_tokens")
         if tcfg.get(k) is not None},
    )
    return written
