"""``fastrm decompose --config NAME_OR_PATH [key=value ...]``: the decomposed reward models recipe.

``--config`` takes a YAML path or the name of a shipped config (``decompose_synthetic``,
``decompose_qa_feedback``); ``key=value`` overrides use OmegaConf's dotted syntax
(``pca.num_heads=16 adapt.num_shots=32 output_dir=/tmp/x``), as ``tune run`` does. Prints the
per-head table and where the heads, report and plot were written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "recipes" / "configs"


def resolve_config(name: str) -> Path:
    """A YAML path, or a shipped config name (with or without ``.yaml``)."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    shipped = CONFIGS_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(c.stem for c in CONFIGS_DIR.glob("decompose_*.yaml")))
    raise ValueError(f"--config {name!r} is neither a YAML file nor a shipped config ({names})")


def load_config(name: str, overrides: Sequence[str]):
    """The config with ``key=value`` overrides merged (OmegaConf dotlist)."""
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must be key=value, got {bad}")
    cfg = OmegaConf.load(resolve_config(name))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastrm decompose", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML path or shipped config name")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args, overrides = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, overrides)
    except ValueError as err:
        parser.error(str(err))
    from fastrm.decompose.recipe import run

    out = run(cfg, progress=not args.no_progress)
    print(out["report"].to_markdown())
    for f in out["files"]:
        print(f"wrote {f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
