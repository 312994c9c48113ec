"""Fused reward head + loss vs the unfused eager path: time and peak memory of forward + backward.

Methods (one reward-model step's head and loss, given packed hidden states ``[T, D]`` that
require grad, ``B`` pairs scored at ``N = 2B`` positions):

* ``unfused_eager``: what a plain torch RM does: ``nn.Linear(D, 1)`` over *every* token
  (``[T, 1]``), gather the ``2B`` scored rows, :func:`fastrm.functional.comparison_loss`,
  ``backward()`` through the dense head (``[T, D]`` matmul for grad_hidden, ``[T]`` x ``[T, D]``
  for grad_weight).
* ``fused_torch`` / ``fused_native`` / ``fused_triton``: :func:`fastrm.ops.fused_reward_head_loss`
  with that backend (triton only on CUDA).

Timing: ``--repeats`` timed fwd+bwd steps after ``--warmup`` untimed ones, min / median / max in
ms (``time.perf_counter``; CUDA synchronized). Memory: each (config, method) runs once more in a
fresh subprocess that builds the inputs, warms the code path on a tiny input, then records the
growth of the process's peak RSS over one fwd+bwd step. This counts every byte
the step touched, torch's or not (``grad_hidden [T, D]`` included, which every method must
produce), not torch-allocator statistics, which CPU torch does not keep; it is reported in MiB.
The peak is Linux's VmHWM, reset just before the step through ``/proc/self/clear_refs``.

    python benchmarks/bench_fused_head.py                    # full grid, fp32, CPU
    python benchmarks/bench_fused_head.py --quick            # one small config

Writes ``benchmarks/results/fused_head_<device>.json`` (long format, one row per config and
method) and the same table as ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import common
from common import RESULTS
from fastrm import functional as RF
from fastrm.ops import available_backends, fused_reward_head_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(t: int, d: int, b: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Hidden ``[T, D]`` (leaf requiring grad, as a model's output would), a ``Linear(D, 1)``
    head, ``2B`` distinct reward positions (last tokens of ``2B`` responses) and ``B`` pairs."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    head = torch.nn.Linear(d, 1).to(device=device, dtype=dtype)
    positions = torch.sort(torch.randperm(t, generator=g)[: 2 * b]).values.to(device)
    chosen = torch.arange(b, device=device)
    rejected = torch.arange(b, 2 * b, device=device)
    margin = torch.rand(b, generator=g).to(device)
    return hidden, head, positions, chosen, rejected, margin


def step_fn(method: str, hidden, head, positions, chosen, rejected, margin):
    """One forward + backward of ``method``; returns the loss (detached)."""
    if method == "unfused_eager":
        def step():
            scores = head(hidden).squeeze(-1)  # [T]: the head over every token
            rewards = scores[positions].float()
            loss = RF.comparison_loss(rewards, chosen, rejected, margin)
            loss.backward()
            return loss.detach()
    else:
        backend = method.removeprefix("fused_")

        def step():
            loss, _ = fused_reward_head_loss(hidden, head.weight, head.bias, positions, chosen,
                                             rejected, margin, backend=backend)
            loss.backward()
            return loss.detach()
    return step


def _clear_grads(hidden, head) -> None:
    hidden.grad = None
    head.zero_grad(set_to_none=True)


def time_method(method, inputs, warmup: int, repeats: int, device: str) -> dict:
    hidden, head = inputs[0], inputs[1]
    step = step_fn(method, *inputs)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        _clear_grads(hidden, head)
        step()
    times = []
    for _ in range(repeats):
        _clear_grads(hidden, head)
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"time_ms_min": min(times), "time_ms_median": statistics.median(times),
            "time_ms_max": max(times), "repeats": repeats}


def memory_probe(method: str, t: int, d: int, b: int, dtype: str, threads: int) -> dict:
    """Runs in a fresh process: growth of the peak RSS (MiB) over one fwd+bwd step of ``method``.

    The kernel's high-water mark (VmHWM) is reset to the current RSS just before the step
    (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0), so earlier peaks (importing torch,
    building inputs) do not hide the step's own peak.
    """
    torch.set_num_threads(threads)
    small = make_inputs(64, d, 2, DTYPES[dtype], "cpu", seed=1)
    step_fn(method, *small)()  # load libraries, thread pools, first-call caches
    inputs = make_inputs(t, d, b, DTYPES[dtype], "cpu")
    del small
    if not common.reset_peak_rss():
        raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs): Linux >= 4.0 needed")
    before = common.rss_bytes() / 2**20
    step_fn(method, *inputs)()
    return {"peak_rss_delta_mib": common.peak_rss_bytes() / 2**20 - before, "rss_before_mib": before}


def measure_memory(method, t, d, b, dtype, threads) -> dict:
    cmd = [sys.executable, __file__, "--_memory-probe", method, str(t), str(d), str(b), dtype,
           str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown_table(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Fused reward head + loss, fwd+bwd, {meta['device_name']}, "
        f"{meta['threads']} threads, torch {meta['torch']} ({meta['date']}).",
        "",
        "| dtype | T | D | B | method | median ms | min ms | max ms | speedup (median) | speedup (min) | peak RSS delta MiB |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mem = f"{r['peak_rss_delta_mib']:.1f}" if r.get("peak_rss_delta_mib") is not None else "-"
        lines.append(
            f"| {r['dtype']} | {r['T']} | {r['D']} | {r['B']} | {r['method']} | {r['time_ms_median']:.2f} | "
            f"{r['time_ms_min']:.2f} | {r['time_ms_max']:.2f} | {r['speedup_vs_unfused']:.2f}x | "
            f"{r['speedup_vs_unfused_min']:.2f}x | {mem} |")
    lines += ["", "speedup = unfused_eager time / method time (median, and min: the least "
              "disturbed run on a shared machine). Peak RSS delta: growth of the "
              "process's peak resident memory over one fwd+bwd step, in a fresh process per row "
              "(includes grad_hidden [T, D], which every method allocates)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--T", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--D", type=int, nargs="+", default=[576, 2048])
    parser.add_argument("--B", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["fp32"],
                        help="hidden/head dtype(s); several give one table")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess memory probes")
    parser.add_argument("--quick", action="store_true", help="one small config, few repeats")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/fused_head_<device>.json)")
    parser.add_argument("--_memory-probe", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._memory_probe:
        method, t, d, b, dtype, threads = args._memory_probe
        print(json.dumps(memory_probe(method, int(t), int(d), int(b), dtype, int(threads))))
        return
    if args.quick:
        args.T, args.D, args.B, args.repeats, args.warmup = [2048], [576], [8], 5, 1
    torch.set_num_threads(args.threads)
    methods = ["unfused_eager"] + [f"fused_{b}" for b in available_backends(args.device)
                                   if b != "triton" or args.device == "cuda"]
    configs = [(dt, t, d, b) for dt in args.dtype for t in args.T for d in args.D for b in args.B]
    rows = []
    for dt, t, d, b in tqdm(configs, desc="configs"):
        inputs = make_inputs(t, d, b, DTYPES[dt], args.device)
        # the fused result must equal the unfused one before its time means anything
        losses = {}
        for method in methods:
            _clear_grads(inputs[0], inputs[1])
            losses[method] = step_fn(method, *inputs)().float().cpu()
        for method, loss in losses.items():
            torch.testing.assert_close(loss, losses["unfused_eager"], rtol=2e-2 if dt == "bf16" else 1e-4,
                                       atol=1e-4, msg=f"{method} loss differs at T={t} D={d} B={b}")
        base = base_min = None
        for method in methods:
            row = {"T": t, "D": d, "B": b, "method": method, "dtype": dt}
            row.update(time_method(method, inputs, args.warmup, args.repeats, args.device))
            if base is None:
                base, base_min = row["time_ms_median"], row["time_ms_min"]
            row["speedup_vs_unfused"] = base / row["time_ms_median"]
            row["speedup_vs_unfused_min"] = base_min / row["time_ms_min"]
            row["peak_rss_delta_mib"] = None
            if not args.no_memory and args.device == "cpu":
                row.update(measure_memory(method, t, d, b, dt, args.threads))
            rows.append(row)
        del inputs

    info = common.machine_info(args.threads, args.device)
    meta = {
        "machine": info,
        "date": info["date_utc"],
        "torch": torch.__version__,
        "device": args.device,
        "device_name": info.get("gpu") or f"CPU ({info['cpu']}, {info['logical_cpus']} cores visible)",
        "threads": args.threads,
        "dtypes": args.dtype,
        "warmup": args.warmup,
        "timing": "time.perf_counter around one forward+backward; min/median/max over repeats",
        "memory": ("peak RSS growth (VmHWM reset via /proc/self/clear_refs, minus VmRSS before) "
                   "over one fwd+bwd step in a fresh subprocess per row, after a tiny warm-up "
                   "step; CPU only"),
        "note": "machine shared with other jobs; compare methods within one run",
    }
    table = markdown_table(rows, meta)
    print(table)
    out = args.out or RESULTS / f"fused_head_{args.device}.json"
    common.write_json(out, {"meta": meta, "rows": rows}, indent=2)
    out.with_suffix(".md").write_text(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
