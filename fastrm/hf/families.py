"""HF model families fastrm trains and exports: ``config.json`` -> torchtune decoder builder,
HF <-> torchtune state-dict keys, and the ``*ForSequenceClassification`` class.

=========  =============================  ==============================================  ==========
family     HF ``model_type``              decoder builder (torchtune modules)             keys
=========  =============================  ==============================================  ==========
llama      ``llama`` (Llama 2, 3, 3.x)    :func:`llama`: interleaved RoPE (Llama 3.1        q/k permuted
           ``mistral``                    frequency scaling when the config asks)          (torchtune's
                                                                                           convention)
qwen2      ``qwen2`` (Qwen2, Qwen2.5)     :func:`qwen2`: q/k/v biases, half-split RoPE     plain rename
qwen3      ``qwen3``                      :func:`qwen3`: per-head q/k RMSNorm before RoPE  plain rename
gemma      ``gemma``                      torchtune's ``gemma`` builder (scaled             q/k permuted
                                          embeddings, ``1 + w`` norms, GELU MLP)
=========  =============================  ==============================================  ==========

A fastrm reward model is ``RewardModel(decoder).state_dict()``: ``decoder.<torchtune key>`` and
``head.weight [1, D]``. The HF reward model is ``<Family>ForSequenceClassification``:
``model.<HF key>`` and ``score.weight [1, D]`` (no bias, no ``lm_head``). :func:`to_hf` and
:func:`from_hf` convert between the two; :func:`check_conversion` proves, on the keys and shapes
of a real model (meta tensors, no copies), that the round trip is exact and that transformers'
class expects exactly the exported keys. Anything else (another ``model_type``, rope scaling
other than Llama 3's, llama attention biases, sliding windows shorter than the context) is
refused with an error naming it.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

__all__ = ["Family", "FAMILIES", "check_conversion", "decoder_kwargs", "family_for", "from_hf",
           "gemma", "llama", "qwen2", "qwen3", "read_config", "to_hf"]

HEAD_KEY = "head.weight"
SCORE_KEY = "score.weight"


# ------------------------------------------------------------------------------ builders
def _rope(kind: str, head_dim: int, max_seq_len: int, rope_base: float,
          rope_scaling: Optional[Mapping[str, Any]]) -> nn.Module:
    if kind == "half":
        from torchtune.models.qwen2._positional_embeddings import Qwen2RotaryPositionalEmbeddings

        return Qwen2RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=max_seq_len, base=rope_base)
    if rope_scaling:
        from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE

        return Llama3ScaledRoPE(dim=head_dim, max_seq_len=max_seq_len, base=rope_base,
                                scale_factor=rope_scaling["factor"],
                                low_freq_factor=rope_scaling["low_freq_factor"],
                                high_freq_factor=rope_scaling["high_freq_factor"],
                                old_context_len=rope_scaling["original_max_position_embeddings"])
    from torchtune.modules import RotaryPositionalEmbeddings

    return RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=max_seq_len, base=rope_base)


class HeadNormedLinear(nn.Linear):
    """``x @ W.T (+ b)`` then an RMSNorm over each head's ``head_dim`` slice: Qwen3's q / k
    projection + ``q_norm`` / ``k_norm``. Qwen3 normalizes *before* RoPE, while torchtune 0.6's
    ``MultiHeadAttention.q_norm`` runs after it (the two differ: the norm's weight is not
    rotation invariant), so the norm lives in the projection. Keys: ``weight`` (+ ``bias``),
    ``norm.scale``."""

    def __init__(self, in_features: int, num_heads: int, head_dim: int, eps: float,
                 bias: bool = False) -> None:
        from torchtune.modules import RMSNorm

        super().__init__(in_features, num_heads * head_dim, bias=bias)
        self.head_dim = head_dim
        self.norm = RMSNorm(head_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        shape = y.shape
        return self.norm(y.view(*shape[:-1], -1, self.head_dim)).view(shape)


def _decoder(*, vocab_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
             embed_dim: int, intermediate_dim: int, max_seq_len: int, head_dim: Optional[int],
             norm_eps: float, rope_base: float, tie_word_embeddings: bool, rope: str,
             rope_scaling: Optional[Mapping[str, Any]] = None, qkv_bias: bool = False,
             qk_norm: bool = False, attn_dropout: float = 0.0):
    from torchtune.modules import (FeedForward, MultiHeadAttention, RMSNorm, TiedLinear,
                                   TransformerDecoder, TransformerSelfAttentionLayer)

    head_dim = head_dim or embed_dim // num_heads
    pos = _rope(rope, head_dim, max_seq_len, rope_base, rope_scaling)  # one cache for all layers
    layers = nn.ModuleList()
    for _ in range(num_layers):
        if qk_norm:
            q = HeadNormedLinear(embed_dim, num_heads, head_dim, norm_eps, bias=qkv_bias)
            k = HeadNormedLinear(embed_dim, num_kv_heads, head_dim, norm_eps, bias=qkv_bias)
        else:
            q = nn.Linear(embed_dim, num_heads * head_dim, bias=qkv_bias)
            k = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=qkv_bias)
        attn = MultiHeadAttention(
            embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            q_proj=q, k_proj=k, v_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=qkv_bias),
            output_proj=nn.Linear(num_heads * head_dim, embed_dim, bias=False),
            pos_embeddings=pos, max_seq_len=max_seq_len, attn_dropout=attn_dropout)
        mlp = FeedForward(gate_proj=nn.Linear(embed_dim, intermediate_dim, bias=False),
                          down_proj=nn.Linear(intermediate_dim, embed_dim, bias=False),
                          up_proj=nn.Linear(embed_dim, intermediate_dim, bias=False))
        layers.append(TransformerSelfAttentionLayer(
            attn=attn, mlp=mlp, sa_norm=RMSNorm(embed_dim, eps=norm_eps),
            mlp_norm=RMSNorm(embed_dim, eps=norm_eps)))
    emb = nn.Embedding(vocab_size, embed_dim)
    out = TiedLinear(emb) if tie_word_embeddings else nn.Linear(embed_dim, vocab_size, bias=False)
    return TransformerDecoder(tok_embeddings=emb, layers=layers, max_seq_len=max_seq_len,
                              num_heads=num_heads, head_dim=head_dim,
                              norm=RMSNorm(embed_dim, eps=norm_eps), output=out)


def llama(*, vocab_size: int, num_layers: int, num_heads: int, num_kv_heads: int, embed_dim: int,
          intermediate_dim: int, max_seq_len: int, head_dim: Optional[int] = None,
          norm_eps: float = 1e-5, rope_base: float = 10_000.0,
          rope_scaling: Optional[Mapping[str, Any]] = None, tie_word_embeddings: bool = False,
          attn_dropout: float = 0.0):
    """Llama 2 / 3 / 3.x and Mistral decoder (torchtune modules, interleaved RoPE, so the q / k
    weights are in torchtune's permuted layout). ``rope_scaling``: Llama 3.1's ``{factor,
    low_freq_factor, high_freq_factor, original_max_position_embeddings}`` or None."""
    return _decoder(vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads,
                    num_kv_heads=num_kv_heads, embed_dim=embed_dim,
                    intermediate_dim=intermediate_dim, max_seq_len=max_seq_len, head_dim=head_dim,
                    norm_eps=norm_eps, rope_base=rope_base, rope_scaling=rope_scaling,
                    tie_word_embeddings=tie_word_embeddings, rope="interleaved",
                    attn_dropout=attn_dropout)


def qwen2(*, vocab_size: int, num_layers: int, num_heads: int, num_kv_heads: int, embed_dim: int,
          intermediate_dim: int, max_seq_len: int, head_dim: Optional[int] = None,
          norm_eps: float = 1e-6, rope_base: float = 1_000_000.0,
          tie_word_embeddings: bool = False, attn_dropout: float = 0.0):
    """Qwen2 / Qwen2.5 decoder: q / k / v biases, half-split RoPE (HF's layout, no permutation)."""
    return _decoder(vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads,
                    num_kv_heads=num_kv_heads, embed_dim=embed_dim,
                    intermediate_dim=intermediate_dim, max_seq_len=max_seq_len, head_dim=head_dim,
                    norm_eps=norm_eps, rope_base=rope_base, tie_word_embeddings=tie_word_embeddings,
                    rope="half", qkv_bias=True, attn_dropout=attn_dropout)


def qwen3(*, vocab_size: int, num_layers: int, num_heads: int, num_kv_heads: int, embed_dim: int,
          intermediate_dim: int, max_seq_len: int, head_dim: int, norm_eps: float = 1e-6,
          rope_base: float = 1_000_000.0, tie_word_embeddings: bool = False,
          attention_bias: bool = False, attn_dropout: float = 0.0):
    """Qwen3 decoder: per-head q / k RMSNorm before half-split RoPE (:class:`HeadNormedLinear`);
    ``head_dim`` is independent of ``embed_dim / num_heads``."""
    return _decoder(vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads,
                    num_kv_heads=num_kv_heads, embed_dim=embed_dim,
                    intermediate_dim=intermediate_dim, max_seq_len=max_seq_len, head_dim=head_dim,
                    norm_eps=norm_eps, rope_base=rope_base, tie_word_embeddings=tie_word_embeddings,
                    rope="half", qkv_bias=attention_bias, qk_norm=True, attn_dropout=attn_dropout)


def gemma(*, vocab_size: int, num_layers: int, num_heads: int, num_kv_heads: int, embed_dim: int,
          intermediate_dim: int, max_seq_len: int, head_dim: int, norm_eps: float = 1e-6,
          rope_base: float = 10_000.0, tie_word_embeddings: bool = True, attn_dropout: float = 0.0):
    """Gemma (1) decoder: torchtune's ``gemma`` component builder (tied embeddings only)."""
    if not tie_word_embeddings:
        raise ValueError("gemma with tie_word_embeddings=False: torchtune's gemma builder ties "
                         "the LM head to the embeddings; untied gemma models are not supported")
    from torchtune.models.gemma import gemma as tt_gemma

    return tt_gemma(vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads,
                    head_dim=head_dim, num_kv_heads=num_kv_heads, embed_dim=embed_dim,
                    intermediate_dim=intermediate_dim, max_seq_len=max_seq_len,
                    attn_dropout=attn_dropout, norm_eps=norm_eps, rope_base=rope_base)


# ------------------------------------------------------------------------------ keys
_QWEN3_FROM_HF = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attn.q_proj.bias",
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_proj.norm.scale",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attn.k_proj.bias",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_proj.norm.scale",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attn.v_proj.bias",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.output_proj.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w2.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.sa_norm.scale",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
}


def _rename(sd: Mapping[str, torch.Tensor], mapping: Mapping[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        abstract = re.sub(r"\.(\d+)\.", ".{}.", key, count=1)
        if abstract not in mapping:
            raise KeyError(f"unexpected key {key!r}")
        layer = re.search(r"\.(\d+)\.", key)
        out[mapping[abstract].format(layer.group(1)) if layer else mapping[abstract]] = value
    return out


def _dims(c: Mapping[str, Any]) -> dict[str, Any]:
    return dict(num_heads=c["num_attention_heads"],
                num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                dim=c["hidden_size"], head_dim=c.get("head_dim"))


def _permuted_hf_to_tune(sd, c):
    from torchtune.models.convert_weights import hf_to_tune

    return hf_to_tune(dict(sd), **_dims(c))


def _permuted_tune_to_hf(sd, c):
    from torchtune.models.convert_weights import tune_to_hf

    return tune_to_hf(dict(sd), **_dims(c))


def _qwen2_hf_to_tune(sd, c):
    from torchtune.models.qwen2._convert_weights import _FROM_HF

    return _rename(sd, _FROM_HF)


def _qwen2_tune_to_hf(sd, c):
    from torchtune.models.qwen2._convert_weights import _FROM_HF

    return _rename(sd, {v: k for k, v in _FROM_HF.items() if v is not None})


def _qwen3_hf_to_tune(sd, c):
    return _rename(sd, _QWEN3_FROM_HF)


def _qwen3_tune_to_hf(sd, c):
    return _rename(sd, {v: k for k, v in _QWEN3_FROM_HF.items()})


# ------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Family:
    """One HF model family.

    Attributes:
        name: fastrm's name (``llama``, ``qwen2``, ``qwen3``, ``gemma``).
        model_types: HF ``model_type`` values it reads.
        builder: dotted path of the decoder builder (for configs).
        hf_to_tune / tune_to_hf: ``(state_dict, config) -> state_dict`` for the decoder keys
            (``model.*`` / ``lm_head.weight`` <-> torchtune names).
        torchtune_model_type: the ``ModelType`` torchtune's ``FullModelHFCheckpointer`` uses
            for this family (None: torchtune 0.6 has none).
    """

    name: str
    model_types: tuple[str, ...]
    builder: str
    hf_to_tune: Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], dict]
    tune_to_hf: Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], dict]
    torchtune_model_type: Optional[str]

    def builder_fn(self) -> Callable[..., nn.Module]:
        return globals()[self.builder.rsplit(".", 1)[1]]

    def classification_class(self, config: Mapping[str, Any]) -> str:
        """``<Family>ForSequenceClassification`` for ``config``'s ``model_type``."""
        return {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
                "gemma": "Gemma"}[config["model_type"]] + "ForSequenceClassification"


FAMILIES: dict[str, Family] = {
    f.name: f for f in (
        Family("llama", ("llama", "mistral"), "fastrm.hf.families.llama", _permuted_hf_to_tune,
               _permuted_tune_to_hf, "LLAMA3"),
        Family("qwen2", ("qwen2",), "fastrm.hf.families.qwen2", _qwen2_hf_to_tune,
               _qwen2_tune_to_hf, "QWEN2"),
        Family("qwen3", ("qwen3",), "fastrm.hf.families.qwen3", _qwen3_hf_to_tune,
               _qwen3_tune_to_hf, None),
        Family("gemma", ("gemma",), "fastrm.hf.families.gemma", _permuted_hf_to_tune,
               _permuted_tune_to_hf, "GEMMA"),
    )
}


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of an HF model directory (or the file itself)."""
    p = Path(path).expanduser()
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist: pass an HF model directory (config.json + "
                                "model.safetensors)")
    return json.loads(p.read_text())


def family_for(config: Mapping[str, Any]) -> Family:
    """The :class:`Family` of an HF ``config.json`` (ValueError naming what is unsupported)."""
    mt = config.get("model_type")
    for fam in FAMILIES.values():
        if mt in fam.model_types:
            return fam
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(
        f"HF model_type {mt!r} (architectures {config.get('architectures')}) is not supported by "
        f"fastrm; supported model_type values: {known}. A new family needs a torchtune decoder "
        "builder and its HF key mapping in fastrm/hf/families.py")


def _rope_params(c: Mapping[str, Any]) -> tuple[float, Optional[dict]]:
    params = dict(c.get("rope_parameters") or {})
    scaling = c.get("rope_scaling") or None
    theta = c.get("rope_theta", params.get("rope_theta"))
    if theta is None:
        theta = 10_000.0
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            raise ValueError(f"rope scaling type {kind!r} is not supported (fastrm implements "
                             "Llama 3.1's 'llama3' scaling through torchtune's Llama3ScaledRoPE)")
        else:
            scaling = {k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                               "original_max_position_embeddings")}
    return float(theta), scaling


def decoder_kwargs(config: Mapping[str, Any], max_seq_len: Optional[int] = None) -> dict[str, Any]:
    """The family builder's keyword arguments from an HF ``config.json`` (what ``fastrm init``
    writes into ``model:``). ``max_seq_len`` sizes the RoPE cache (default the config's
    ``max_position_embeddings``)."""
    fam = family_for(config)
    c = config
    if c.get("mlp_bias"):
        raise ValueError(f"{c['model_type']} with mlp_bias=True is not supported")
    if fam.name == "llama" and c.get("attention_bias"):
        raise ValueError("llama/mistral with attention_bias=True is not supported (the q / k "
                         "permutation of torchtune's layout is not defined for biases)")
    act = c.get("hidden_act") or c.get("hidden_activation")
    want = "gelu_pytorch_tanh" if fam.name == "gemma" else "silu"
    if act is not None and act != want and not (fam.name == "gemma" and act == "gelu"):
        raise ValueError(f"{c['model_type']} with hidden_act={act!r} is not supported (expected {want!r})")
    window = c.get("sliding_window")
    seq = int(max_seq_len or c.get("max_position_embeddings") or 4096)
    if window and (c.get("use_sliding_window", True) and window < seq):
        if c["model_type"] == "mistral":
            # sequences up to the window attend exactly as in HF; longer ones would differ
            seq = int(window)
        else:
            raise ValueError(f"{c['model_type']} with sliding_window={window} < {seq} is not supported")
    theta, scaling = _rope_params(c)
    kw: dict[str, Any] = dict(
        vocab_size=int(c["vocab_size"]), num_layers=int(c["num_hidden_layers"]),
        num_heads=int(c["num_attention_heads"]),
        num_kv_heads=int(c.get("num_key_value_heads") or c["num_attention_heads"]),
        embed_dim=int(c["hidden_size"]), intermediate_dim=int(c["intermediate_size"]),
        max_seq_len=seq, head_dim=int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_base=theta,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", fam.name == "gemma")),
    )
    if fam.name == "llama":
        kw["rope_scaling"] = scaling
    elif scaling is not None:
        raise ValueError(f"{c['model_type']} with rope scaling {scaling} is not supported")
    if fam.name == "qwen3":
        kw["attention_bias"] = bool(c.get("attention_bias", False))
    return kw


def build_decoder(config: Mapping[str, Any], max_seq_len: Optional[int] = None) -> nn.Module:
    """The torchtune decoder of an HF ``config.json``."""
    return family_for(config).builder_fn()(**decoder_kwargs(config, max_seq_len))


# ------------------------------------------------------------------------------ conversion
def to_hf(model_sd: Mapping[str, torch.Tensor], config: Mapping[str, Any], *,
          partial: bool = False) -> dict[str, torch.Tensor]:
    """fastrm :class:`~fastrm.models.RewardModel` state dict (``decoder.*``, ``head.weight``)
    -> ``<Family>ForSequenceClassification`` state dict (``model.*``, ``score.weight``).
    Every key converts on its own (renames, per-tensor q / k permutations), so ``partial=True``
    converts any part of the state dict (one layer while streaming an export,
    :func:`fastrm.hf.export.iter_hf_tensors`) without requiring ``head.weight``."""
    fam = family_for(config)
    dec = {k[len("decoder."):]: v for k, v in model_sd.items() if k.startswith("decoder.")}
    other = set(model_sd) - {k for k in model_sd if k.startswith("decoder.")} - {HEAD_KEY}
    if other:
        raise ValueError(f"unexpected keys in the reward model state dict: {sorted(other)[:5]}")
    if HEAD_KEY not in model_sd and not partial:
        raise ValueError("the reward model state dict has no head.weight")
    try:
        hf = fam.tune_to_hf(dec, config)
    except Exception as err:  # torchtune's key mapping raises a bare Exception
        raise ValueError(f"{fam.name}: a torchtune key has no HF name ({err}); the model does "
                         f"not match the {fam.name} family of config.json") from None
    hf.pop("lm_head.weight", None)
    if HEAD_KEY in model_sd:
        hf[SCORE_KEY] = model_sd[HEAD_KEY].reshape(1, -1)
    return hf


def from_hf(hf_sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_hf`; also reads a causal LM (``lm_head.weight`` dropped, no head key)
    and ``score.bias`` when it is zero (a non-zero bias is an error: fastrm heads are bias-free)."""
    fam = family_for(config)
    sd = dict(hf_sd)
    score = sd.pop(SCORE_KEY, None)
    bias = sd.pop("score.bias", None)
    if bias is not None and bool(torch.count_nonzero(bias.detach().float())):
        raise ValueError("score.bias is non-zero: fastrm reward heads have no bias (as HF's "
                         "score); a bias shifts every reward and cancels in pairwise losses, drop it "
                         "from the checkpoint if that is intended")
    sd.pop("lm_head.weight", None)
    sd = {k: v for k, v in sd.items() if "rotary_emb.inv_freq" not in k}
    try:
        dec = fam.hf_to_tune(sd, config)
    except Exception as err:  # torchtune's key mapping raises a bare Exception
        raise ValueError(f"{fam.name}: an HF key does not fit model_type "
                         f"{config.get('model_type')!r} ({err})") from None
    out = {f"decoder.{k}": v for k, v in dec.items()}
    if score is not None:
        if score.shape[0] != 1:
            raise ValueError(f"score.weight has shape {tuple(score.shape)}: a reward model has "
                             "num_labels=1 (one score per sequence)")
        out[HEAD_KEY] = score
    return out


def hf_expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Keys and shapes transformers' ``<Family>ForSequenceClassification`` has for ``config``
    (built on the meta device: no memory)."""
    import transformers

    cfg = dict(config)
    cls_name = family_for(cfg).classification_class(cfg)
    cfg.update(num_labels=1, id2label={0: "LABEL_0"}, label2id={"LABEL_0": 0})
    cfg.pop("architectures", None)
    hf_config = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = getattr(transformers, cls_name)(hf_config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_conversion(model_sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    """Proves, on the real keys and shapes of ``model_sd`` (a fastrm reward model state dict;
    tensors are replaced by meta tensors, nothing is copied), that saving will work: the
    HF keys are exactly those of transformers' ``<Family>ForSequenceClassification`` with the
    same shapes, and converting back gives the original keys and shapes. Raises ValueError
    naming the keys that differ (run at ``setup()``, before any training)."""
    meta = {k: torch.empty(tuple(v.shape), device="meta") for k, v in model_sd.items()}
    # LoRA adapters are merged into their base weights before the export
    merged = {k: v for k, v in meta.items() if "lora_" not in k and not k.endswith("magnitude")}
    hf = to_hf(merged, config)
    want = hf_expected_shapes(config)
    want.pop("lm_head.weight", None)
    got = {k: tuple(v.shape) for k, v in hf.items()}
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or unexpected or wrong:
        raise ValueError(
            f"the {family_for(config).name} conversion does not give an HF "
            f"{family_for(config).classification_class(config)}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatch "
            f"{[(k, got[k], want[k]) for k in wrong[:3]]}; the model does not match config.json")
    back = from_hf(hf, config)
    diff = set(back) ^ set(merged)
    bad = [k for k in set(back) & set(merged) if tuple(back[k].shape) != tuple(merged[k].shape)]
    if diff or bad:
        raise ValueError(f"HF -> torchtune conversion is not the inverse: keys {sorted(diff)[:5]}, "
                         f"shapes {sorted(bad)[:5]}")
