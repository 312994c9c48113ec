"""Command-line entry points: ``fastrm generate`` and ``fastrm judge``.

Both take ``--config FILE.yaml`` (a path, or the name of a config shipped in
``fastrm/recipes/configs/``) followed by ``key=value`` overrides in OmegaConf dot-list syntax,
as ``tune run`` does::

    fastrm generate --config generate_smollm2.yaml prompts.path=prompts.jsonl output=gen.jsonl
    fastrm judge --config judge_smollm2.yaml input.path=gen.jsonl output=prefs.jsonl

Config layout (see the shipped examples):

``backends``: ``{name: {_component_: ..., ...}}``, each instantiated once with
``torchtune.config.instantiate``; model entries and the judge refer to them by name (or give an
inline ``_component_`` node). ``generate`` then reads ``prompts``, ``models`` (list of
``{name, backend, sampling, strength, system_prompt}``), ``output``, ``batch_size``;
``judge`` reads ``judge`` (a ``_component_`` node whose ``backend`` names a backend), ``input``
(generation rows + ``pairing``, or explicit pairs), ``output``, ``beta`` or ``calibration``,
``batch_size``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Dict, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from fastrm.config import parse_config_args

log = logging.getLogger("fastrm.judge")


def _parse(argv: Optional[Sequence[str]], prog: str, doc: str) -> DictConfig:
    _, cfg = parse_config_args(argparse.ArgumentParser(prog=prog, description=doc), argv)
    logging.basicConfig(level=cfg.get("log_level", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return cfg


def _instantiate(node: Any, **kwargs: Any) -> Any:
    from torchtune import config as tt_config

    return tt_config.instantiate(node, **kwargs)


def _backends(cfg: DictConfig) -> Dict[str, Any]:
    out = {}
    for name, node in (cfg.get("backends") or {}).items():
        if not isinstance(node, DictConfig) or "_component_" not in node:
            raise ValueError(f"backends.{name} must be a mapping with a _component_ field")
        kw = {"name": name} if "name" not in node and _accepts_name(node) else {}
        out[name] = _instantiate(node, **kw)
    return out


def _accepts_name(node: DictConfig) -> bool:
    import inspect

    from torchtune.config._utils import _get_component_from_path

    try:
        return "name" in inspect.signature(_get_component_from_path(node["_component_"])).parameters
    except (TypeError, ValueError):
        return False


def _backend_ref(ref: Any, backends: Dict[str, Any], where: str) -> Any:
    if isinstance(ref, str):
        if ref not in backends:
            raise ValueError(f"{where}: backend {ref!r} is not defined under backends (defined: {sorted(backends)})")
        return backends[ref]
    if isinstance(ref, DictConfig) and "_component_" in ref:
        return _instantiate(ref)
    raise ValueError(f"{where}: backend must be a name under backends or a _component_ node")


def build_models(cfg: DictConfig, backends: Dict[str, Any]):
    """``ModelEntry`` list from ``cfg.models``."""
    from fastrm.judge.generate import ModelEntry
    from fastrm.judge.types import SamplingParams

    entries = cfg.get("models")
    if not isinstance(entries, ListConfig) or len(entries) == 0:
        raise ValueError("models: give a non-empty list of model entries {name, backend, sampling}")
    out = []
    for i, m in enumerate(entries):
        if "name" not in m or "backend" not in m:
            raise ValueError(f"models[{i}] needs 'name' and 'backend'")
        sampling = OmegaConf.to_container(m.get("sampling") or {}, resolve=True)
        out.append(ModelEntry(
            name=str(m.name),
            backend=_backend_ref(m.backend, backends, f"models[{i}]"),
            sampling=SamplingParams.from_dict(sampling),  # type: ignore[arg-type]
            strength=m.get("strength"),
            system_prompt=m.get("system_prompt"),
        ))
    return out


def main_generate(argv: Optional[Sequence[str]] = None) -> int:
    """``fastrm generate --config ... [key=value ...]``: many responses per prompt from several models."""
    from fastrm.judge.generate import generate_responses, load_prompts

    cfg = _parse(argv, "fastrm generate", main_generate.__doc__ or "")
    backends = _backends(cfg)
    models = build_models(cfg, backends)
    p = cfg.prompts
    prompts = load_prompts(p.path, prompt_key=p.get("prompt_key", "prompt"), id_key=p.get("id_key", "prompt_id"), limit=p.get("limit"))
    log.info("generate: %d prompts x %d model entries -> %s", len(prompts), len(models), cfg.output)
    stats = generate_responses(prompts, models, cfg.output, batch_size=cfg.get("batch_size", 32),
                               progress=cfg.get("progress", True), max_rows=cfg.get("max_rows"))
    print(json.dumps(stats.as_dict(), indent=2))
    return 0 if stats.errors == 0 else 1


def _fit_beta_from(cal: DictConfig) -> Dict[str, Any]:
    from fastrm.judge.bt import fit_beta
    from fastrm.judge.store import read_rows

    rows = read_rows(cal.path)
    dk, lk = cal.get("diff_key", "score_diff"), cal.get("label_key", "label")
    for n, r in enumerate(rows):
        if dk not in r or lk not in r:
            raise ValueError(f"calibration row {n} of {cal.path} needs fields {dk!r} and {lk!r} (fields: {sorted(r)})")
    fit = fit_beta([float(r[dk]) for r in rows], [float(r[lk]) for r in rows])
    log.info("calibration: fitted beta = %.6g +- %.2g on %d rows (mean nll %.4f)", fit.beta, fit.stderr, fit.n, fit.nll)
    if fit.beta <= 0:
        raise ValueError(f"calibration: fitted beta = {fit.beta:.4g} <= 0 (labels anti-correlate with {dk!r}); check the file")
    return {"beta_fit": fit.as_dict()}


def main_judge(argv: Optional[Sequence[str]] = None) -> int:
    """``fastrm judge --config ... [key=value ...]``: LLM-as-judge preference labels with BT margins."""
    from fastrm.judge.pairing import make_pairs
    from fastrm.judge.store import read_rows
    from fastrm.judge.transform import label_pairs, load_pairs

    cfg = _parse(argv, "fastrm judge", main_judge.__doc__ or "")
    backends = _backends(cfg)
    jnode = OmegaConf.create(OmegaConf.to_container(cfg.judge, resolve=False))
    if "backend" not in jnode:
        raise ValueError("judge.backend: name the backend (under backends) the judge uses")
    backend = _backend_ref(jnode.pop("backend"), backends, "judge")
    judge = _instantiate(jnode, backend=backend)

    inp = cfg.input
    rows = read_rows(inp.path)
    if inp.get("limit") is not None:
        rows = rows[: inp.limit]
    kind = inp.get("kind", "generations")
    if kind == "generations":
        pc = inp.get("pairing") or {}
        strengths = pc.get("strengths")
        if strengths is None and cfg.get("models"):
            strengths = {m.name: m.strength for m in cfg.models if m.get("strength") is not None} or None
        pairs, pcounts = make_pairs(
            rows, pc.get("strategy", "all"), k=pc.get("k"),
            strengths=OmegaConf.to_container(strengths) if isinstance(strengths, DictConfig) else strengths,
            seed=pc.get("seed", 0), drop_truncated=pc.get("drop_truncated", False),
        )
    elif kind == "pairs":
        pairs = load_pairs(rows, prompt_key=inp.get("prompt_key", "prompt"),
                           response_keys=tuple(inp.get("response_keys", ["response1", "response2"])))
        pcounts = {"pairs": len(pairs)}
    else:
        raise ValueError(f"input.kind must be 'generations' or 'pairs', got {kind!r}")

    extra: Dict[str, Any] = {"pairing": pcounts}
    beta = float(cfg.get("beta", 1.0))
    if cfg.get("calibration"):
        extra.update(_fit_beta_from(cfg.calibration))
        beta = extra["beta_fit"]["beta"]
    stats = label_pairs(pairs, judge, cfg.output, beta=beta, batch_size=cfg.get("batch_size", 16),
                        progress=cfg.get("progress", True), keep_responses=cfg.get("keep_responses", False),
                        extra_stats=extra)
    print(json.dumps(stats, indent=2))
    return 0 if stats["failed"] == 0 else 1


if __name__ == "__main__":  # python -m fastrm.judge.cli generate|judge --config ...
    cmd, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if cmd not in ("generate", "judge"):
        raise SystemExit("usage: python -m fastrm.judge.cli {generate|judge} --config FILE [key=value ...]")
    sys.exit(main_generate(rest) if cmd == "generate" else main_judge(rest))
