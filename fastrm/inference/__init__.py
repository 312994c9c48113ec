"""Using a trained reward model: packed prompt-once scoring, a reward server, evaluation.

* :class:`RewardScorer` (:mod:`fastrm.inference.scorer`): rows / conversations / rendered texts
  -> rewards, packed with no padding, a prompt's responses after one copy of the prompt;
* :func:`score_file` (:mod:`fastrm.inference.store`): ``fastrm score``'s resumable file job;
* :mod:`fastrm.inference.server`: ``fastrm serve`` (OpenRLHF ``/get_reward``, ``/score``,
  ``/health``; concurrent requests batched into packed rows);
* :func:`evaluate_pairs` (:mod:`fastrm.inference.evaluate`): ``fastrm eval``'s pairwise
  accuracy, margins and RewardBench sections (:mod:`fastrm.inference.rewardbench`).
"""

from fastrm.inference.evaluate import evaluate_pairs, format_table, pair_metrics, write_report
from fastrm.inference.rewardbench import section_scores
from fastrm.inference.rows import parse_row, text_tokens, tokenize_row
from fastrm.inference.scorer import RewardScorer
from fastrm.inference.store import score_file

__all__ = ["RewardScorer", "evaluate_pairs", "format_table", "pair_metrics", "parse_row",
           "score_file", "section_scores", "text_tokens", "tokenize_row", "write_report"]
