"""Decomposed reward models recipe (DRMs, arXiv 2502.13131): embed -> PCA -> heads -> report -> adapt.

Steps (each one function of this package; the config names every setting):

1. **Embeddings** per split (``train``, a held-out split, an adaptation split): either a backbone
   (``model`` + optional ``checkpointer`` + ``tokenizer`` + ``splits.<name>`` dataset sections,
   as in the training configs) through :func:`fastrm.decompose.embed.embed_pairs` into
   on-disk :class:`~fastrm.decompose.store.EmbeddingStore` shards, or an ``embeddings`` component
   whose ``build(output_dir)`` returns the splits (the planted synthetic source).
2. **PCA** of the training differences ``z = e_chosen - e_rejected`` (:func:`.pca.fit_pca`:
   exact / chunked covariance / streamed randomized), ``k = pca.num_heads`` components.
3. **Heads**: each component signed to prefer the chosen responses of the training set
   (:func:`.heads.orient_components`).
4. **Report**: explained variance and train / held-out accuracy per head
   (``report.md``, ``report.json``, ``heads.png``).
5. **Adaptation**: for each method in ``adapt.methods``, ``adapt.trials`` random draws of
   ``adapt.num_shots`` labelled pairs of the adaptation split; weights fitted on them
   (:func:`.adapt.fit_head_weights`) and accuracy measured on the rest of the split; mean and
   std over the draws are reported next to head 0 and the best single head (chosen on the
   same shots) on the same rest.
6. **Save**: ``heads/heads.safetensors`` (``weight [k, D]``: a ``D -> k`` head),
   ``heads/head_<i>.safetensors`` (``head.weight [1, D]``: the training recipe's
   ``head_checkpoint`` format, to score with head ``i`` through the fused head + loss path),
   ``heads/weights_<method>.json`` (the weights of the first draw) and
   ``heads/head_<method>.safetensors`` (the mixed head ``W^T alpha``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fastrm.decompose.adapt import ADAPT_METHODS, fit_head_weights, few_shot_split
from fastrm.decompose.heads import DecomposedHeads, orient_components
from fastrm.decompose.pca import fit_pca
from fastrm.decompose.report import HeadReport, build_report
from fastrm.decompose.store import EmbeddingStore, PairEmbeddings

log = logging.getLogger(__name__)


def _instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
    from torchtune import config

    return config.instantiate(node, *args, **kwargs)


def build_splits(cfg: DictConfig, output_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Name -> pair-embedding source (``PairEmbeddings`` or ``EmbeddingStore``) for every split."""
    if cfg.get("embeddings") is not None:
        src = _instantiate(cfg.embeddings)
        splits = src.build(output_dir)
        info = src.truth() if hasattr(src, "truth") else {}
        return {"splits": splits, "info": info}
    if cfg.get("model") is None or cfg.get("splits") is None:
        raise ValueError("the config needs either an `embeddings` section (a source with "
                         "build(output_dir)) or `model`, `tokenizer` and `splits` sections")
    from fastrm.training.dtype import enable_tf32, resolve_dtype
    from fastrm.training.model_setup import build_model

    device = torch.device(cfg.get("device", "cpu"))
    dtype = resolve_dtype(str(cfg.get("dtype", "fp32")), device)
    enable_tf32(device, dtype)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    model, _ = build_model(cfg, device, dtype)
    model.eval()
    tokenizer = _instantiate(cfg.tokenizer)
    emb = cfg.get("embed", {})
    out: dict[str, Any] = {}
    from fastrm.decompose.embed import embed_pairs

    for name, ds_cfg in cfg.splits.items():
        path = output_dir / "embeddings" / str(name)
        if (path / "meta.json").exists() and not bool(emb.get("overwrite", False)):
            cached = EmbeddingStore.open(path)
            if cached.complete and cached.dim == int(model.embed_dim):
                out[name] = cached
                log.info("decompose: reusing the embeddings of split %s at %s (%d pairs)", name,
                         path, cached.num_pairs)
                continue
            log.info("decompose: the embeddings at %s are incomplete or of another model; "
                     "recomputing them", path)
        groups = _instantiate(ds_cfg, tokenizer=tokenizer)
        stats = getattr(groups, "stats", None)
        store = EmbeddingStore.create(path, dim=int(model.embed_dim),
                                      shard_size=int(emb.get("shard_size", 65536)),
                                      info={"split": str(name), "dataset_stats": dict(stats or {})},
                                      overwrite=True)
        out[name] = embed_pairs(model, groups, store=store,
                                max_tokens=int(emb.get("max_tokens", 8192)),
                                prefix_sharing=bool(emb.get("prefix_sharing", True)),
                                device=device, desc=f"embed {name}", progress=progress)
    return {"splits": out, "info": {}}


def run_adaptation(heads: DecomposedHeads, pairs: PairEmbeddings, acfg: DictConfig,
                   split: str, seed: int) -> tuple[dict, dict]:
    """``trials`` few-shot draws per method; returns (report entries, first-draw weights)."""
    num_shots = int(acfg.get("num_shots", 16))
    trials = int(acfg.get("trials", 20))
    methods = list(acfg.get("methods", ["softmax", "logistic"]))
    for m in methods:
        if m not in ADAPT_METHODS:
            raise ValueError(f"adapt.methods has {m!r}; choose from {', '.join(ADAPT_METHODS)}")
    sc, sr = heads.scores(pairs.chosen).double(), heads.scores(pairs.rejected).double()
    d = sc - sr  # [n, k]
    results: dict[str, dict] = {}
    first_weights: dict[str, Any] = {}
    accs: dict[str, list[float]] = {m: [] for m in methods}
    first_head, best_single = [], []
    for t in range(trials):
        shots, rest = few_shot_split(pairs.num_pairs, num_shots, seed=seed + t)
        d_rest = d[rest]
        first_head.append(float((d_rest[:, 0] > 0).double().mean()))
        best = int(((d[shots] > 0).double().mean(0)).argmax())
        best_single.append(float((d_rest[:, best] > 0).double().mean()))
        for m in methods:
            hw = fit_head_weights(sc[shots], sr[shots], method=m,
                                  temperature=float(acfg.get("temperature", 1.0)),
                                  include_negated=bool(acfg.get("include_negated", True)),
                                  l2=float(acfg.get("l2", 0.1)))
            accs[m].append(float(((d_rest @ hw.weights.double()) > 0).double().mean()))
            if t == 0:
                first_weights[m] = hw
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    std = lambda xs: (sum((x - mean(xs)) ** 2 for x in xs) / max(1, len(xs) - 1)) ** 0.5  # noqa: E731
    for m in methods:
        results[m] = {"split": split, "num_shots": num_shots, "trials": trials,
                      "accuracy_mean": mean(accs[m]), "accuracy_std": std(accs[m]),
                      "accuracies": accs[m], "first_head_accuracy": mean(first_head),
                      "best_single_head_accuracy": mean(best_single),
                      "weights": first_weights[m].weights.tolist()}
    return results, first_weights


def save_head_files(heads: DecomposedHeads, out: Path, weights: dict) -> None:
    """``head_<i>.safetensors`` and ``head_<method>.safetensors`` in the training recipe's
    ``head_checkpoint`` format (:func:`fastrm.models.reward_model.write_head`:
    ``head.weight [1, D]``; reward heads are bias-free, so a mix's offset ``hw.bias``, which
    cancels in every comparison, stays in ``weights_<method>.json``)."""
    from fastrm.models.reward_model import write_head

    for i in range(heads.num_heads):
        write_head(out / f"head_{i}.safetensors", heads.combine(head=i)[0])
    for name, hw in weights.items():
        write_head(out / f"head_{name}.safetensors", heads.combine(weights=hw.weights)[0])


def run(cfg: DictConfig, progress: bool = True) -> dict[str, Any]:
    """Runs the recipe; returns ``{"heads", "report", "output_dir", "files"}``."""
    t0 = time.time()
    output_dir = Path(str(cfg.get("output_dir", "decompose_out"))).expanduser()
    output_dir.mkdir(parents=True, exist_ok=True)
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    built = build_splits(cfg, output_dir, progress)
    splits, truth = built["splits"], built["info"]
    train_name = str(cfg.get("train_split", "train"))
    if train_name not in splits:
        raise ValueError(f"train_split={train_name!r} is not among the splits {sorted(splits)}")
    train = splits[train_name]
    pcfg = cfg.get("pca", {})
    k = int(pcfg.get("num_heads", 8))
    if k > train.dim:
        raise ValueError(f"pca.num_heads={k} exceeds the embedding dimension {train.dim}")
    chunk = int(pcfg.get("chunk_size", 4096))
    pca = fit_pca(train, k, method=str(pcfg.get("method", "auto")),
                  center=bool(pcfg.get("center", False)), chunk_size=chunk,
                  oversample=int(pcfg.get("oversample", 10)), n_iter=int(pcfg.get("n_iter", 4)),
                  seed=seed, device=pcfg.get("device"), progress=progress)
    info = {"config": OmegaConf.to_container(cfg, resolve=True), "truth": truth}
    heads = orient_components(pca, train, chunk_size=chunk, info=info, progress=progress)

    rcfg = cfg.get("report", {})
    heldout_name = rcfg.get("heldout_split", "validation")
    heldout = splits.get(heldout_name) if heldout_name else None
    if heldout_name and heldout is None:
        raise ValueError(f"report.heldout_split={heldout_name!r} is not among the splits "
                         f"{sorted(splits)}; set it to null to skip held-out accuracy")
    report: HeadReport = build_report(heads, heldout, chunk)

    acfg = cfg.get("adapt")
    weights: dict = {}
    if acfg is not None and acfg.get("split"):
        aname = str(acfg.split)
        if aname not in splits:
            raise ValueError(f"adapt.split={aname!r} is not among the splits {sorted(splits)}")
        pairs = splits[aname].load()
        report.adaptation, weights = run_adaptation(heads, pairs, acfg, aname, seed)

    heads_dir = output_dir / "heads"
    heads.save(heads_dir, weights=weights)
    save_head_files(heads, heads_dir, weights)
    (output_dir / "report.md").write_text(report.to_markdown())
    (output_dir / "report.json").write_text(report.to_json())
    files = [heads_dir / "heads.safetensors", output_dir / "report.md", output_dir / "report.json"]
    if bool(rcfg.get("plot", True)):
        title = str(rcfg.get("title", f"Decomposed reward heads ({train.num_pairs} training pairs)"))
        files.append(report.plot(output_dir / "heads.png", title=title))
    summary = {"seconds": time.time() - t0, "pca_method": pca.method, "num_heads": k,
               "dim": train.dim, "num_train_pairs": train.num_pairs}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return {"heads": heads, "report": report, "output_dir": output_dir, "files": files,
            "summary": summary}
