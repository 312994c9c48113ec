"""Scoring with a reward model: ``fastrm score`` (packed, prompt once) vs transformers'
``AutoModelForSequenceClassification`` on padded batches (the way TRL and RewardBench score),
same checkpoint, same rows, side by side in one run; and ``fastrm serve`` under concurrency.

Model: SmolLM2-135M-Instruct (``fastrm prepare smollm2``) as ``LlamaForSequenceClassification``
with a seeded random ``score`` head; the fastrm :class:`RewardModel` gets the very same weights
(torchtune's ``hf_to_tune`` conversion, head = ``score.weight``). ``--quick`` uses a
tiny random Llama built with transformers instead (CI smoke run). Every run checks that both
scorers gave the same rewards (max abs difference reported; the test fails above 1e-4).

Data: best-of-N rows ``{prompt, responses: [N]}`` with ``N`` in 4 and 16:

* ``qa_feedback``: the real prompts of ``../shared/data/qa_feedback`` (instruction + question +
  Wikipedia passages, median ~2,900 characters) with its real answers (4 per question; more are
  drawn from other questions' answers for N = 16): long prompts, short answers
  (not in ``--quick``);
* ``synthetic``: the synthetic verifiable set (short questions, long-tailed answers).

Both sides score pre-tokenized rows (the same ids: fastrm's tokenizer renders the model's chat
template as transformers does), so the timings are the scorers' own work:

* ``fastrm``: :meth:`RewardScorer.score_groups`: the prompt once per row, its N answers packed
  after it, rows packed into flat ``[1, T]`` batches of ``--batch-tokens`` tokens, no padding;
* ``transformers``: every answer's full conversation (prompt repeated N times), batches of
  ``--hf-batch-size`` sequences in input order padded right to the longest, ``attention_mask``,
  ``model(input_ids, attention_mask).logits[:, 0]`` under ``torch.inference_mode``.

Reported: responses/s and rows (prompts)/s, the speedup, peak resident memory added while
scoring (``VmHWM`` reset before each side), tokens computed. Server: ``fastrm serve``'s
``/score`` endpoint in this process with 1, 8 and 32 concurrent clients, each request one
best-of-4 synthetic row: requests/s and p50 / p99 latency.

Run:  python benchmarks/bench_score.py [--quick] [--threads 2]
Writes benchmarks/results/score_cpu.{json,md,png} (``score_cpu_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch

import common
from common import RESULTS

SHARED_QA = Path(__file__).resolve().parents[2] / "shared" / "data" / "qa_feedback" / "pairs.jsonl"


# ------------------------------------------------------------------------------------ models

def _hf_to_fastrm(hf_model, build_decoder):
    """A fastrm RewardModel with ``hf_model``'s weights (torchtune's HF -> tune conversion)."""
    from torchtune.models.convert_weights import hf_to_tune

    from fastrm.models import load_base_weights, reward_model

    cfg = hf_model.config
    sd = {k: v for k, v in hf_model.state_dict().items() if k != "score.weight"}
    tune_sd = hf_to_tune(sd, num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
                         dim=cfg.hidden_size, head_dim=getattr(cfg, "head_dim", None))
    model = reward_model(build_decoder())
    load_base_weights(model, tune_sd)
    with torch.no_grad():
        model.head.weight.copy_(hf_model.score.weight)
    return model.eval()


def load_models(quick: bool, seed: int = 0):
    """``(fastrm_model, tokenizer, hf_model, description)`` sharing one set of weights."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig, \
        LlamaForSequenceClassification

    torch.manual_seed(seed)
    if quick:
        from fastrm.data.tokenizer import ByteChatTokenizer
        from fastrm.models import tiny_llama3

        kw = dict(vocab_size=261, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                  max_seq_len=4096, intermediate_dim=128)
        cfg = LlamaConfig(vocab_size=261, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0,
                          tie_word_embeddings=False, num_labels=1, pad_token_id=0)
        hf = LlamaForSequenceClassification(cfg).eval()
        tok = ByteChatTokenizer()
        fm = _hf_to_fastrm(hf, lambda: tiny_llama3(**kw))
        return fm, tok, hf, "tiny random Llama (2 layers, D=64), byte tokenizer"
    from fastrm.models.smollm2 import prepare_smollm2, smollm2_135m
    from fastrm.models.tokenizer import smollm2_tokenizer

    ckpt = prepare_smollm2(progress=False)
    tok = smollm2_tokenizer(str(ckpt))
    hf = AutoModelForSequenceClassification.from_pretrained(str(ckpt), num_labels=1,
                                                            dtype=torch.float32).eval()
    with torch.no_grad():
        hf.score.weight.normal_(0, hf.config.hidden_size ** -0.5)
    hf.config.pad_token_id = tok.pad_id
    fm = _hf_to_fastrm(hf, lambda: smollm2_135m(max_seq_len=8192))
    return fm, tok, hf, "SmolLM2-135M-Instruct reward model (random score head), fp32"


# -------------------------------------------------------------------------------------- data

def _best_of_n(prompts: list[str], answers: list[list[str]], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pool = [a for ans in answers for a in ans]
    rows = []
    for p, ans in zip(prompts, answers):
        own = list(dict.fromkeys(ans))[:n]
        rows.append({"prompt": p, "responses": own + [rng.choice(pool) for _ in range(n - len(own))]})
    return rows


def qa_feedback_rows(num_prompts: int, n: int) -> Optional[list[dict]]:
    if not SHARED_QA.is_file():
        return None
    by_q: dict[Any, tuple[str, list[str]]] = {}
    with open(SHARED_QA) as f:
        for line in f:
            r = json.loads(line)
            p, ans = by_q.setdefault(r["question_id"], (r["prompt"], []))
            ans.extend([r["chosen"], r["rejected"]])
    items = list(by_q.values())
    pool_items = items[: max(num_prompts, 64)]
    rows = _best_of_n([p for p, _ in pool_items], [a for _, a in pool_items], n, seed=n)
    return rows[:num_prompts]


def synthetic_rows(num_prompts: int, n: int) -> list[dict]:
    from fastrm.data.synthetic import generate_rows

    src = generate_rows(num_prompts=max(num_prompts, 64), seed=1, responses_per_prompt=6,
                        held_out_categories=())
    rows = _best_of_n([r["prompt"] for r in src], [r["responses"] for r in src], n, seed=n)
    return rows[:num_prompts]


# ----------------------------------------------------------------------------------- scoring

def hf_score(hf, sequences: list[list[int]], batch_size: int, pad_id: int) -> list[float]:
    """transformers, padded batches in input order (TRL / RewardBench style)."""
    out: list[float] = []
    with torch.inference_mode():
        for i in range(0, len(sequences), batch_size):
            chunk = sequences[i:i + batch_size]
            L = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), L), dtype=torch.long)
            for j, s in enumerate(chunk):
                ids[j, :len(s)] = torch.tensor(s)
                mask[j, :len(s)] = 1
            out.extend(hf(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist())
    return out


def _measure(fn) -> tuple[Any, float, int]:
    gc.collect()
    base = common.rss_bytes()
    common.reset_peak_rss()
    t0 = time.perf_counter()
    res = fn()
    dt = time.perf_counter() - t0
    return res, dt, max(0, common.peak_rss_bytes() - base)


def bench_dataset(name: str, rows: list[dict], scorer, hf, pad_id: int, hf_batch: int,
                  repeats: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    prepared = scorer.prepare_rows(rows)
    tokenize_s = time.perf_counter() - t0
    groups = [g for _, _, g in prepared]
    seqs = [g.sequence(k) for g in groups for k in range(len(g.responses))]
    n_resp = len(seqs)
    res: dict[str, Any] = {"dataset": name, "rows": len(rows), "responses": n_resp,
                           "best_of": len(rows[0]["responses"]), "fastrm_tokenize_s": tokenize_s}
    outputs = {}
    for side in ("fastrm", "transformers"):
        times, peaks = [], []
        for _ in range(repeats):
            if side == "fastrm":
                before = dict(scorer.stats)
                r, dt, peak = _measure(lambda: scorer.score_groups(groups))
                outputs[side] = [x for g in r for x in g]
                computed = scorer.stats["tokens"] - before["tokens"]
            else:
                outputs[side], dt, peak = _measure(lambda: hf_score(hf, seqs, hf_batch, pad_id))
                computed = sum(len(c) * max(len(s) for s in c) for c in
                               (seqs[i:i + hf_batch] for i in range(0, n_resp, hf_batch)))
            times.append(dt)
            peaks.append(peak)
        med = statistics.median(times)
        res[side] = {"seconds": times, "median_s": med, "responses_per_s": n_resp / med,
                     "rows_per_s": len(rows) / med, "peak_rss_added_bytes": max(peaks),
                     "tokens_computed": computed}
    # both scorers gave the same rewards (else the timings would compare different work)
    res["max_abs_reward_diff"] = max(abs(a - b) for a, b in zip(outputs["fastrm"],
                                                                 outputs["transformers"]))
    res["real_tokens"] = sum(len(s) for s in seqs)
    res["speedup"] = res["transformers"]["median_s"] / res["fastrm"]["median_s"]
    return res


# ------------------------------------------------------------------------------------ server

def bench_server(scorer, rows: list[dict], clients: list[int], requests_per_client: int,
                 max_wait_ms: float) -> list[dict[str, Any]]:
    from fastrm.inference.server import RewardServer

    server = RewardServer(scorer, port=0, max_wait_ms=max_wait_ms)
    th = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    th.start()
    url = "http://%s:%d/score" % server.server_address[:2]

    def call(row):
        data = json.dumps({"rows": [row]}).encode()
        t0 = time.perf_counter()
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            json.loads(r.read())
        return time.perf_counter() - t0

    out = []
    try:
        call(rows[0])  # warm up
        for c in clients:
            n = max(c * requests_per_client, 8)
            batches0 = server.batcher.stats["batches"]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(c) as ex:
                lat = list(ex.map(call, [rows[i % len(rows)] for i in range(n)]))
            wall = time.perf_counter() - t0
            lat.sort()
            out.append({"clients": c, "requests": n, "requests_per_s": n / wall,
                        "p50_ms": 1000 * lat[len(lat) // 2],
                        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                        "batches": server.batcher.stats["batches"] - batches0})
    finally:
        server.shutdown()
        server.server_close()
    return out


# ------------------------------------------------------------------------------------ report

def _table(rows, columns, fmt) -> str:
    return common.md_table([fmt(r) for r in rows], columns, align_right={k for k, _ in columns})


def report(result: dict[str, Any]) -> str:
    lines = [f"Scoring: fastrm vs transformers (padded), {result['model']}", "",
             common.machine_line(result["machine"]), ""]
    lines.append(_table(result["scoring"], [
        ("dataset", "data"), ("best_of", "N"), ("rows", "rows"),
        ("fastrm_rps", "fastrm rows/s"), ("hf_rps", "transformers rows/s"),
        ("speedup", "speedup"), ("fastrm_mem", "fastrm peak MiB"), ("hf_mem", "transformers peak MiB"),
        ("tokens", "tokens computed fastrm / transformers"), ("diff", "max abs reward diff")],
        lambda r: {"dataset": r["dataset"], "best_of": r["best_of"], "rows": r["rows"],
                   "fastrm_rps": f"{r['fastrm']['rows_per_s']:.2f}",
                   "hf_rps": f"{r['transformers']['rows_per_s']:.2f}",
                   "speedup": f"{r['speedup']:.2f}x",
                   "fastrm_mem": f"{r['fastrm']['peak_rss_added_bytes'] / 2**20:.0f}",
                   "hf_mem": f"{r['transformers']['peak_rss_added_bytes'] / 2**20:.0f}",
                   "tokens": f"{r['fastrm']['tokens_computed']} / {r['transformers']['tokens_computed']}",
                   "diff": f"{r['max_abs_reward_diff']:.1e}"}))
    lines += ["", f"fastrm serve (/score, one best-of-4 synthetic row per request, max wait "
                  f"{result['server_max_wait_ms']} ms):", ""]
    lines.append(_table(result["server"], [
        ("clients", "clients"), ("requests", "requests"), ("rps", "requests/s"),
        ("p50", "p50 ms"), ("p99", "p99 ms"), ("batches", "batches")],
        lambda r: {"clients": r["clients"], "requests": r["requests"],
                   "rps": f"{r['requests_per_s']:.2f}", "p50": f"{r['p50_ms']:.0f}",
                   "p99": f"{r['p99_ms']:.0f}", "batches": r["batches"]}))
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    sc = result["scoring"]
    labels = [f"{r['dataset']}\nbest-of-{r['best_of']}" for r in sc]
    x = range(len(sc))
    axes[0].bar([i - 0.2 for i in x], [r["fastrm"]["rows_per_s"] for r in sc], 0.4, label="fastrm")
    axes[0].bar([i + 0.2 for i in x], [r["transformers"]["rows_per_s"] for r in sc], 0.4,
                label="transformers (padded)")
    for i, r in enumerate(sc):
        axes[0].text(i, r["fastrm"]["rows_per_s"], f"{r['speedup']:.1f}x", ha="center", va="bottom")
    axes[0].set_xticks(list(x), labels)
    axes[0].set_ylabel("rows (prompts) / s")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[0].set_title("scoring throughput")
    sv = result["server"]
    axes[1].plot([r["clients"] for r in sv], [r["requests_per_s"] for r in sv], "o-",
                 label="requests/s")
    ax2 = axes[1].twinx()
    ax2.plot([r["clients"] for r in sv], [r["p99_ms"] for r in sv], "s--", color="C3",
             label="p99 ms")
    ax2.set_ylabel("p99 latency ms")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("concurrent clients")
    axes[1].set_ylabel("requests / s")
    axes[1].set_title("fastrm serve")
    fig.suptitle(f"{result['model']} -- {result['machine']['date_utc']}", fontsize=9)
    common.save_figure(fig, path)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, few rows (CI smoke run)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompts", type=int, default=None,
                   help="qa_feedback rows at best-of-4 (half at best-of-16), synthetic twice "
                   "that (default 6; 4 with --quick)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--hf-batch-size", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/score_cpu[_quick].json)")
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    from fastrm.inference import RewardScorer

    prompts = args.prompts or (4 if args.quick else 6)
    repeats = args.repeats or (1 if args.quick else 2)
    fm, tok, hf, desc = load_models(args.quick)
    pad_id = hf.config.pad_token_id if hf.config.pad_token_id is not None else 0
    scorer = RewardScorer(fm, tok, batch_tokens=args.batch_tokens)
    result: dict[str, Any] = {"model": desc, "machine": common.machine_info(args.threads),
                              "batch_tokens": args.batch_tokens,
                              "hf_batch_size": args.hf_batch_size, "scoring": [],
                              "server_max_wait_ms": args.max_wait_ms}
    for n in (4, 16):
        qa = None if args.quick else qa_feedback_rows(prompts if n == 4 else max(2, prompts // 2), n)
        if args.quick:
            result.setdefault("skipped", []).append("qa_feedback: not in --quick (byte tokenizer)")
        elif qa is None:
            result.setdefault("skipped", []).append(f"qa_feedback: {SHARED_QA} absent")
        else:
            result["scoring"].append(bench_dataset("qa_feedback", qa, scorer, hf, pad_id,
                                                   args.hf_batch_size, repeats))
        result["scoring"].append(bench_dataset("synthetic", synthetic_rows(prompts * 2, n), scorer,
                                               hf, pad_id, args.hf_batch_size, repeats))
        print(f"best-of-{n} done", file=sys.stderr, flush=True)
    clients = [int(c) for c in args.clients.split(",")]
    result["server"] = bench_server(scorer, synthetic_rows(64, 4), clients,
                                    requests_per_client=2,
                                    max_wait_ms=args.max_wait_ms)
    result["machine"]["load_average_after"] = common.load_average()
    out = Path(args.out) if args.out else RESULTS / ("score_cpu_quick.json" if args.quick else
                                                     "score_cpu.json")
    table = report(result)
    print(table)
    common.write_json(out, result)
    out.with_suffix(".md").write_text(table + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
