"""Shared plumbing of fastrm's benchmark scripts: machine description, thread pinning, the
measured matmul rate, model specs, analytic FLOP counts, resident-memory probes, the AdamW the
TRL comparison uses on both sides, statistics, Markdown tables, JSON output and plots.

Nothing here times anything by itself except :func:`matmul_rate`; the scripts (``bench_*.py``,
``run_all.py``) decide what to measure. They import it as ``common`` (the scripts' directory is
on ``sys.path`` when one runs; the tests put it there).

FLOP model (:func:`layout_flops`), forward + backward = 3x forward (the usual rule: the backward
pass costs two forward passes: grads w.r.t. activations and w.r.t. weights):

* linear layers: ``2 * n_lin`` FLOPs per computed token and layer, ``n_lin = D*H*hd + 2*D*Hkv*hd
  + H*hd*D + 3*D*F`` (q, k, v, o projections and the SwiGLU MLP);
* attention: ``4 * H * hd`` FLOPs per attended (query, key) pair (``QK^T`` and ``PV``); a segment
  of ``L`` tokens with a shared prefix of ``P`` tokens attends ``L*P + L(L+1)/2`` pairs; a padded
  row of length ``L_max`` attends ``L_max(L_max+1)/2`` (causal SDPA over the whole padded row);
* reward head ``D -> 1``: ``2*D`` per scored position: every token of the padded batch in the
  padded baseline, one per response in fastrm's fused head;
* the embedding lookup, norms, RoPE, softmax and the loss are not counted (O(T*D), negligible).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------------------------

def _cpuinfo(key: str) -> Optional[str]:
    """The first ``key`` line of ``/proc/cpuinfo`` (``None`` where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_has_bf16() -> Optional[bool]:
    """Whether the CPU has bf16 matmul instructions (AVX-512 BF16 or AMX); ``None`` unknown."""
    flags = _cpuinfo("flags")
    return None if flags is None else bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def utc_now() -> str:
    """The date and time results are stamped with."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def load_average() -> Optional[tuple[float, float, float]]:
    """1, 5 and 15 minute load averages (``None`` where the OS has none)."""
    try:
        return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return None


def machine_info(threads: int, device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on: CPU model, ISA level torch dispatches to, bf16
    instructions, threads, core count, load average, torch / Python versions, GPU name, UTC
    date. Scripts add ``load_average_after`` when they finish."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": cpu_has_bf16(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "load_average_1_5_15": load_average(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "date_utc": utc_now(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One Markdown line naming the machine (for the top of every table)."""
    dev = info.get("gpu") or f"{info['cpu']} ({info['cpu_capability']})"
    load = info.get("load_average_1_5_15")
    load_s = f", load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (1/5/15 min)" if load else ""
    return (f"{dev}, {info['torch_threads']} torch threads of {info['logical_cpus']} logical CPUs"
            f"{load_s}, torch {info['torch']}, measured {info['date_utc']}")


def set_threads(threads: int) -> None:
    """Pins torch's intra-op threads (and OMP's, for code that reads it later)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)


def sync(device: str) -> None:
    """Waits for queued GPU work (a no-op on CPU), so wall-clock times cover the work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_rate(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048,
                repeats: int = 5) -> dict[str, float]:
    """Measured dense matmul rate: ``2 n^3`` FLOPs of ``torch.mm`` of two ``[n, n]`` matrices.

    Returns ``{"n", "median_flops", "max_flops"}`` in FLOP/s (the median over ``repeats`` after
    one warm-up; ``max`` is the best repeat, the closest to the machine's peak under load).
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    torch.mm(a, b)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - t0)
    flops = 2.0 * n ** 3
    return {"n": n, "dtype": str(dtype).replace("torch.", ""),
            "median_flops": flops / statistics.median(times), "max_flops": flops / min(times)}


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """A llama-style decoder shape (torchtune modules) for the benchmarks.

    ``builder`` is ``"llama3"`` (:func:`fastrm.models.tiny_llama3`) or ``"smollm2"``
    (:func:`fastrm.models.smollm2.smollm2`: SmolLM2's RoPE base and tied embeddings).
    """

    name: str
    builder: str
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    description: str = ""

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def linear_params_per_layer(self) -> int:
        d, hd = self.embed_dim, self.head_dim
        return (d * self.num_heads * hd + 2 * d * self.num_kv_heads * hd
                + self.num_heads * hd * d + 3 * d * self.intermediate_dim)

    def num_params(self) -> int:
        """Parameters of the reward model (embedding + layers + norms + ``D -> 1`` head)."""
        d = self.embed_dim
        return (self.vocab_size * d + self.num_layers * (self.linear_params_per_layer + 2 * d)
                + d + d + 1)

    def as_dict(self) -> dict:
        return {**asdict(self), "head_dim": self.head_dim, "params": self.num_params()}


#: Model sizes of the end-to-end benchmark. Both use SmolLM2's vocabulary (49152) so the same
#: tokenized data feeds both. Random init (seeded): speed does not depend on the weights.
MODELS: dict[str, ModelSpec] = {
    "llama-4L-256": ModelSpec(
        "llama-4L-256", "llama3", 49152, 4, 4, 2, 256, 768,
        "4-layer Llama 3 block, D=256, 4/2 heads, MLP 768"),
    "smollm2-8L": ModelSpec(
        "smollm2-8L", "smollm2", 49152, 8, 9, 3, 576, 1536,
        "SmolLM2-135M's layer shape (D=576, 9/3 heads, MLP 1536, vocab 49152), 8 of its 30 layers"),
    "smollm2-135m": ModelSpec(
        "smollm2-135m", "smollm2", 49152, 30, 9, 3, 576, 1536,
        "SmolLM2-135M architecture, all 30 layers (random init)"),
}


def build_model(spec: ModelSpec, max_seq_len: int, seed: int, device: str = "cpu",
                dtype: torch.dtype = torch.float32, attention_backend: Optional[str] = None):
    """A :class:`fastrm.models.RewardModel` of ``spec`` with weights drawn from ``seed``."""
    from fastrm.models import reward_model, tiny_llama3

    torch.manual_seed(seed)
    if spec.builder == "llama3":
        dec = tiny_llama3(vocab_size=spec.vocab_size, num_layers=spec.num_layers,
                          num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                          embed_dim=spec.embed_dim, intermediate_dim=spec.intermediate_dim,
                          max_seq_len=max_seq_len)
    elif spec.builder == "smollm2":
        from fastrm.models.smollm2 import smollm2

        dec = smollm2(vocab_size=spec.vocab_size, num_layers=spec.num_layers,
                      num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                      embed_dim=spec.embed_dim, intermediate_dim=spec.intermediate_dim,
                      max_seq_len=max_seq_len)
    else:
        raise ValueError(f"ModelSpec.builder={spec.builder!r}; choose 'llama3' or 'smollm2'")
    model = reward_model(dec, attention_backend=attention_backend)
    return model.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------

def layout_flops(spec: ModelSpec, computed_tokens: int, attended_pairs: int,
                 head_positions: int) -> float:
    """Forward + backward FLOPs of one step (see the module docstring for the model).

    Args:
        computed_tokens: tokens that go through the decoder (padding included).
        attended_pairs: (query, key) pairs attention evaluates, summed over layers' heads once.
        head_positions: positions the ``D -> 1`` reward head is evaluated at.
    """
    per_layer = (2.0 * spec.linear_params_per_layer * computed_tokens
                 + 4.0 * spec.num_heads * spec.head_dim * attended_pairs)
    fwd = spec.num_layers * per_layer + 2.0 * spec.embed_dim * head_positions
    return 3.0 * fwd


def packed_counts(batch) -> tuple[int, int, int]:
    """``(computed tokens, attended pairs, head positions)`` of a :class:`PackedBatch`."""
    lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
    pre = (batch.segment_prefix[:, 1] - batch.segment_prefix[:, 0]).long()
    pairs = int((lens * pre + lens * (lens + 1) // 2).sum())
    return batch.num_tokens, pairs, int(batch.reward_positions.shape[0])


def padded_counts(batch) -> tuple[int, int, int]:
    """``(computed tokens, attended pairs, head positions)`` of a padded ``[N, L]`` batch with
    causal attention over every row and the head over every token."""
    n, L = batch.tokens.shape
    return n * L, n * L * (L + 1) // 2, n * L


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------

#: glibc serves allocations >= this many bytes with mmap and returns them to the OS on free,
#: so resident memory follows live tensors (the default threshold adapts upward to 32 MiB and
#: keeps freed blocks resident, which would hide the next step's peak). Memory workers are
#: started with ``MALLOC_MMAP_THRESHOLD_`` set to it; timing runs are not.
MMAP_THRESHOLD = 65536


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> bool:
    """Resets the kernel's resident high-water mark (``VmHWM``) of this process (Linux >= 4.0,
    ``echo 5 > /proc/self/clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Resident high-water mark since the process started or the last :func:`reset_peak_rss`."""
    return _status_kib("VmHWM") * 1024


def available_memory_bytes() -> int:
    """The machine's ``MemAvailable`` (``/proc/meminfo``); very large where it is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


# --------------------------------------------------------------------------------------------
# optimizer
# --------------------------------------------------------------------------------------------

def make_adamw(params, spec: dict[str, Any]) -> torch.optim.Optimizer:
    """The AdamW of the TRL comparison, built the same way on both sides (``bench_trl.py``'s
    fastrm runs, ``trl_peer.py``'s TRL runs): ``spec`` gives ``lr``, ``betas``, ``eps``,
    ``weight_decay`` and ``adamw``, torch's implementation (``fused``, ``foreach`` or
    ``for-loop``; the update is the same algorithm in each)."""
    impl = spec.get("adamw", "foreach")
    kw = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(params, lr=spec["lr"], betas=tuple(spec["betas"]), eps=spec["eps"],
                             weight_decay=spec["weight_decay"], **kw)


def set_fp32_matmul(spec: dict[str, Any]) -> None:
    """The TRL comparison's fp32 matmul precision on CUDA, the same on both sides: TF32 when
    ``spec["tf32"]`` (an fp32 speed run, as fastrm's recipe runs fp32 on CUDA:
    :func:`fastrm.training.dtype.enable_tf32`), full IEEE fp32 otherwise (the same-work proof,
    whose tolerance is fp32 rounding). Nothing to do on CPU."""
    if spec.get("device", "cpu") != "cuda":
        return
    if spec.get("tf32"):
        from fastrm.training.dtype import enable_tf32
        enable_tf32("cuda", torch.float32)
    else:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False


# --------------------------------------------------------------------------------------------
# statistics and tables
# --------------------------------------------------------------------------------------------

def summarize(values: Sequence[float]) -> dict[str, float]:
    """``{"min", "median", "max", "all"}`` of repeated measurements."""
    vals = [float(v) for v in values]
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "all": vals}


def ratio_stats(num: Sequence[float], den: Sequence[float]) -> dict[str, float]:
    """Per-repeat ratios ``num[r] / den[r]`` of measurements taken side by side in repeat ``r``,
    summarized as min / median / max."""
    if len(num) != len(den):
        raise ValueError(f"ratio of {len(num)} and {len(den)} repeats: measure them side by side")
    return summarize([a / b for a, b in zip(num, den)])


def fmt_ratio(r: dict[str, float]) -> str:
    """``1.23x (1.10-1.31)``: median and the min-max range over repeats."""
    return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"


def md_table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str]],
             align_right: Optional[set[str]] = None) -> str:
    """A Markdown table: ``columns`` are ``(key, header)``; values are printed as given."""
    rows = list(rows)
    right = align_right if align_right is not None else {
        k for k, _ in columns if rows and isinstance(rows[0].get(k), (int, float))}
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---:" if k in right else "---" for k, _ in columns) + "|"
    body = ["| " + " | ".join(str(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_json(path: Path, obj: Any, indent: int = 1) -> None:
    """Writes ``obj`` as JSON, creating the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent, default=str))


def pyplot():
    """matplotlib's ``pyplot`` on the file-only Agg backend (matplotlib is in the dev extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Lays ``fig`` out, writes it to ``path`` and frees it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
