"""Packing planner benchmark: best-fit decreasing over 1M and 5M preference pairs.

Lengths are long-tailed (lognormal prompts and responses, each sequence capped at
``--seq-len``), as in real preference data. For every size the script plans rows of
``--row-len`` tokens with the native planner (``torch.ops.fastrm.plan_rows_bfd``) and the numpy
fallback, checks both give the same rows, and reports seconds, rows and fill rate, for the plain
layout (each sequence ``prompt + response``) and the prefix-shared layout (prompt once per pair),
plus the padded baseline's real-token fraction (batches of ``--batch-pairs`` pairs padded to
their longest sequence).

    python benchmarks/bench_packing.py                 # 1M and 5M pairs
    python benchmarks/bench_packing.py --sizes 100000  # quick

Writes ``benchmarks/results/packing.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import common
from common import RESULTS
from fastrm import _native
from fastrm.data.planner import plan_rows_arrays


def pair_lengths(n: int, seq_len: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompt, chosen and rejected token counts: lognormal (median 120 / 160 tokens), each full
    sequence ``prompt + response`` capped at ``seq_len`` (prompt cut first, as the datasets'
    ``left_prompt`` policy does)."""
    rng = np.random.default_rng(seed)
    p = np.ceil(rng.lognormal(np.log(120), 1.0, n)).astype(np.int64)
    c = np.ceil(rng.lognormal(np.log(160), 0.9, n)).astype(np.int64)
    r = np.ceil(rng.lognormal(np.log(160), 0.9, n)).astype(np.int64)
    c, r = np.clip(c, 2, seq_len // 2), np.clip(r, 2, seq_len // 2)
    p = np.minimum(p, seq_len - np.maximum(c, r))
    return p, c, r


def time_plan(sizes: np.ndarray, row_len: int, backend: str, repeats: int) -> tuple[float, tuple]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = plan_rows_arrays(sizes, row_len, backend)
        best = min(best, time.perf_counter() - t0)
    return best, out


def padded_real_fraction(p, c, r, batch_pairs: int, seed: int = 0) -> float:
    """Real tokens / computed tokens when random batches of ``batch_pairs`` pairs are padded to
    their longest sequence (``2 * batch_pairs`` rows)."""
    rng = np.random.default_rng(seed)
    n = (p.size // batch_pairs) * batch_pairs
    idx = rng.permutation(p.size)[:n].reshape(-1, batch_pairs)
    lc, lr = (p + c)[idx], (p + r)[idx]
    longest = np.maximum(lc.max(1), lr.max(1))
    return float((lc.sum() + lr.sum()) / (2 * batch_pairs * longest.sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    ap.add_argument("--seq-len", type=int, default=2048, help="max tokens of one sequence")
    ap.add_argument("--row-len", type=int, default=4096, help="tokens per packed row")
    ap.add_argument("--batch-pairs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "packing.json"))
    args = ap.parse_args()

    native = _native.has_op("plan_rows_bfd")
    backends = (["native"] if native else []) + ["numpy"]
    if not native:
        print(f"native planner unavailable: {_native.unavailable_reason()}")
    results = []
    for n in args.sizes:
        p, c, r = pair_lengths(n, args.seq_len)
        layouts = {"plain": 2 * p + c + r, "prefix_shared": p + c + r}
        for layout, sizes in layouts.items():
            plans = {}
            for be in backends:
                secs, (items, offsets) = time_plan(sizes, args.row_len, be, args.repeats)
                rows = offsets.size - 1
                plans[be] = (items, offsets)
                results.append({
                    "pairs": n, "layout": layout, "backend": be, "seconds": secs, "rows": rows,
                    "tokens": int(sizes.sum()), "fill_rate": float(sizes.sum() / (rows * args.row_len)),
                    "lower_bound_rows": int(-(-sizes.sum() // args.row_len)),
                })
            if len(plans) == 2:
                same = all(np.array_equal(a, b) for a, b in zip(plans["native"], plans["numpy"]))
                if not same:
                    raise SystemExit("native and numpy planners disagree")
        results.append({"pairs": n, "layout": "padded", "backend": "-", "seconds": 0.0,
                        "rows": 2 * n, "tokens": int((2 * p + c + r).sum()),
                        "fill_rate": padded_real_fraction(p, c, r, args.batch_pairs),
                        "lower_bound_rows": 2 * n})

    hdr = f"{'pairs':>9} {'layout':>14} {'backend':>7} {'seconds':>8} {'rows':>9} {'fill':>7} {'LB rows':>9}"
    print(hdr)
    print("-" * len(hdr))
    for x in results:
        print(f"{x['pairs']:>9,} {x['layout']:>14} {x['backend']:>7} {x['seconds']:>8.3f} "
              f"{x['rows']:>9,} {x['fill_rate']:>7.2%} {x['lower_bound_rows']:>9,}")
    saved = {x["pairs"]: None for x in results}
    for n in saved:
        t = {x["layout"]: x["tokens"] for x in results if x["pairs"] == n and x["backend"] in ("numpy", "-")}
        print(f"{n:,} pairs: prefix sharing saves {1 - t['prefix_shared'] / t['plain']:.1%} of tokens")
    out = Path(args.out)
    meta = {"seq_len": args.seq_len, "row_len": args.row_len, "batch_pairs": args.batch_pairs,
            "machine": common.machine_info(torch.get_num_threads()), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "note": "padded: fill_rate = real tokens / computed tokens with pad-to-longest batches"}
    common.write_json(out, {"meta": meta, "results": results}, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
