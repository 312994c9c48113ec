"""A reward server over the tiny test model (the tests' server process): ``python serve_tiny.py
TOKENIZER_DIR [--max-wait-ms MS] [--batch-tokens N] [--normalize]``; port 0 (printed)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fastrm.inference import RewardScorer  # noqa: E402
from fastrm.inference.server import serve  # noqa: E402
from fastrm.models.tokenizer import HFChatTokenizer  # noqa: E402
from scoring_ref import tiny_model  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("tokenizer_dir")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--batch-tokens", type=int, default=1024)
    args = p.parse_args()
    tok = HFChatTokenizer(args.tokenizer_dir)
    scorer = RewardScorer(tiny_model(tok.vocab_size, seed=1), tok, batch_tokens=args.batch_tokens)
    serve(scorer, port=0, max_wait_ms=args.max_wait_ms)
