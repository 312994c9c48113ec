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
from typing import Optional, Sequence

from fastrm.config import parse_config_args


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastrm decompose", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args, cfg = parse_config_args(parser, sys.argv[1:] if argv is None else argv, prefix="decompose_")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from fastrm.decompose.recipe import run

    out = run(cfg, progress=not args.no_progress)
    print(out["report"].to_markdown())
    for f in out["files"]:
        print(f"wrote {f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
