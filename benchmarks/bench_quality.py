"""What the loss options do to held-out accuracy and calibration: reward models trained with the
shipped recipe under each option, several seeds each, scored on held-out data.

Each run is :class:`fastrm.recipes.reward_model.RewardModelRecipe` on a config built from the
shipped ``smollm2_135m_synthetic.yaml`` (full mode: SmolLM2-135M-Instruct, the last layers and
the head trainable, a fixed step budget) or ``tiny_llama3_synthetic.yaml`` (quick mode: the tiny
random llama and the byte tokenizer), with only the data, the loss options, the seed and the
budget changed. After training, every held-out response is scored by the trained model's packed
forward (``RewardModel.rewards``) and the script computes, per run and held-out set:

* pairwise accuracy: the fraction of held-out comparisons with ``r_c > r_r``;
* reward mean and std over the held-out responses (centering should pull the mean to ~0);
* ECE of ``p = sigmoid(r_c - r_r)``: top-label expected calibration error, confidence
  ``max(p, 1 - p)`` in ``N_BINS = 10`` equal-width bins over ``[0.5, 1]``, a comparison counts as
  right when ``r_c > r_r`` (a tie as half right), ``ECE = sum_b n_b / n * |acc_b - conf_b|``;
* training wall time (``recipe.train()`` alone: no evaluation, no checkpoint inside it).

Over seeds: the mean and a 95% Student-t interval, ``mean +- t_{0.975, n-1} * s / sqrt(n)``.

Suites (data) and settings (every option alone on top of plain Bradley-Terry, so each effect is
attributable; the datasets of one suite are the same for all its settings):

* ``qa_feedback``: real human preferences (``../shared/data/qa_feedback``, train split; held out:
  the validation questions, scored as one group per question). Settings ``bt`` (same-prompt
  pairs, each pair trained on its own), ``centering``, ``label_smoothing``, ``cross_prompt``,
  ``grouped`` (the same pairs as one group per question, prefix computed once), and
  ``plackett_luce`` (questions whose 4 answers are completely and consistently ranked). No
  ``margins``: the data has binary preferences only.
* ``synthetic``: the synthetic verifiable set, pairs with score-difference margins; held out:
  the validation split and the held-out ``refusal`` category. Settings ``bt``, ``centering``,
  ``margins``, ``label_smoothing``, ``cross_prompt``.
* ``synthetic_k4``: the synthetic set with 4 scored responses per prompt (complete rankings
  only: prompts with tied scores are left out); settings ``grouped`` (all C(4,2) = 6
  comparisons of a prompt in one group), ``independent_pairs`` (the same 6 comparisons as 6
  separate pairs) and ``plackett_luce``.

Runs go seed by seed (every setting of seed 0, then seed 1, ...) and the JSON and Markdown are
rewritten after every run, so a stopped run still leaves a table.

    python benchmarks/bench_quality.py --mode quick      # tiny model, 1 seed, 2 steps: seconds
    python benchmarks/bench_quality.py --mode full      # SmolLM2-135M, 3 seeds: 46 min, 1 busy core

Outputs: ``results/quality_<mode>.json`` (config, machine, every run with its per-comparison
reward differences, the summary), ``.md`` (the table) and ``.png`` (accuracy with 95% intervals
per setting, one panel per suite and held-out set).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

import common

sys.modules.setdefault("bench_quality", sys.modules[__name__])  # configs name this module

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "fastrm" / "recipes" / "configs"
N_BINS = 10

# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------

#: two-sided 95% quantiles t_{0.975, df} of Student's t for df = 1..30 (standard tables)
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t_quantile_975(df: int) -> float:
    """``t_{0.975, df}``: the table above for ``df <= 30``, the normal 1.96 beyond (within 2%
    of the exact quantile there)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 values (df >= 1), got df={df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def t_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95% Student-t interval ``mean +- t_{0.975,n-1} s / sqrt(n)`` (``s`` the sample
    std, ``n - 1`` denominator). One value: the interval is ``None`` (unknown, not zero)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("t_interval of no values")
    n = len(vals)
    mean = sum(vals) / n
    if n == 1:
        return {"mean": mean, "lo": None, "hi": None, "half_width": None, "n": 1}
    s = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile_975(n - 1) * s / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "half_width": half, "n": n}


def pairwise_accuracy(diffs: torch.Tensor) -> float:
    """Fraction of comparisons with ``r_c - r_r > 0`` (as the recipe's evaluation counts)."""
    return float((diffs > 0).double().mean())


def expected_calibration_error(diffs: torch.Tensor, n_bins: int = N_BINS) -> dict[str, Any]:
    """Top-label ECE of ``p = sigmoid(diffs)`` (``diffs = r_c - r_r``, the chosen response is
    the right answer). Confidence ``c = max(p, 1-p) = sigmoid(|d|)``; correctness ``1`` if
    ``d > 0``, ``0.5`` if ``d == 0``, else ``0``; ``n_bins`` equal-width bins over ``[0.5, 1]``
    (bin ``b`` holds ``0.5 + b w <= c < 0.5 + (b+1) w``, the last one also ``c = 1``).
    Returns ``ece`` and per-bin ``count``, ``confidence`` and ``accuracy`` (``None`` if empty)."""
    d = diffs.double().reshape(-1)
    if d.numel() == 0:
        raise ValueError("expected_calibration_error of no comparisons")
    conf = torch.sigmoid(d.abs())
    correct = (d > 0).double() + 0.5 * (d == 0).double()
    width = 0.5 / n_bins
    idx = ((conf - 0.5) / width).floor().long().clamp_(0, n_bins - 1)
    ece, bins = 0.0, []
    for b in range(n_bins):
        m = idx == b
        k = int(m.sum())
        if k == 0:
            bins.append({"count": 0, "confidence": None, "accuracy": None})
            continue
        c, a = float(conf[m].mean()), float(correct[m].mean())
        ece += k / d.numel() * abs(a - c)
        bins.append({"count": k, "confidence": c, "accuracy": a})
    return {"ece": ece, "bins": bins}


# --------------------------------------------------------------------------------------------
# data (named by the configs as ``bench_quality.prepared_dataset``)
# --------------------------------------------------------------------------------------------

_DATA_CACHE: dict[str, list] = {}


def complete_ranking(group) -> bool:
    """Whether ``group``'s comparisons form one full, consistent ranking of its responses (each
    pair compared once, win counts ``K-1, ..., 0``), what Plackett-Luce needs."""
    k = group.num_responses
    pairs = {frozenset((i, j)) for i, j, _ in group.comparisons}
    wins = [0] * k
    for i, _, _ in group.comparisons:
        wins[i] += 1
    return (k >= 2 and len(group.comparisons) == k * (k - 1) // 2 == len(pairs)
            and sorted(wins) == list(range(k)))


def as_independent_pairs(groups) -> list:
    """Every comparison of every group as its own two-response group (same prompt, same
    responses, same margin): grouped data trained as independent pairs."""
    from fastrm.data.group import PreferenceGroup

    out = []
    for g in groups:
        for i, j, m in g.comparisons:
            out.append(PreferenceGroup(
                prompt_tokens=list(g.prompt_tokens), responses=[g.responses[i], g.responses[j]],
                comparisons=[(0, 1, m)], prompt_id=g.prompt_id, source_index=g.source_index,
                prompt_text=g.prompt_text, category=g.category))
    return out


def prepared_dataset(tokenizer, *, builder: str, complete_rankings_only: bool = False,
                     independent_pairs: bool = False, max_groups: Optional[int] = None,
                     subset_seed: int = 0, **kwargs: Any) -> list:
    """``builder(tokenizer, **kwargs)`` (a ``fastrm.datasets`` builder), tokenized once per
    process and reused by every run, then optionally reduced to complete rankings, split into
    independent pairs, or cut to ``max_groups`` groups drawn with ``subset_seed`` (the same
    held-out subset for every setting and seed)."""
    from omegaconf import OmegaConf

    from fastrm.training.config import resolve_component

    kwargs = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
              for k, v in kwargs.items()}
    key = json.dumps([builder, type(tokenizer).__name__, getattr(tokenizer, "path", None),
                      kwargs], sort_keys=True, default=str)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = list(resolve_component(builder)(tokenizer, **kwargs))
    groups = _DATA_CACHE[key]
    if complete_rankings_only:
        groups = [g for g in groups if complete_ranking(g)]
    if max_groups is not None and len(groups) > max_groups:
        keep = sorted(random.Random(subset_seed).sample(range(len(groups)), int(max_groups)))
        groups = [groups[i] for i in keep]
    if independent_pairs:
        groups = as_independent_pairs(groups)
    return groups


# --------------------------------------------------------------------------------------------
# suites and settings
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Suite:
    """One data source: the training set, the held-out sets and the packing of its runs."""

    name: str
    builder: str
    train: dict
    held_out: dict  # name -> builder kwargs (plus max_groups)
    seq_len: int    # per sequence (prompts cut from the left)
    row_len: int    # tokens per packed row
    steps: int      # optimizer steps per run (one row per step)
    needs_shared_data: bool = False


@dataclass(frozen=True)
class Setting:
    """A loss option (``loss`` overrides on plain Bradley-Terry) and/or a data layout (``data``
    overrides of the suite's training set)."""

    suite: str
    name: str
    loss: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    what: str = ""


QA = "fastrm.datasets.qa_feedback_dataset"
SYN = "fastrm.datasets.synthetic_preference_dataset"

SETTINGS = (
    Setting("qa_feedback", "bt", what="same-prompt pairs, each pair on its own"),
    Setting("qa_feedback", "centering", {"centering_coefficient": 0.01}, what="+ centering 0.01"),
    Setting("qa_feedback", "label_smoothing", {"label_smoothing": 0.1}, what="label smoothing 0.1"),
    Setting("qa_feedback", "cross_prompt", {"cross_prompt": True},
            what="RPO weights (hashed n-gram embedder, tau 0.1)"),
    Setting("qa_feedback", "grouped", data={"group_by_prompt": True},
            what="the same pairs, one group per question"),
    Setting("qa_feedback", "plackett_luce", {"objective": "plackett_luce"},
            {"group_by_prompt": True, "complete_rankings_only": True},
            what="questions with a full ranking of their 4 answers"),
    Setting("synthetic", "bt", what="same-prompt pairs"),
    Setting("synthetic", "centering", {"centering_coefficient": 0.01}, what="+ centering 0.01"),
    Setting("synthetic", "margins", {"use_margin": True}, what="+ score-difference margins"),
    Setting("synthetic", "label_smoothing", {"label_smoothing": 0.1}, what="label smoothing 0.1"),
    Setting("synthetic", "cross_prompt", {"cross_prompt": True},
            what="RPO weights (hashed n-gram embedder, tau 0.1)"),
    Setting("synthetic_k4", "grouped", what="4 responses, all 6 comparisons in one group"),
    Setting("synthetic_k4", "independent_pairs", data={"independent_pairs": True},
            what="the same 6 comparisons as separate pairs"),
    Setting("synthetic_k4", "plackett_luce", {"objective": "plackett_luce"},
            what="listwise over the full ranking"),
)

#: the setting each suite's others are compared with, seed by seed (same seed: same head
#: initialization and, for the same data layout, the same steps)
REFERENCE = {"qa_feedback": "bt", "synthetic": "bt", "synthetic_k4": "independent_pairs"}

#: settings the data cannot support, reported in the JSON rather than silently absent
NOT_APPLICABLE = {
    ("qa_feedback", "margins"): "qa_feedback has binary preferences only (no scores, no margins)",
}


@dataclass(frozen=True)
class Mode:
    base_config: str
    seeds: int
    warmup: int
    trainable_layers: Optional[int]
    suites: dict


def _suites(full: bool) -> dict[str, Suite]:
    syn = {"num_prompts": 3000 if full else 200, "seed": 0, "length_scale": 0.25 if full else 0.3,
           "progress": False}
    n_eval = 96 if full else 8
    return {
        "qa_feedback": Suite(
            "qa_feedback", QA, {"split": "train", "progress": False},
            {"validation": {"split": "validation", "group_by_prompt": True, "progress": False,
                            "max_groups": 32 if full else 4}},
            seq_len=192 if full else 768, row_len=768 if full else 3072, steps=6 if full else 2,
            needs_shared_data=True),
        "synthetic": Suite(
            "synthetic", SYN, {**syn, "split": "train"},
            {"validation": {**syn, "split": "validation", "max_groups": n_eval},
             "held_out": {**syn, "split": "test", "max_groups": n_eval}},
            seq_len=128 if full else 384, row_len=512 if full else 1024,
            steps=10 if full else 2),
        "synthetic_k4": Suite(
            "synthetic_k4", SYN,
            {**syn, "split": "train", "responses_per_prompt": 4, "with_margin": False,
             "complete_rankings_only": True},
            {"validation": {**syn, "split": "validation", "responses_per_prompt": 4,
                            "with_margin": False, "complete_rankings_only": True,
                            "max_groups": n_eval * 5 // 12},
             "held_out": {**syn, "split": "test", "responses_per_prompt": 4, "with_margin": False,
                          "complete_rankings_only": True, "max_groups": n_eval * 5 // 12}},
            seq_len=128 if full else 384, row_len=512 if full else 1024,
            steps=10 if full else 2),
    }


MODES = {
    "full": Mode("smollm2_135m_synthetic.yaml", seeds=3, warmup=2, trainable_layers=2,
                 suites=_suites(True)),
    "quick": Mode("tiny_llama3_synthetic.yaml", seeds=1, warmup=1, trainable_layers=1,
                  suites=_suites(False)),
}


def _dataset_section(suite: Suite, extra: dict) -> dict:
    return {"_component_": "bench_quality.prepared_dataset", "builder": suite.builder,
            "max_seq_len": suite.seq_len, **extra}


def run_config(base, mode: Mode, suite: Suite, setting: Setting, seed: int, output_dir: str,
               steps: int):
    """The recipe config of one run: the shipped config with the data, loss options, seed and
    budget replaced (nothing else)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(OmegaConf.to_container(base, resolve=True))  # paths resolved first
    cfg.output_dir = output_dir
    cfg.seed = seed
    cfg.dtype = "fp32"              # same numerics on every machine (the configs say "auto")
    cfg.prepare_checkpoint = None   # done once by main(), not hashed again per run
    cfg.dataset = _dataset_section(suite, {**suite.train, **setting.data})
    cfg.validation_dataset = None   # held-out scoring happens after training, below
    cfg.test_dataset = None
    cfg.packing = {"max_seq_len": suite.row_len, "rows_per_step": 1, "prefix_sharing": True}
    cfg.loss = {"_component_": "fastrm.RewardLoss", "use_margin": False,
                "centering_coefficient": 0.0, **setting.loss}
    cfg.max_steps_per_epoch = steps
    cfg.epochs = 1
    cfg.lr_scheduler.num_warmup_steps = mode.warmup
    cfg.save_final_checkpoint = False
    cfg.save_every_n_steps = None
    cfg.eval_every_n_steps = None
    cfg.log_every_n_steps = 1
    cfg.metric_logger = {"_component_": "torchtune.training.metric_logging.DiskLogger",
                         "log_dir": f"{output_dir}/logs"}
    if mode.trainable_layers is not None:
        cfg.trainable = {"last_n_layers": mode.trainable_layers, "final_norm": True}
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------

def frozen_prefix_layers(model) -> int:
    """How many decoder layers, from the bottom, hold no trainable parameter (0 when the
    embeddings train): the trunk every run of a mode shares bit for bit."""
    dec = model.decoder
    if any(p.requires_grad for p in dec.tok_embeddings.parameters()):
        return 0
    for i, layer in enumerate(dec.layers):
        if any(p.requires_grad for p in layer.parameters()):
            return i
    return len(dec.layers)


def _fingerprint(modules) -> list[tuple[float, float]]:
    """Per-parameter (sum, sum of squares) in float64: changes if any frozen weight changes."""
    return [(float(p.double().sum()), float(p.double().square().sum()))
            for m in modules for p in m.parameters()]


class HeldOutScorer:
    """Scores one held-out set (a :class:`fastrm.training.step_data.StepData`) with a trained
    :class:`fastrm.models.RewardModel`: its packed forward, cut in two.

    The bottom ``n`` frozen decoder layers (and the frozen embeddings) are the same pretrained
    weights in every run, so their output on the held-out batches is computed once (the first
    :meth:`score`) and kept; each run then computes only its trainable top layers, the final
    norm and the head on it. Every call checks that the frozen trunk's weights are the ones
    the cache was made with (a fingerprint of each parameter) and recomputes the cache when
    they are not (a randomly initialized trunk, as quick mode's tiny model has per seed).
    ``RewardModel.hidden_states`` is the same loop over ``decoder.layers`` in one piece; the
    tests check that the two agree."""

    def __init__(self, data) -> None:
        self.batches = [b for b, real in data.eval_steps() if real]
        self._cache: Optional[list] = None
        self._n: Optional[int] = None
        self._fingerprint = None

    @torch.no_grad()
    def score(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        """``(diffs [P], rewards [N])``: ``diffs = r_c - r_r`` over every comparison."""
        from fastrm.attention import VarlenMetadata

        dec = model.decoder
        n = frozen_prefix_layers(model)
        trunk = [dec.tok_embeddings, *dec.layers[:n]]
        fingerprint = _fingerprint(trunk)
        if self._cache is None or self._n != n or fingerprint != self._fingerprint:
            self._n, self._fingerprint, self._cache = n, fingerprint, []
            for b in self.batches:
                meta = VarlenMetadata.build(b.cu_seqlens, b.segment_prefix,
                                            backend=model.attention_backend)
                h = dec.tok_embeddings(b.tokens)
                for layer in dec.layers[:n]:
                    h = layer(h, mask=meta, input_pos=b.position_ids)
                self._cache.append((h, meta))
        was_training = model.training
        model.eval()
        diffs, rewards = [], []
        for b, (h, meta) in zip(self.batches, self._cache):
            for layer in dec.layers[n:]:
                h = layer(h, mask=meta, input_pos=b.position_ids)
            r = model.score(dec.norm(h[0]), b.reward_positions).reshape(-1)
            diffs.append(r[b.chosen_index] - r[b.rejected_index])
            rewards.append(r)
        model.train(was_training)
        return torch.cat(diffs), torch.cat(rewards)


def held_out_metrics(diffs: torch.Tensor, rewards: torch.Tensor) -> dict[str, Any]:
    ece = expected_calibration_error(diffs)
    return {"accuracy": pairwise_accuracy(diffs), "ece": ece["ece"], "ece_bins": ece["bins"],
            "reward_mean": float(rewards.double().mean()),
            "reward_std": float(rewards.double().std(unbiased=False)),
            "comparisons": int(diffs.numel()), "responses": int(rewards.numel()),
            "diffs": [round(float(x), 5) for x in diffs]}


def held_out_data(suite: Suite, tokenizer) -> dict[str, HeldOutScorer]:
    """A scorer of each held-out set of ``suite`` (built once, shared by every run)."""
    from omegaconf import OmegaConf

    from fastrm.training.step_data import StepData

    packing = OmegaConf.create({"max_seq_len": suite.row_len, "rows_per_step": 1,
                                "prefix_sharing": True})
    out = {}
    for name, kw in suite.held_out.items():
        groups = prepared_dataset(tokenizer, builder=suite.builder, max_seq_len=suite.seq_len, **kw)
        if not groups:
            raise ValueError(f"held-out set {suite.name}/{name} is empty; check its split")
        out[name] = HeldOutScorer(StepData(groups, packing, 1, 0, seed=0, train=False))
    return out


# --------------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------------

def train_and_score(cfg, held_out: dict[str, HeldOutScorer]) -> dict[str, Any]:
    """Sets up and trains the shipped recipe on ``cfg``; scores every held-out set."""
    from fastrm.recipes.reward_model import RewardModelRecipe

    t_setup = time.perf_counter()
    recipe = RewardModelRecipe(cfg)
    recipe.setup(cfg)
    t0 = time.perf_counter()
    recipe.train()
    wall = time.perf_counter() - t0
    try:
        model = recipe.step_module.model
        t1 = time.perf_counter()
        scores = {name: held_out_metrics(*sc.score(model)) for name, sc in held_out.items()}
        score_wall = time.perf_counter() - t1
    finally:
        recipe.cleanup()
    hist = recipe.history
    return {"setup_wall_s": t0 - t_setup, "train_wall_s": wall, "score_wall_s": score_wall,
            "steps": len(hist),
            "train_comparisons": int(sum(h["comparisons"] for h in hist)),
            "train_tokens": int(sum(h["tokens_per_second"] * h["step_time"] for h in hist)),
            "final_train_loss": hist[-1]["loss"] if hist else None,
            "train_groups": len(recipe.train_data.packed.units),
            "held_out": scores}


# --------------------------------------------------------------------------------------------
# summary, table, figure
# --------------------------------------------------------------------------------------------

def summarize(runs: list[dict]) -> list[dict]:
    """One row per (suite, setting, held-out set): 95% t-intervals over seeds, and the paired
    accuracy difference to the suite's :data:`REFERENCE` setting (per seed, then over seeds)."""
    keyed: dict[tuple, dict[int, dict]] = {}
    for r in runs:
        for ho, m in r["held_out"].items():
            keyed.setdefault((r["suite"], r["setting"], ho), {})[r["seed"]] = {**r, **m}
    order = {(s.suite, s.name): i for i, s in enumerate(SETTINGS)}
    rows = []
    for (suite, setting, ho), by_seed in sorted(keyed.items(), key=lambda kv: (
            kv[0][0], kv[0][2], order.get(kv[0][:2], 99))):
        rs = [by_seed[k] for k in sorted(by_seed)]
        row = {
            "suite": suite, "setting": setting, "held_out": ho, "seeds": sorted(by_seed),
            "accuracy": t_interval([r["accuracy"] for r in rs]),
            "accuracy_per_seed": [r["accuracy"] for r in rs],
            "ece": t_interval([r["ece"] for r in rs]),
            "reward_mean": t_interval([r["reward_mean"] for r in rs]),
            "reward_std": t_interval([r["reward_std"] for r in rs]),
            "train_wall_s": t_interval([r["train_wall_s"] for r in rs]),
            "train_comparisons": t_interval([r["train_comparisons"] for r in rs]),
            "comparisons": rs[0]["comparisons"],
            "reference": REFERENCE.get(suite), "accuracy_vs_reference": None,
        }
        ref = keyed.get((suite, REFERENCE.get(suite), ho), {})
        paired = [by_seed[k]["accuracy"] - ref[k]["accuracy"] for k in sorted(by_seed) if k in ref]
        if paired and setting != REFERENCE.get(suite):
            row["accuracy_vs_reference"] = t_interval(paired)
        rows.append(row)
    return rows


def _ci(s: dict, fmt: str = "{:.3f}") -> str:
    if s["half_width"] is None:
        return fmt.format(s["mean"])
    return f"{fmt.format(s['mean'])} ± {fmt.replace('+', '').format(s['half_width'])}"


def markdown(report: dict) -> str:
    rows = [{
        "suite": r["suite"], "held_out": f"{r['held_out']} ({r['comparisons']})",
        "setting": r["setting"], "n": len(r["seeds"]), "acc": _ci(r["accuracy"]),
        "ece": _ci(r["ece"]), "mean": _ci(r["reward_mean"], "{:+.2f}"),
        "std": _ci(r["reward_std"], "{:.2f}"), "wall": f"{r['train_wall_s']['mean']:.1f}",
        "comp": f"{r['train_comparisons']['mean']:.0f}",
        "delta": (_ci(r["accuracy_vs_reference"], "{:+.3f}") if r.get("accuracy_vs_reference")
                  else "(reference)" if r["setting"] == r.get("reference") else ""),
    } for r in report["summary"]]
    cols = [("suite", "suite"), ("held_out", "held out (comparisons)"), ("setting", "setting"),
            ("n", "seeds"), ("acc", "accuracy (95% CI)"),
            ("delta", "Δ accuracy vs reference, paired by seed"), ("ece", "ECE"),
            ("mean", "reward mean"), ("std", "reward std"), ("wall", "train s"),
            ("comp", "comparisons trained")]
    cfg = report["config"]
    head = (f"# Loss options: held-out quality ({report['mode']} mode)\n\n"
            f"{common.machine_line(report['machine'])}\n\n"
            f"Model: {cfg['model']} (last {cfg['trainable_last_n_layers']} layers + head train), "
            f"fp32, lr {cfg['lr']}; optimizer steps per run: "
            + ", ".join(f"{k} {v}" for k, v in cfg['steps'].items()) + f"; seeds {cfg['seeds']}; "
            f"intervals: mean ± t(0.975, n-1)·s/√n over seeds; ECE: top-label, {N_BINS} bins "
            "over [0.5, 1] of sigmoid(r_c - r_r).\n\n")
    skipped = "".join(f"\n- {k}: {v}" for k, v in report["not_applicable"].items())
    return head + common.md_table(rows, cols) + ("\n\nNot run:" + skipped if skipped else "") + "\n"


def plot(report: dict, path: Path) -> Path:
    plt = common.pyplot()
    panels: dict[tuple, list[dict]] = {}
    for r in report["summary"]:
        panels.setdefault((r["suite"], r["held_out"]), []).append(r)
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.8), squeeze=False)
    for ax, ((suite, ho), rows) in zip(axes[0], panels.items()):
        y = list(range(len(rows)))
        means = [r["accuracy"]["mean"] for r in rows]
        errs = [r["accuracy"]["half_width"] or 0.0 for r in rows]
        ax.errorbar(means, y, xerr=errs, fmt="o", capsize=3, label="mean, 95% CI")
        for yi, r in zip(y, rows):
            seeds = r.get("accuracy_per_seed", [])
            ax.plot(seeds, [yi + 0.2] * len(seeds), "x", color="grey", ms=4,
                    label="one seed" if yi == 0 else None)
        ax.axvline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_yticks(y, [r["setting"] for r in rows])
        ax.invert_yaxis()
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("held-out pairwise accuracy")
        ax.set_title(f"{suite}\n{ho}", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="upper right")
    fig.suptitle(f"accuracy, mean and 95% t-interval over seeds ({report['mode']})", fontsize=10)
    return common.save_figure(fig, path)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(report: dict, out_dir: Path, stem: str, figure: bool,
                 stamp_load: bool = True) -> None:
    report["summary"] = summarize(report["runs"])
    if stamp_load:
        report["machine"]["load_average_after"] = common.load_average()
    _write_atomic(out_dir / f"{stem}.json", json.dumps(report, indent=1, default=str))
    _write_atomic(out_dir / f"{stem}.md", markdown(report))
    if figure and report["summary"]:
        plot(report, out_dir / f"{stem}.png")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=sorted(MODES), default="quick")
    p.add_argument("--suites", default=None,
                   help=f"comma-separated subset of {', '.join(MODES['full'].suites)}")
    p.add_argument("--settings", default=None,
                   help="comma-separated setting names to run (default: all of each suite)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: the mode's)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per run (default: each suite's)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out-dir", type=Path, default=common.RESULTS)
    p.add_argument("--name", default=None, help="output stem (default quality_<mode>)")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the summary, table and figure from the existing JSON")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    from omegaconf import OmegaConf
    from torchtune import config as tt_config
    from tqdm import tqdm

    from fastrm.datasets import default_shared_data_dir

    args = parse_args(argv)
    stem = args.name or f"quality_{args.mode}"
    if args.report_only:
        report = json.loads((args.out_dir / f"{stem}.json").read_text())
        write_report(report, args.out_dir, stem, figure=True, stamp_load=False)
        print(markdown(report))
        return 0
    common.set_threads(args.threads)
    mode = MODES[args.mode]
    seeds = list(range(args.seeds if args.seeds is not None else mode.seeds))
    names = args.suites.split(",") if args.suites else list(mode.suites)
    unknown = [n for n in names if n not in mode.suites]
    if unknown:
        raise SystemExit(f"unknown suite(s) {unknown}; choose from {list(mode.suites)}")
    base = OmegaConf.load(CONFIGS / mode.base_config)
    not_applicable = {f"{k[0]}/{k[1]}": v for k, v in NOT_APPLICABLE.items() if k[0] in names}
    qa_path = default_shared_data_dir() / "qa_feedback" / "pairs.jsonl"
    if "qa_feedback" in names and not qa_path.is_file():
        names.remove("qa_feedback")
        not_applicable["qa_feedback"] = f"skipped: no data at {qa_path} (set FASTRM_SHARED_DATA)"
        print(f"qa_feedback skipped: no data at {qa_path}")
    if base.get("prepare_checkpoint") is not None:
        tt_config.instantiate(base.prepare_checkpoint)
    tokenizer = tt_config.instantiate(base.tokenizer)
    # the recipe warns once per run that the synthetic pairs' margins go unused when
    # use_margin is off: that is the point of the comparison, not news
    warnings.filterwarnings("ignore", message="RewardLoss got per-pair margins")
    t_held = time.perf_counter()
    held = {n: held_out_data(mode.suites[n], tokenizer) for n in names}
    print(f"held-out sets tokenized in {time.perf_counter() - t_held:.1f}s", flush=True)
    report: dict[str, Any] = {
        "mode": args.mode, "machine": common.machine_info(args.threads),
        "config": {"base_config": mode.base_config, "model": str(base.model.get("decoder") or
                   base.model._component_), "seeds": seeds,
                   "steps": {n: args.steps or mode.suites[n].steps for n in names},
                   "warmup": mode.warmup, "trainable_last_n_layers": mode.trainable_layers,
                   "lr": float(base.optimizer.lr),
                   "suites": {n: mode.suites[n].__dict__ for n in names},
                   "settings": [s.__dict__ for s in SETTINGS if s.suite in names],
                   "ece_bins": N_BINS},
        "not_applicable": not_applicable, "runs": [],
    }
    wanted = set(args.settings.split(",")) if args.settings else {s.name for s in SETTINGS}
    unknown = wanted - {s.name for s in SETTINGS}
    if unknown:
        raise SystemExit(f"unknown setting(s) {sorted(unknown)}; choose from "
                         f"{sorted({s.name for s in SETTINGS})}")
    plan = [(seed, s) for seed in seeds for s in SETTINGS if s.suite in names and s.name in wanted]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        for i, (seed, s) in enumerate(tqdm(plan, desc="runs")):
            suite = mode.suites[s.suite]
            steps = args.steps if args.steps is not None else suite.steps
            cfg = run_config(base, mode, suite, s, seed, f"{tmp}/{s.suite}_{s.name}_{seed}", steps)
            result = train_and_score(cfg, held[s.suite])
            report["runs"].append({"suite": s.suite, "setting": s.name, "seed": seed, **result})
            accs = ", ".join(f"{k}={v['accuracy']:.3f}" for k, v in result["held_out"].items())
            print(f"[{time.perf_counter() - t_start:7.1f}s] {s.suite}/{s.name} seed {seed}: "
                  f"{accs}; train {result['train_wall_s']:.1f}s", flush=True)
            last_of_seed = i + 1 == len(plan) or plan[i + 1][0] != seed
            write_report(report, args.out_dir, stem, figure=last_of_seed)
    report["total_wall_s"] = time.perf_counter() - t_start
    write_report(report, args.out_dir, stem, figure=True)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
