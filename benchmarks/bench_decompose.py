"""PCA solvers of fastrm.decompose: time and accuracy against the exact SVD.

For each ``(N, D)`` of the grid, embedding differences with a decaying spectrum (``k`` planted
directions of decreasing strength + isotropic noise) are decomposed into ``k`` heads by:

* ``exact``: float64 thin SVD of the whole ``[N, D]`` matrix in memory (the reference);
* ``covariance``: streamed in chunks of ``--chunk-size`` rows, ``D x D`` float64 Gram, ``eigh``;
* ``randomized``: streamed subspace iteration, ``k + 10`` columns, ``--n-iter`` passes + 1.

Reported per solver: wall time (median of ``--repeats``), the working memory the solver needs
beyond one chunk (``N D`` for exact, ``D^2`` for covariance, ``D (k + p)`` for randomized, float64
bytes), the largest relative eigenvalue error and the smallest ``|cos|`` between a component and
the exact one.

    python benchmarks/bench_decompose.py            # grid
    python benchmarks/bench_decompose.py --quick    # one small case

Writes ``benchmarks/results/decompose_pca_<device>.json`` (long format), ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import common
from common import RESULTS
from fastrm.decompose.pca import covariance_pca, exact_pca, randomized_pca


def make_diffs(n: int, d: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, k, generator=g)).Q  # [d, k]
    strength = torch.linspace(4.0, 1.0, k)
    z = (torch.randn(n, k, generator=g) * strength) @ q.T + 0.2 * torch.randn(n, d, generator=g)
    return z + 0.5 * q[:, 0]  # a consensus direction (non-zero mean)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=4096)
    ap.add_argument("--n-iter", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = [(4000, 256)] if args.quick else [(5000, 256), (20000, 256), (5000, 576), (20000, 576),
                                              (20000, 1024)]
    rows = []
    for n, d in grid:
        z = make_diffs(n, d, args.k)
        t_ex, ex = timed(lambda: exact_pca(z, args.k), args.repeats)
        solvers = {
            "exact": (t_ex, ex, n * d * 8),
            "covariance": (*timed(lambda: covariance_pca(z, args.k, chunk_size=args.chunk_size,
                                                         progress=False), args.repeats), d * d * 8),
            "randomized": (*timed(lambda: randomized_pca(z, args.k, n_iter=args.n_iter,
                                                         chunk_size=args.chunk_size,
                                                         progress=False), args.repeats),
                           d * (args.k + 10) * 8),
        }
        for name, (t, res, mem) in solvers.items():
            rel = ((res.explained_variance - ex.explained_variance).abs() / ex.explained_variance).max()
            cos = (res.components.double() * ex.components.double()).sum(1).abs().min()
            rows.append({"N": n, "D": d, "k": args.k, "solver": name, "seconds": t,
                         "working_memory_mib": mem / 2**20, "max_rel_eig_error": float(rel),
                         "min_abs_cos": float(cos)})
            print(f"N={n:>6} D={d:>5} {name:<10} {t * 1e3:9.1f} ms  mem {mem / 2**20:8.2f} MiB  "
                  f"eig err {float(rel):.2e}  min|cos| {float(cos):.6f}")
    device = "cpu"
    info = common.machine_info(torch.get_num_threads(), device)
    meta = {"date": info["date_utc"], "torch": torch.__version__, "threads": info["torch_threads"],
            "machine": info, "chunk_size": args.chunk_size, "n_iter": args.n_iter}
    stem = RESULTS / f"decompose_pca_{device}{'_quick' if args.quick else ''}"
    common.write_json(stem.with_suffix(".json"), {"meta": meta, "rows": rows})
    md = ["| N | D | solver | time (ms) | working memory (MiB) | max rel. eigenvalue error | min abs cos |",
          "|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['N']} | {r['D']} | {r['solver']} | {r['seconds'] * 1e3:.1f} | "
                  f"{r['working_memory_mib']:.2f} | {r['max_rel_eig_error']:.1e} | {r['min_abs_cos']:.6f} |")
    stem.with_suffix(".md").write_text(
        f"PCA solvers, k={args.k}, torch {torch.__version__}, {meta['threads']} threads, CPU\n\n"
        + "\n".join(md) + "\n")
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    labels = [f"{n}x{d}" for n, d in grid]
    width = 0.27
    for i, name in enumerate(("exact", "covariance", "randomized")):
        ys = [r["seconds"] * 1e3 for r in rows if r["solver"] == name]
        ax.bar([j + (i - 1) * width for j in range(len(grid))], ys, width, label=name)
    ax.set_xticks(range(len(grid)))
    ax.set_xticklabels(labels)
    ax.set_xlabel("N pairs x D")
    ax.set_ylabel("time (ms)")
    ax.set_yscale("log")
    ax.set_title(f"PCA of embedding differences, k={args.k} (CPU, {meta['threads']} threads)", fontsize=10)
    ax.legend(fontsize=8)
    common.save_figure(fig, stem.with_suffix(".png"), dpi=120)
    print(f"wrote {stem}.json/.md/.png")


if __name__ == "__main__":
    main()
