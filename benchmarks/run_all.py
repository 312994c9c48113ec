"""Runs every fastrm benchmark and writes one summary: what fastrm buys, in one command.

    python benchmarks/run_all.py --quick      # minutes on a 2-core CPU
    python benchmarks/run_all.py              # the full set (an hour or more on 2 cores)

Steps (each a subprocess of the same interpreter, so one failing benchmark is reported and the
others still run):

1. ``bench_fused_head.py``: fused reward head + loss (every backend) vs unfused torch, fwd+bwd;
2. ``bench_packing.py``: the packing planner's speed and fill rate;
3. ``bench_packed_model.py``: one packed vs padded forward+backward step, plus attention alone;
4. ``bench_cpu_kernels.py``: the ``cpu_flash`` attention kernels vs per-segment SDPA, and the
   fused layer ops vs torchtune's modules (time and activation memory);
5. ``bench_e2e.py``: full optimizer steps, padded vs packed vs prefix sharing vs grouped, on
   long-tailed, uniform, long/short-prompt, K-responses and qa-feedback data, two model sizes;
6. ``plots.py``: PNGs from the end-to-end JSON.

These run on their own (each minutes to an hour, each documented in ``benchmarks/README.md``):
``bench_trl.py`` (the head-to-head with TRL; the ``bench`` extra), ``bench_score.py`` (``fastrm
score`` / ``serve`` vs transformers' padded scorer), ``bench_quality.py`` (held-out accuracy of
each loss option), ``bench_fsdp_memory.py`` (peak RSS per rank, 1 vs 2 ranks),
``bench_data_prep.py`` (time to first step with and without the data cache) and
``bench_memory_plan.py`` (``fastrm plan`` against a measured run).

Then ``results/summary.json`` (the latest run, quick or full; machine, every step's status, wall time and output files, the
headline numbers) and ``results/summary.md`` (Markdown tables for the README). On a CUDA machine
the fused-head and end-to-end benchmarks run a second time on the GPU (flash-attn varlen
attention and the Triton head + loss, bf16) and save ``*_cuda*.json`` beside the CPU files.

Timings on a shared machine: pass ``--lock /tmp/fastrm_bench.lock`` (the run holds that
``flock`` while it measures) and read the load average recorded in ``summary.json``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import common
from common import RESULTS

HERE = Path(__file__).resolve().parent


def _run(name: str, cmd: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Runs one benchmark, tees its output to ``log``; returns status and wall time."""
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=HERE.parent)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            if "it/s]" not in line and "s/it]" not in line:  # keep progress bars out of the log tail
                print(line, end="", flush=True)
        rc = proc.wait()
    wall = time.perf_counter() - t0
    status = "ok" if rc == 0 else f"failed (exit {rc}; see {log.name})"
    print(f"=== {name}: {status} in {wall:.0f} s", flush=True)
    return {"command": " ".join(cmd), "status": status, "wall_s": round(wall, 1),
            "log": str(log.relative_to(HERE.parent))}


def steps(args) -> list[tuple[str, list[str], list[Path]]]:
    """(name, argv, output files) of every benchmark of this run."""
    py = sys.executable
    q = args.quick
    sfx = "_quick" if q else ""
    out: list[tuple[str, list[str], list[Path]]] = []
    fh = RESULTS / f"fused_head_cpu{sfx}.json"
    out.append(("fused_head_cpu", [py, str(HERE / "bench_fused_head.py"), "--device", "cpu",
                                   "--threads", str(args.threads), "--out", str(fh)]
                + (["--quick"] if q else []), [fh, fh.with_suffix(".md")]))
    pk = RESULTS / f"packing{sfx}.json"
    out.append(("packing", [py, str(HERE / "bench_packing.py"), "--out", str(pk)]
                + (["--sizes", "100000", "--repeats", "1"] if q else []), [pk]))
    pm = RESULTS / f"packed_model_cpu{sfx}.json"
    out.append(("packed_model_cpu", [py, str(HERE / "bench_packed_model.py"), "--out", str(pm),
                                     "--threads", str(args.threads)]
                + (["--models", "small", "--pairs", "8", "--repeats", "3",
                    "--attn-tokens", "1024"] if q else []), [pm, pm.with_suffix(".png")]))
    ck = RESULTS / f"cpu_kernels{sfx}"
    out.append(("cpu_kernels", [py, str(HERE / "bench_cpu_kernels.py"), "--threads",
                                str(args.threads), "--out", str(ck)] + (["--quick"] if q else []),
                [ck.with_suffix(".json"), ck.with_suffix(".md"), ck.with_suffix(".png")]))
    e2e = RESULTS / f"e2e_cpu{sfx}.json"
    out.append(("e2e_cpu", [py, str(HERE / "bench_e2e.py"), "--device", "cpu", "--threads",
                            str(args.threads), "--out", str(e2e)] + (["--quick"] if q else []),
                [e2e, e2e.with_suffix(".md")]))
    if args.cuda:
        fhc = RESULTS / f"fused_head_cuda{sfx}.json"
        out.append(("fused_head_cuda", [py, str(HERE / "bench_fused_head.py"), "--device", "cuda",
                                        "--dtype", "fp32", "bf16", "--out", str(fhc)]
                    + (["--quick"] if q else []), [fhc, fhc.with_suffix(".md")]))
        e2ec = RESULTS / f"e2e_cuda{sfx}.json"
        out.append(("e2e_cuda", [py, str(HERE / "bench_e2e.py"), "--device", "cuda", "--out",
                                 str(e2ec)] + (["--quick"] if q else []),
                    [e2ec, e2ec.with_suffix(".md")]))
    if args.only:
        out = [s for s in out if s[0] in args.only]
    return out


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------

def _row(c: dict, lay: str) -> Optional[dict]:
    return next((r for r in c["rows"] if r["layout"] == lay), None)


def headline_table(e2e: dict) -> str:
    """One line per (data set, model, layout): the numbers a user decides on."""
    cols = [("data", "data"), ("model", "model"), ("layout", "layout"),
            ("ctok", "tokens computed"), ("pad", "padding"), ("step", "step time (median)"),
            ("tps", "real tokens/s"), ("ugf", "useful GFLOP/s"),
            ("memfb", "peak memory fwd+bwd"), ("mem", "peak memory step"),
            ("spd", "speed-up vs padded"), ("memr", "fwd+bwd memory vs padded")]
    rows = []
    for c in e2e["configs"]:
        if c["data"].startswith("sweep_"):
            continue
        for r in c["rows"]:
            mem = r["peak_step_memory_mib"]
            rows.append({
                "data": c["data"], "model": c["model"], "layout": r["layout"],
                "ctok": f"{r['computed_tokens']:,}", "pad": f"{100 * r['pad_fraction']:.0f} %",
                "step": f"{r['step_time_s']['median']:.2f} s",
                "tps": f"{r['real_tokens_per_s']:,.0f}",
                "ugf": f"{r['useful_flops'] / 1e9:.1f}",
                "mem": "" if mem is None else f"{mem:.0f} MiB",
                "spd": common.fmt_ratio(r["speedup_vs_padded"]),
                "memfb": ("" if r.get("peak_fwd_bwd_memory_mib") is None
                          else f"{r['peak_fwd_bwd_memory_mib']:.0f} MiB"),
                "memr": ("" if r.get("fwd_bwd_memory_vs_padded") is None
                         else f"{r['fwd_bwd_memory_vs_padded']:.2f}x"),
            })
    return common.md_table(rows, cols, align_right={k for k, _ in cols[3:]})


def prefix_table(e2e: dict) -> tuple[str, list[dict]]:
    """Pair-level prefix sharing vs unshared packed pairs, long vs short prompts."""
    rows, raw = [], []
    for c in e2e["configs"]:
        if c["data"] not in ("long_prompt", "short_prompt", "longtail", "uniform"):
            continue
        pk, px = _row(c, "packed"), _row(c, "packed+prefix")
        if pk is None or px is None:
            continue
        tok = px["computed_tokens"] / pk["computed_tokens"]
        spd = px["speedup_vs_packed"]
        raw.append({"data": c["data"], "model": c["model"], "tokens_shared_over_unshared": tok,
                    "speedup_shared_vs_unshared": spd})
        rows.append({"data": c["data"], "model": c["model"],
                     "tok": f"{pk['computed_tokens']:,} -> {px['computed_tokens']:,}",
                     "tokr": f"{tok:.2f}x",
                     "st": f"{pk['step_time_s']['median']:.2f} -> {px['step_time_s']['median']:.2f} s",
                     "spd": common.fmt_ratio(spd)})
    cols = [("data", "data"), ("model", "model"), ("tok", "tokens computed (unshared -> shared)"),
            ("tokr", "shared / unshared tokens"), ("st", "step time (median)"),
            ("spd", "speed-up of sharing")]
    return common.md_table(rows, cols, align_right={"tok", "tokr", "st", "spd"}), raw


def grouped_table(e2e: dict) -> tuple[str, list[dict]]:
    """Grouped responses vs pair-level prefix sharing vs packed vs padded, per epoch."""
    rows, raw = [], []
    for c in e2e["configs"]:
        if _row(c, "grouped") is None:
            continue
        for lay in ("padded", "packed", "packed+prefix", "grouped"):
            r = _row(c, lay)
            if r is None:
                continue
            raw.append({"data": c["data"], "model": c["model"], "layout": lay,
                        "tokens_per_epoch": r["computed_tokens"],
                        "epoch_time_s": r["epoch_time_s"]["median"],
                        "tokens_vs_padded": r["tokens_vs_padded"],
                        "speedup_vs_padded": r["speedup_vs_padded"],
                        "speedup_vs_packed": r["speedup_vs_packed"]})
            rows.append({"data": c["data"], "model": c["model"], "layout": lay,
                         "cmp": c["comparisons"], "tok": f"{r['computed_tokens']:,}",
                         "tokr": f"{r['tokens_vs_padded']:.2f}x",
                         "ep": f"{r['epoch_time_s']['median']:.1f} s",
                         "spd": common.fmt_ratio(r["speedup_vs_padded"]),
                         "spk": common.fmt_ratio(r["speedup_vs_packed"])})
    cols = [("data", "data"), ("model", "model"), ("layout", "layout"),
            ("cmp", "comparisons / epoch"), ("tok", "tokens computed / epoch"),
            ("tokr", "tokens vs padded"), ("ep", "epoch time (median)"),
            ("spd", "speed-up vs padded"), ("spk", "speed-up vs packed")]
    return common.md_table(rows, cols, align_right={k for k, _ in cols[3:]}), raw


def readme_block(e2e: dict, pngs: list[str], command: str) -> str:
    """The compact block for the top-level README: speed-up of every layout over padded per
    (data set, model), with tokens computed and forward+backward memory relative to padded."""
    layouts = ("packed", "packed+prefix", "grouped")
    rows = []
    for c in e2e["configs"]:
        if c["data"].startswith("sweep_"):
            continue
        pd = _row(c, "padded")
        row = {"data": c["data"], "model": c["model"], "pad": f"{100 * pd['pad_fraction']:.0f} %",
               "tps": f"{pd['real_tokens_per_s']:,.0f}"}
        best = max((r for r in c["rows"]), key=lambda r: r["speedup_vs_padded"]["median"])
        for lay in layouts:
            r = _row(c, lay)
            row[lay] = "" if r is None else (
                f"{common.fmt_ratio(r['speedup_vs_padded'])}, tokens {r['tokens_vs_padded']:.2f}x"
                + ("" if r.get("fwd_bwd_memory_vs_padded") is None
                   else f", mem {r['fwd_bwd_memory_vs_padded']:.2f}x"))
        row["best"] = f"{best['real_tokens_per_s']:,.0f} ({best['layout']})"
        rows.append(row)
    cols = [("data", "data"), ("model", "model"), ("pad", "padding (padded)"),
            ("tps", "padded real tok/s"), *[(lay, lay) for lay in layouts],
            ("best", "best real tok/s")]
    info, s = e2e["machine"], e2e["settings"]
    head = (f"Measured on {common.machine_line(info)} with `{command}` ({s['device']}, "
            f"{s['dtype']}, {s['steps']} optimizer steps x {s['pairs_per_step']} comparisons per "
            f"layout and repeat, {s['repeats']} interleaved repeats). Cells: training-step speed-up "
            "over the padded baseline, median (min-max) of per-repeat ratios; tokens computed and "
            "peak forward+backward memory relative to padded. Every layout's first-step loss "
            "equals padded's (same pairs, same weights).")
    lines = [head, "", common.md_table(rows, cols, align_right={k for k, _ in cols[2:]}), ""]
    lines += [f"![{Path(p).stem}]({p})" for p in pngs]
    return "\n".join(lines) + "\n"


def summarize(args, run: dict[str, dict], info: dict, wall: float) -> dict[str, Any]:
    """summary.json / summary.md from the JSON files this run wrote."""
    sfx = "_quick" if args.quick else ""
    md = [f"# fastrm benchmarks{' (quick)' if args.quick else ''}", "",
          f"Machine: {common.machine_line(info)}. Command: `python benchmarks/run_all.py"
          f"{' --quick' if args.quick else ''}` ({wall / 60:.1f} min).", ""]
    summary: dict[str, Any] = {"machine": info, "quick": args.quick, "wall_s": round(wall, 1),
                               "steps": run, "prefix_sharing": [],
                               "grouped_responses": []}
    pngs: list[str] = []
    for dev in ("cpu", "cuda"):
        path = RESULTS / f"e2e_{dev}{sfx}.json"
        if not path.is_file() or f"e2e_{dev}" not in run or run[f"e2e_{dev}"]["status"] != "ok":
            continue
        e2e = json.loads(path.read_text())
        from plots import plot_all

        pngs += [str(p.relative_to(HERE.parent)) for p in plot_all(path)]
        s = e2e["settings"]
        md += [f"## End-to-end training steps ({dev}, {s['dtype']})", "",
               f"{s['steps']} steps x {s['pairs_per_step']} comparisons (one benchmark epoch), "
               f"AdamW, same pairs, same order and same initial weights for every layout; "
               f"{s['repeats']} repeats with the layouts interleaved; attention "
               f"`{s['attention_backend']}`, head + loss `{s['head_backend']}`; measured "
               f"`torch.mm` rate {e2e['matmul']['median_flops'] / 1e9:.1f} GFLOP/s "
               f"({e2e['matmul']['dtype']}). Speed-ups: median (min-max) of per-repeat ratios. "
               f"Memory: {s['memory_method']}. Every layout's first-step loss equals the padded "
               f"one within {max(r['first_step_loss_abs_diff_vs_padded'] for c in e2e['configs'] for r in c['rows']):.1e}.",
               "", headline_table(e2e), ""]
        t_prefix, raw_prefix = prefix_table(e2e)
        t_grouped, raw_grouped = grouped_table(e2e)
        md += ["### Prefix sharing: shared vs unshared pairs", "", t_prefix, "",
               "### Grouped responses: per benchmark epoch", "", t_grouped, ""]
        md += ["Data sets: " + "; ".join(f"`{k}`: {v}" for k, v in e2e["data_sets"].items()), ""]
        if e2e.get("skipped"):
            md += ["Skipped: " + "; ".join(f"`{k}`: {v}" for k, v in e2e["skipped"].items()), ""]
        block = readme_block(e2e, [p for p in pngs if f"e2e_{dev}" in p],
                             f"python benchmarks/run_all.py{' --quick' if args.quick else ''}")
        (RESULTS / f"readme_block_{dev}.md").write_text(block)
        summary["prefix_sharing"] += [{**x, "device": dev} for x in raw_prefix]
        summary["grouped_responses"] += [{**x, "device": dev} for x in raw_grouped]
        summary[f"e2e_{dev}"] = {"file": str(path.relative_to(HERE.parent)),
                                 "matmul": e2e["matmul"], "settings": s}
    for name in ("fused_head_cpu", "fused_head_cuda"):
        path = RESULTS / f"{name}{sfx}.md"
        if name in run and run[name]["status"] == "ok" and path.is_file():
            md += [f"## Fused reward head + loss vs unfused torch ({name.split('_')[-1]})", "",
                   path.read_text().strip(), ""]
    pm = RESULTS / f"packed_model_cpu{sfx}.json"
    if "packed_model_cpu" in run and run["packed_model_cpu"]["status"] == "ok" and pm.is_file():
        md += ["## One packed vs padded step (bench_packed_model.py)", "", "```",
               json.loads(pm.read_text()).get("table", "").strip(), "```", ""]
    ck = RESULTS / f"cpu_kernels{sfx}.md"
    if "cpu_kernels" in run and run["cpu_kernels"]["status"] == "ok" and ck.is_file():
        md += ["## CPU kernels (bench_cpu_kernels.py)", "", ck.read_text().strip(), ""]
    pk = RESULTS / f"packing{sfx}.json"
    if "packing" in run and run["packing"]["status"] == "ok" and pk.is_file():
        res = json.loads(pk.read_text())["results"]
        rows = [{"pairs": f"{x['pairs']:,}", "layout": x["layout"], "backend": x["backend"],
                 "s": f"{x['seconds']:.3f}", "rows": f"{x['rows']:,}",
                 "fill": f"{100 * x['fill_rate']:.1f} %"} for x in res]
        md += ["## Packing planner (bench_packing.py)", "", common.md_table(
            rows, [("pairs", "pairs"), ("layout", "layout"), ("backend", "backend"),
                   ("s", "seconds"), ("rows", "rows"), ("fill", "fill (real / computed)")],
            align_right={"pairs", "s", "rows", "fill"}), ""]
    md += ["## Runs", "", common.md_table(
        [{"name": k, "status": v["status"], "wall": f"{v['wall_s']:.0f} s"} for k, v in run.items()],
        [("name", "benchmark"), ("status", "status"), ("wall", "wall time")],
        align_right={"wall"}), ""]
    if pngs:
        md += ["Plots: " + ", ".join(f"`{p}`" for p in pngs), ""]
    summary["plots"] = pngs
    summary["markdown"] = "\n".join(md)
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    p.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the GPU benchmarks (default: when CUDA is available)")
    p.add_argument("--only", nargs="+", default=None,
                   help="run only these steps (fused_head_cpu packing packed_model_cpu "
                        "cpu_kernels e2e_cpu fused_head_cuda e2e_cuda)")
    p.add_argument("--summary-only", action="store_true",
                   help="rebuild summary.{json,md} and plots from existing results")
    p.add_argument("--lock", default=None, help="flock this file while measuring")
    args = p.parse_args(argv)
    if args.cuda is None:
        import torch

        args.cuda = torch.cuda.is_available()
    RESULTS.mkdir(parents=True, exist_ok=True)
    logs = RESULTS / "logs"
    logs.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    lock_f = None
    if args.lock:
        lock_f = open(args.lock, "a")
        print(f"waiting for {args.lock} ...", flush=True)
        fcntl.flock(lock_f, fcntl.LOCK_EX)
    info = common.machine_info(args.threads, "cuda" if args.cuda else "cpu")
    t0 = time.perf_counter()
    sfx = "_quick" if args.quick else ""
    summary_path = RESULTS / "summary.json"  # the latest run, quick or full (recorded inside)
    run: dict[str, dict] = {}
    if args.summary_only and summary_path.is_file():
        prev = json.loads(summary_path.read_text())
        if prev.get("quick") != args.quick:
            raise SystemExit(f"{summary_path} is from a {'quick' if prev.get('quick') else 'full'} "
                             "run; pass the same --quick setting")
        run = prev["steps"]
    else:
        if args.only and summary_path.is_file():
            prev = json.loads(summary_path.read_text())
            if prev.get("quick") == args.quick:
                run = prev["steps"]  # keep the other benchmarks' latest runs
        for name, cmd, outputs in steps(args):
            run[name] = _run(name, cmd, env, logs / f"{name}{sfx}.log")
            run[name]["outputs"] = [str(o.relative_to(HERE.parent)) for o in outputs if o.is_file()]
    info["load_average_after"] = common.load_average()
    if lock_f is not None:
        lock_f.close()
    wall = time.perf_counter() - t0
    summary = summarize(args, run, info, wall if not args.summary_only else
                        sum(v["wall_s"] for v in run.values()))
    common.write_json(summary_path, summary)
    summary_path.with_suffix(".md").write_text(summary["markdown"])
    print(summary["markdown"])
    print(f"saved {summary_path} and {summary_path.with_suffix('.md')}")
    return 0 if all(v["status"] == "ok" for v in run.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
