"""Head-to-head with TRL: the same model, pairs and optimizer through TRL's ``RewardTrainer`` and fastrm.

Needs the ``bench`` extra (``pip install "fastrm[bench]"``: trl, transformers); without it the
script exits with a message saying so. The SmolLM2-135M-Instruct checkpoint is prepared with
:func:`fastrm.models.smollm2.prepare_smollm2` (no hub access needed).

Same work on both sides
    * model: SmolLM2-135M-Instruct, loaded by transformers as ``LlamaForSequenceClassification``
      (one label, no bias) for TRL and by torchtune's ``FullModelHFCheckpointer`` into
      :class:`fastrm.models.RewardModel` for fastrm; the reward head gets the same values on both
      sides (``w ~ N(0, 1/(D+1))``, seeded; fastrm's bias is set to 0 and frozen because HF's
      ``score`` has none).
    * the embedding row of HF's ``pad_token_id`` (``padding_idx``: SmolLM2's ``<|im_end|>``, a
      real token of every turn) never gets a gradient from TRL; fastrm's side zeroes that row's
      gradient too, so both take the same update.
    * pairs: one list of conversational pairs in one order (prompts shuffled with the seed, the
      pairs of a prompt kept together, so that grouped responses have something to group);
      TRL drops the pairs longer than ``max_length`` as it always does; the timed fastrm steps
      hold exactly the pairs of the matching TRL step (``batch_pairs`` pairs per step).
    * tokens: both sides score TRL's tokens (``apply_chat_template``, ending ``<|im_end|>\\n``);
      TRL reads the reward at the last non-pad token, the final ``\\n`` (SmolLM2's pad token is
      ``<|im_end|>``), and so does fastrm (its reward position is each sequence's last token).
      The TRL worker checks that TRL's processed dataset holds exactly the plan's ids. fastrm's
      own tokenizer (the same convention: the model's chat template) is compared too and the
      pairs where it differs are counted (``fastrm_tokenizer_mismatched_pairs``; 0 since the
      prepared directory declares ``PreTrainedTokenizerFast``: transformers 5's
      ``GPT2Tokenizer`` class rebuilds the pre-tokenizer and drops the ``Digits`` step of
      SmolLM2's ``tokenizer.json``, so ``"\\n\\n2013"`` gave ``\\n \\n 2 0 1 3`` there).
    * optimizer: ``torch.optim.AdamW`` (lr, betas, eps, weight decay; the same implementation
      on both sides, ``--adamw fused`` by default, transformers' own default ``adamw_torch_fused``),
      constant lr, gradient clipping at ``max_grad_norm``; loss: Bradley-Terry mean over the
      step's pairs.
    * dtype: ``--dtype auto`` (default) is bf16 on CPUs with AVX-512 BF16 / AMX and fp32 elsewhere
      (the issue's rule: fp32 on CPU unless the CPU has bf16 support), pure bf16 weights on both
      sides; ``--threads`` intra-op threads (default 1: on a 2-core machine shared with other
      work, 2 OpenMP threads wait at every parallel region's barrier whenever another process
      holds one core; the same step measured 17-61 s with 2 threads against 6 s with 1), SDPA
      attention on the TRL side. fastrm runs as a user gets it: fused layer ops and its automatic
      attention backend (``cpu_flash`` on AVX-512 BF16 CPUs in bf16, ``sdpa_segments``
      otherwise), both recorded in the result.

    Proof (independent of the draw; ``benchmarks/README.md``): an fp32 first step (no TF32) on
    both sides, losses within ``FP32_LOSS_ATOL`` and pre-clip gradient norms within
    ``FP32_GRAD_NORM_RTOL``; and the first step of every speed run, in its dtype, within
    ``c * u * B`` (:func:`check_rounding_bound`, :func:`rounding_scale`). The script exits 1
    when a check fails.

fastrm configurations (each with and without activation checkpointing, each against the TRL
run with the same checkpointing setting):

    ``packed``     the step's 2B full sequences end to end in one row, per-sequence attention;
    ``prefix``     + prefix sharing: each pair's prompt computed once for its two responses;
    ``grouped``    + grouped responses: the step's pairs of one prompt merged into one group
                   (prompt once, each distinct response once, the same comparisons).

Reported per run: pairs/s and real tokens/s (tokens of the pairs' full sequences, the same
numerator on both sides; medians over the timed steps), tokens computed per step, pad fraction,
step time min/median/max, collation time (untimed), peak memory (CPU: the run's peak RSS;
CUDA: torch's peak allocated memory), pairs dropped or truncated for length, the speed-up
(median over the timed steps of TRL's step time / fastrm's on the same pairs) and the memory
ratio. Timed span on both sides (:data:`TIMED_SPAN`): forward, backward, clipping, AdamW step,
zero_grad on a batch already on the device. Warm-up: the mode's untimed steps, plus, with
``--shape-warmup`` (default on CUDA), forward + backward once on every step's batch before
timing (Triton compiles one variant per block-size bucket and integer specialization).
Each run is a fresh subprocess (so peak memory is its own); a guard kills a run when the
machine's available memory falls under ``--min-free-gib``.

Run (the CPU is shared: take the benchmark lock)::

    flock /tmp/fastrm_bench.lock python benchmarks/bench_trl.py --mode quick
    flock /tmp/fastrm_bench.lock python benchmarks/bench_trl.py --mode full

Writes ``benchmarks/results/trl_<mode>.json``, ``.md`` and ``.png``.

Files: this script (the fastrm side, the runs' orchestration, the command line),
``trl_plan.py`` (the pairs, tokens and head values both sides train on), ``trl_peer.py`` (the
TRL side), ``trl_report.py`` (table and plot), ``common.py`` (machine, memory, AdamW).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import torch

import common
from common import RESULTS
from trl_plan import CONFIGS, make_plan
from trl_report import write_report

#: the same-work proof. fp32 first step (no TF32): loss to ``FP32_LOSS_ATOL``, pre-clip gradient
#: norm to ``FP32_GRAD_NORM_RTOL`` (fp32 rounding through 30 layers is ~1e-6 on both; other work
#: moves them by ~1e-2 or more). First step in the speed run's dtype: |dloss| <= c * u * B
#: (``check_rounding_bound``) with ``ROUNDING_C`` (see benchmarks/README.md for how it was set).
FP32_LOSS_ATOL = 1e-5
FP32_GRAD_NORM_RTOL = 1e-4
ROUNDING_C = 1.0
GIB = 1024 ** 3
#: what ``step_s`` covers on both sides (written into every result)
TIMED_SPAN = ("forward + backward + gradient clipping + AdamW step + zero_grad on a batch "
              "already on the device; collation and the host-to-device copy excluded on both "
              "sides (collation timed separately)")

#: per-mode settings. ``qa_feedback`` uses the issue's reference setting (max_length 1024,
#: batch 4 pairs); the synthetic long-tailed set a smaller max_length so quick mode stays short.
MODES = {
    "quick": {"warmup": 1, "steps": 3, "datasets": {
        "qa_feedback": {"max_length": 1024},
        "synthetic": {"max_length": 512, "num_prompts": 240, "length_scale": 3.0}}},
    "full": {"warmup": 1, "steps": 8, "datasets": {
        "qa_feedback": {"max_length": 1024},
        "synthetic": {"max_length": 1024, "num_prompts": 600, "length_scale": 3.0}}},
}


# ----------------------------------------------------------------------------------------------
# fastrm side
# ----------------------------------------------------------------------------------------------

def step_groups(pairs: list[dict], config: str) -> list:
    """The :class:`PreferenceGroup` list of one step. ``packed`` / ``prefix``: one group per
    pair; ``grouped``: the step's pairs of one prompt merged (prompt once, distinct responses
    once, every comparison kept, duplicates included, as TRL computes them)."""
    from fastrm.data.group import PreferenceGroup
    if config != "grouped":
        return [PreferenceGroup(prompt_tokens=p["prompt"], responses=[p["chosen"], p["rejected"]],
                                comparisons=[(0, 1, None)], prompt_id=p["prompt_id"],
                                source_index=p["row"]) for p in pairs]
    merged: "OrderedDict[Any, dict]" = OrderedDict()
    for p in pairs:
        m = merged.setdefault(p["prompt_id"], {"prompt": p["prompt"], "resp": {}, "cmp": [],
                                               "rows": []})
        if m["prompt"] != p["prompt"]:
            raise RuntimeError(f"pairs of prompt {p['prompt_id']} have different prompt tokens")
        idx = [m["resp"].setdefault(tuple(p[s]), len(m["resp"])) for s in ("chosen", "rejected")]
        m["cmp"].append((idx[0], idx[1], None))
        m["rows"].append(p["row"])
    return [PreferenceGroup(prompt_tokens=m["prompt"], responses=[list(r) for r in m["resp"]],
                            comparisons=m["cmp"], prompt_id=pid, source_index=m["rows"])
            for pid, m in merged.items()]


def rounding_scale(hidden: torch.Tensor, weight: torch.Tensor, chosen: torch.Tensor,
                   rejected: torch.Tensor) -> float:
    """The first-order size of the Bradley-Terry loss's sensitivity to rounding, from the
    actual values of a step: ``B = (1/P) sum_p sigmoid(r_rej - r_ch) (S_ch + S_rej)`` with
    ``S_n = sum_d |h_nd w_d|`` (the reward dot product's absolute terms) and ``r = h . w``.

    A relative rounding error ``u`` in the hidden states at the reward positions and in the
    head's products moves a reward by at most ``u * S_n``, and the loss (``dL/dr_ch =
    -sigmoid(r_rej - r_ch) / P``) by at most ``u * B`` to first order; two implementations
    that round differently (HF's modules vs torchtune's, in one dtype) therefore differ by a
    small multiple of ``u * B``, while different work (other pairs, another head) moves the loss
    by the rewards themselves.

    Args:
        hidden: ``[N, D]`` hidden states at the ``N`` reward positions.
        weight: ``[D]`` or ``[1, D]`` reward-head weight.
        chosen, rejected: ``[P]`` indices into the ``N`` rewards.
    """
    h = hidden.detach().double().cpu()
    w = weight.detach().double().cpu().reshape(-1)
    r = h @ w
    terms = (h * w).abs().sum(-1)
    c, j = chosen.cpu(), rejected.cpu()
    return float((torch.sigmoid(r[j] - r[c]) * (terms[c] + terms[j])).mean())


def run_fastrm(plan: dict[str, Any], config: str, checkpointing: bool) -> dict[str, Any]:
    """Trains the plan's steps with fastrm (packed batch, varlen attention, fused head + loss).

    Per step: collation (``collate_s``, untimed), the host-to-device copy (untimed), then the
    timed span (``step_s``): forward, backward, gradient clipping, AdamW step, zero_grad, a
    device sync; also the loss, the pre-clip gradient norm and, on the first step, the
    :func:`rounding_scale` of its rewards. With ``spec["shape_warmup"]`` (CUDA) every step's
    batch first runs forward + backward once, untimed, gradients discarded: Triton compiles a
    variant per block-size bucket and integer specialization of the head and layer kernels, so
    each variant the timed steps launch is compiled before the clock starts."""
    from torchtune.modules import TransformerSelfAttentionLayer
    from torchtune.training import (FullModelHFCheckpointer, set_activation_checkpointing,
                                    set_default_dtype)

    from fastrm import RewardLoss
    from fastrm.data import collate_packed
    from fastrm.models import load_base_weights, reward_model

    spec = plan["spec"]
    torch.set_num_threads(spec["threads"])
    common.set_fp32_matmul(spec)
    dtype = getattr(torch, spec["dtype"])
    t_load = time.perf_counter()
    with set_default_dtype(dtype):  # built in its dtype, as the recipe does
        model = reward_model("fastrm.models.smollm2.smollm2_135m")
    with tempfile.TemporaryDirectory(prefix="fastrm_bench_ckpt_") as out_dir:  # never written
        ckpt = FullModelHFCheckpointer(checkpoint_dir=plan["checkpoint_dir"],
                                       checkpoint_files=["model.safetensors"],
                                       model_type="LLAMA3_2", output_dir=out_dir)
        load_base_weights(model, ckpt.load_checkpoint()["model"])
    with torch.no_grad():
        model.head.weight.copy_(plan["head_weight"])  # bias-free, as HF's score head
    device = torch.device(spec.get("device", "cpu"))
    model.to(device)
    if checkpointing:
        set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = common.make_adamw(params, spec)
    loss_fn = RewardLoss()
    model.train()
    kept, bsz = plan["kept_pairs"], spec["batch_pairs"]
    n_steps = spec["warmup"] + spec["steps"]
    rec: dict[str, list] = {"step_s": [], "collate_s": [], "loss": [], "grad_norm": [],
                            "tokens_computed": [], "real_tokens": [], "pairs": []}
    batches = []
    for s in range(n_steps):
        pairs = kept[s * bsz:(s + 1) * bsz]
        t0 = time.perf_counter()
        batches.append(collate_packed(step_groups(pairs, config), prefix_sharing=config != "packed"))
        rec["collate_s"].append(time.perf_counter() - t0)
        rec["tokens_computed"].append(int(batches[-1].tokens.shape[1]))
        rec["real_tokens"].append(sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"])
                                      for p in pairs))
        rec["pairs"].append(len(pairs))
    load_s = time.perf_counter() - t_load
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    shape_warmup = 0
    if spec.get("shape_warmup"):
        for b in batches:  # untimed: compiles every kernel variant the timed steps launch
            b = b.to(device)
            loss, _ = loss_fn.from_hidden(model(b), model.head.weight, model.head.bias, b)
            loss.backward()
            opt.zero_grad(set_to_none=True)
            shape_warmup += 1
        sync()
    rss_before = common.peak_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    max_norm = spec["max_grad_norm"] or float("inf")  # inf: the norm only, nothing clipped
    emb = model.decoder.tok_embeddings.weight
    pad_row = plan.get("embedding_padding_idx")
    for s, b in enumerate(batches):
        b = b.to(device)
        sync()
        t0 = time.perf_counter()
        hidden = model(b)
        loss, _ = loss_fn.from_hidden(hidden, model.head.weight, model.head.bias, b)
        loss.backward()
        if pad_row is not None and emb.grad is not None:
            emb.grad[pad_row] = 0  # as HF's padding_idx on the TRL side (trl_plan.make_plan)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        rec["step_s"].append(time.perf_counter() - t0)
        rec["loss"].append(float(loss.detach()))
        rec["grad_norm"].append(float(grad_norm))
        if s == 0:
            from fastrm.attention import VarlenMetadata, select_backend
            at = hidden.detach().reshape(-1, hidden.shape[-1])[b.reward_positions]
            rec["rounding_scale"] = rounding_scale(at, model.head.weight, b.chosen_index,
                                                   b.rejected_index)
            probe = torch.zeros(1, 1, model.decoder.layers[0].attn.head_dim, dtype=dtype,
                                device=device)
            meta = VarlenMetadata.build(b.cu_seqlens, b.segment_prefix)
            rec["attention_backend"] = select_backend(probe, meta.backend, meta.has_prefix)
        del hidden, loss
    rep = model.fuse_report
    return {**rec, "peak_rss_bytes": common.peak_rss_bytes(),
            "peak_rss_before_train_bytes": rss_before, "load_s": load_s,
            "shape_warmup_batches": shape_warmup,
            "peak_cuda_allocated_bytes": (torch.cuda.max_memory_allocated()
                                          if device.type == "cuda" else None),
            "fused_ops": None if rep is None else {"rms_norm": len(rep.rms_norm),
                                                   "swiglu": len(rep.swiglu), "rope": len(rep.rope)}}


# ----------------------------------------------------------------------------------------------
# orchestration: one subprocess per run, memory guard
# ----------------------------------------------------------------------------------------------

def launch(plan_path: Path, side: str, config: str, checkpointing: bool, min_free: float,
           timeout: float) -> dict[str, Any]:
    """Runs one worker subprocess; kills it (and says so) if free memory falls below
    ``min_free`` GiB or it exceeds ``timeout`` seconds."""
    out = plan_path.with_name(f"{side}_{config}_{int(checkpointing)}.json")
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--plan",
           str(plan_path), "--config", config, "--checkpointing", str(int(checkpointing)),
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(json.loads(plan_path.with_suffix(".spec").read_text())["threads"])}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    reason: list[str] = []
    log_lines: list[str] = []

    def reader():
        for line in proc.stdout:  # type: ignore[union-attr]
            log_lines.append(line)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    while proc.poll() is None:
        if common.available_memory_bytes() < min_free * GIB:
            reason.append(f"killed: machine's available memory fell below {min_free} GiB")
            proc.kill()
        elif time.perf_counter() - t0 > timeout:
            reason.append(f"killed: ran longer than {timeout:.0f} s")
            proc.kill()
        time.sleep(0.25)
    th.join(timeout=5)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.is_file():
        tail = "".join(log_lines[-15:])
        return {"side": side, "config": config, "checkpointing": checkpointing,
                "error": reason[0] if reason else f"exit code {proc.returncode}", "log_tail": tail,
                "wall_s": wall}
    res = json.loads(out.read_text())
    res.update(side=side, config=config, checkpointing=checkpointing, wall_s=wall)
    return res


def memory_kind(device: str) -> str:
    """What the memory column measures on ``device``."""
    return "peak CUDA allocated" if device == "cuda" else "peak RSS"


def step_stats(run: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Timed-step statistics (warm-up steps excluded): medians over the timed steps of the
    per-step rates, step time min / median / max, median collation time (not in the timed
    span), peak memory (CPU: the process's peak RSS; CUDA: torch's peak allocated memory)."""
    t = run["step_s"][warmup:]
    pairs, real, comp = (run[k][warmup:] for k in ("pairs", "real_tokens", "tokens_computed"))
    pad = sum(comp) - sum(real) if run["side"] == "trl" else 0
    cuda = run.get("peak_cuda_allocated_bytes") is not None
    collate = run.get("collate_s", [])[warmup:]
    return {
        "pairs_per_s": statistics.median(p / x for p, x in zip(pairs, t)),
        "real_tokens_per_s": statistics.median(r / x for r, x in zip(real, t)),
        "tokens_computed_per_step": sum(comp) / len(t), "real_tokens_per_step": sum(real) / len(t),
        "pad_fraction": pad / sum(comp) if sum(comp) else 0.0,
        "step_s_min": min(t), "step_s_median": statistics.median(t), "step_s_max": max(t),
        "collate_s_median": statistics.median(collate) if collate else None,
        "memory_kind": memory_kind("cuda" if cuda else "cpu"),
        "peak_memory_gib": (run["peak_cuda_allocated_bytes"] if cuda else run["peak_rss_bytes"]) / GIB,
    }


def paired_speedup(trl: dict[str, Any], fr: dict[str, Any], warmup: int) -> float:
    """Median over the timed steps of TRL's step time / fastrm's for the same step (the same
    pairs on both sides, so each step is a paired comparison)."""
    return statistics.median(a / b for a, b in zip(trl["step_s"][warmup:], fr["step_s"][warmup:]))


#: unit roundoff per dtype (half an ulp of 1: 2^-24 fp32, 2^-8 bf16, 2^-11 fp16)
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


def check_fp32_first_step(trl: dict, fr: dict, loss_atol: float, grad_norm_rtol: float) -> dict:
    """Same work, shown in fp32 (no TF32): from identical weights on the same pairs, the first
    step's loss and pre-clip gradient norm agree within fp32 rounding."""
    d_loss = abs(trl["loss"][0] - fr["loss"][0])
    d_gn = abs(trl["grad_norm"][0] - fr["grad_norm"][0]) / max(abs(trl["grad_norm"][0]), 1e-30)
    return {"loss_trl": trl["loss"][0], "loss_fastrm": fr["loss"][0], "abs_diff_loss": d_loss,
            "grad_norm_trl": trl["grad_norm"][0], "grad_norm_fastrm": fr["grad_norm"][0],
            "rel_diff_grad_norm": d_gn, "loss_atol": loss_atol, "grad_norm_rtol": grad_norm_rtol,
            "ok": bool(d_loss <= loss_atol and d_gn <= grad_norm_rtol)}


def check_rounding_bound(trl: dict, fr: dict, dtype: str, c: float) -> dict:
    """The first step in the dtype of the speed run (identical weights, same pairs): ``|dloss|
    <= c * u * B`` with ``u`` the dtype's unit roundoff and ``B`` the step's
    :func:`rounding_scale` (fastrm's actual hidden states, head and rewards)."""
    d = abs(trl["loss"][0] - fr["loss"][0])
    bound = c * UNIT_ROUNDOFF[dtype] * fr["rounding_scale"]
    return {"abs_diff_loss": d, "bound": bound, "c": c, "unit_roundoff": UNIT_ROUNDOFF[dtype],
            "rounding_scale": fr["rounding_scale"], "ratio": d / bound if bound else float("inf"),
            "ok": bool(d <= bound)}


def later_step_diffs(trl: dict, fr: dict) -> list[float]:
    """|dloss| per later step (reported, not checked: after the first update both sides start
    from weights that already differ by rounding)."""
    return [abs(a - b) for a, b in zip(trl["loss"][1:], fr["loss"][1:])]


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def write_plan(work: Path, name: str, plan: dict[str, Any]) -> Path:
    """Pickles ``plan`` for the worker subprocesses (and its spec beside it, for ``launch``)."""
    path = work / f"{name}.pkl"
    with open(path, "wb") as f:
        pickle.dump(plan, f)
    path.with_suffix(".spec").write_text(json.dumps(plan["spec"]))
    return path


def _run(plan_path: Path, side: str, config: str, ac: bool, args, label: str) -> dict[str, Any]:
    run = launch(plan_path, side, config, ac, args.min_free_gib, args.run_timeout)
    if "error" in run:
        print(f"{label}: {run['error']}\n{run.get('log_tail', '')}", flush=True)
    return run


def prove_same_work(plan: dict[str, Any], work: Path, ds: str, configs: list[str], args,
                    speed_dtype: str) -> dict[str, Any]:
    """The fp32 half of the proof: the first step of TRL and of each fastrm configuration in
    fp32 (no TF32, no checkpointing) from the plan's weights on its first step's pairs."""
    proof_plan = {**plan, "spec": {**plan["spec"], "dtype": "float32", "warmup": 0, "steps": 1,
                                   "tf32": False, "shape_warmup": False}}
    path = write_plan(work, f"{ds}_proof", proof_plan)
    out: dict[str, Any] = {"runs": {}, "checks": {}}
    trl = _run(path, "trl", "trl", False, args, f"{ds} proof trl")
    out["runs"]["trl"] = trl
    for cfg in configs:
        fr = _run(path, "fastrm", cfg, False, args, f"{ds} proof fastrm {cfg}")
        out["runs"][f"fastrm_{cfg}"] = fr
        if "error" in trl or "error" in fr:
            out["checks"][f"fastrm_{cfg}"] = {"ok": False, "error": trl.get("error") or fr["error"]}
            continue
        chk = check_fp32_first_step(trl, fr, args.fp32_loss_atol, args.fp32_grad_norm_rtol)
        chk["rounding"] = check_rounding_bound(trl, fr, "float32", args.rounding_c)  # reported
        out["checks"][f"fastrm_{cfg}"] = chk
        print(f"{ds} proof fp32 fastrm {cfg}: |dloss| {chk['abs_diff_loss']:.2e} (<= "
              f"{args.fp32_loss_atol:g}), grad norm rel. diff {chk['rel_diff_grad_norm']:.2e} "
              f"(<= {args.fp32_grad_norm_rtol:g}): {'ok' if chk['ok'] else 'FAILED'}", flush=True)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=sorted(MODES), default="quick")
    ap.add_argument("--datasets", default="qa_feedback,synthetic",
                    help="comma-separated subset of qa_feedback,synthetic")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--checkpointing", default="0,1", help="'0', '1' or '0,1' (both sides)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (mode default)")
    ap.add_argument("--batch-pairs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: both sides on the GPU, memory as torch's peak allocated")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="dtype of the speed runs; auto: the recipe's rule (bfloat16 on CUDA and "
                         "on CPUs with AVX-512 BF16 / AMX, else float32)")
    ap.add_argument("--adamw", choices=("fused", "foreach", "for-loop"), default="fused",
                    help="torch AdamW implementation, the same on both sides")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads per run (default 1: see the module docstring)")
    ap.add_argument("--shape-warmup", choices=("auto", "on", "off"), default="auto",
                    help="before timing, run forward + backward once on every step's batch "
                         "(both sides; auto: on CUDA, where Triton compiles per shape bucket)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp32-loss-atol", type=float, default=FP32_LOSS_ATOL,
                    help="proof: first-step loss agreement in fp32")
    ap.add_argument("--fp32-grad-norm-rtol", type=float, default=FP32_GRAD_NORM_RTOL,
                    help="proof: first-step gradient-norm agreement in fp32 (relative)")
    ap.add_argument("--rounding-c", type=float, default=ROUNDING_C,
                    help="proof: c of the first-step bound |dloss| <= c * u * B in the speed dtype")
    ap.add_argument("--no-proof", action="store_true",
                    help="skip the fp32 proof runs (speed only; the bound is still checked)")
    ap.add_argument("--min-free-gib", type=float, default=1.5)
    ap.add_argument("--run-timeout", type=float, default=1800)
    ap.add_argument("--out", default=None, help="output stem (default results/trl_<mode>)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the .md and .png from the stem's existing .json")
    # worker mode (internal)
    ap.add_argument("--worker", choices=("trl", "fastrm"), default=None)
    ap.add_argument("--plan", default=None)
    ap.add_argument("--config", default="packed")
    args = ap.parse_args(argv)

    if args.worker:
        with open(args.plan, "rb") as f:
            plan = pickle.load(f)
        if args.worker == "trl":
            from trl_peer import run_trl
            res = run_trl(plan, bool(int(args.checkpointing)))
        else:
            res = run_fastrm(plan, args.config, bool(int(args.checkpointing)))
        Path(args.out).write_text(json.dumps(res))
        return 0

    if args.report_only:
        stem = Path(args.out) if args.out else RESULTS / f"trl_{args.mode}"
        write_report(json.loads(stem.with_suffix(".json").read_text()), stem)
        print(stem.with_suffix(".md").read_text())
        return 0
    try:
        from trl_peer import trl_versions
        versions = trl_versions()
    except ImportError as e:
        print(f"bench_trl: skipped: the TRL peer needs the bench extra "
              f"(pip install 'fastrm[bench]'): {e}")
        return 0
    from fastrm.models.smollm2 import prepare_smollm2
    from fastrm.training.dtype import resolve_dtype
    checkpoint_dir = str(prepare_smollm2(progress=False))
    mode = MODES[args.mode]
    dtype = args.dtype
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_trl: --device cuda but CUDA is not available")
        return 2
    if dtype == "auto":  # the recipe's rule (dtype: auto)
        dtype = str(resolve_dtype("auto", torch.device(args.device))).replace("torch.", "")
    shape_warmup = args.shape_warmup == "on" or (args.shape_warmup == "auto" and args.device == "cuda")
    spec = {"warmup": mode["warmup"], "steps": args.steps or mode["steps"],
            "batch_pairs": args.batch_pairs, "lr": args.lr, "betas": list(args.betas),
            "eps": args.eps, "weight_decay": args.weight_decay,
            "max_grad_norm": args.max_grad_norm, "dtype": dtype, "threads": args.threads,
            "seed": args.seed, "attn_implementation": "sdpa", "adamw": args.adamw,
            "device": args.device, "shape_warmup": shape_warmup,
            # fp32 speed runs on CUDA use TF32 on both sides, as fastrm's recipe does
            "tf32": args.device == "cuda" and dtype == "float32"}
    acs = [bool(int(x)) for x in args.checkpointing.split(",")]
    configs = [c for c in args.configs.split(",") if c]
    result: dict[str, Any] = {"mode": args.mode, "spec": spec, "versions": versions,
                              "machine": common.machine_info(args.threads, args.device),
                              "date": common.utc_now(),
                              "timed_span": TIMED_SPAN,
                              "proof_settings": {"fp32_loss_atol": args.fp32_loss_atol,
                                                 "fp32_grad_norm_rtol": args.fp32_grad_norm_rtol,
                                                 "rounding_c": args.rounding_c},
                              "datasets": {}}
    stem = Path(args.out) if args.out else RESULTS / f"trl_{args.mode}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fastrm_bench_trl_"))
    failed = False
    for ds in [d for d in args.datasets.split(",") if d]:
        ds_cfg = mode["datasets"][ds]
        try:
            plan = make_plan(ds, ds_cfg, spec, checkpoint_dir)
        except FileNotFoundError as e:
            print(f"{ds}: skipped ({e})")
            result["datasets"][ds] = {"error": f"data not found ({e})"}
            continue
        r = {"length_policy": plan["length_policy"], "max_length": ds_cfg["max_length"],
             "fastrm_tokenizer_mismatched_pairs": plan["fastrm_tokenizer_mismatched_pairs"],
             "runs": {}, "proof": {}}
        result["datasets"][ds] = r
        print(f"{ds}: {plan['length_policy']}")
        if not args.no_proof:
            r["proof"]["fp32"] = prove_same_work(plan, work, ds, configs, args, dtype)
            failed |= not all(c["ok"] for c in r["proof"]["fp32"]["checks"].values())
        plan_path = write_plan(work, ds, plan)
        r["proof"]["first_step_bound"] = {}
        for ac in acs:
            for side, cfg in [("trl", "trl")] + [("fastrm", c) for c in configs]:
                key = f"{side}_{int(ac)}" if side == "trl" else f"fastrm_{cfg}_{int(ac)}"
                run = _run(plan_path, side, cfg, ac, args, f"{ds} {key}")
                r["runs"][key] = run
                if "error" in run:
                    failed |= side == "fastrm"
                    continue
                run["summary"] = s = step_stats(run, spec["warmup"])
                print(f"{ds} {key}: {s['pairs_per_s']:.3f} pairs/s (median), median step "
                      f"{s['step_s_median']:.2f} s, {s['memory_kind']} {s['peak_memory_gib']:.2f} "
                      f"GiB, losses {[round(x, 5) for x in run['loss']]} (wall {run['wall_s']:.0f} s)",
                      flush=True)
                trl = r["runs"].get(f"trl_{int(ac)}")
                if side == "fastrm" and trl and "error" not in trl:
                    run["speedup_vs_trl"] = paired_speedup(trl, run, spec["warmup"])
                    chk = check_rounding_bound(trl, run, dtype, args.rounding_c)
                    chk["later_steps_abs_diff_loss"] = later_step_diffs(trl, run)
                    r["proof"]["first_step_bound"][key] = chk
                    failed |= not chk["ok"]
                    print(f"{ds} {key}: first step |dloss| {chk['abs_diff_loss']:.2e} <= "
                          f"{chk['bound']:.2e} (c u B): {'ok' if chk['ok'] else 'FAILED'}",
                          flush=True)
        result["machine"]["load_average_after"] = common.load_average()
        common.write_json(stem.with_suffix(".json"), result)
        write_report(result, stem)
    import shutil
    shutil.rmtree(work, ignore_errors=True)  # plans and per-run JSON, all copied into result
    result["machine"]["load_average_after"] = common.load_average()
    result["same_work_proven"] = not failed
    common.write_json(stem.with_suffix(".json"), result)
    write_report(result, stem)
    print(stem.with_suffix(".md").read_text())
    if failed:
        print("bench_trl: the same-work proof failed (or a fastrm run failed); see the table")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
