"""fastrm's data layer: formats -> tokenized :class:`PreferenceGroup` -> packed
:class:`PackedBatch` (or the padded baseline :class:`PaddedBatch`).

* :mod:`fastrm.data.dataset`: :class:`PreferenceDataset` and the builders (also reachable as
  ``fastrm.datasets.<builder>`` for YAML ``_component_``);
* :mod:`fastrm.data.formats`: row transforms (TRL implicit / explicit prompt, HH-RLHF,
  UltraFeedback, SHP, RewardBench, scored responses, unpaired);
* :mod:`fastrm.data.group`: :class:`PreferenceGroup`, grouping, scores/rankings -> comparisons;
* :mod:`fastrm.data.planner`: the best-fit-decreasing row planner (native + numpy);
* :mod:`fastrm.data.batch`: :class:`PackedBatch` / :class:`PaddedBatch` and their collators
  :func:`collate_packed` / :func:`collate_padded`;
* :mod:`fastrm.data.packing`: :func:`pack_groups` and :class:`PackedPreferenceDataset` (packed
  steps per epoch and rank);
* :mod:`fastrm.data.synthetic`: the synthetic verifiable preference set;
* :mod:`fastrm.data.cross_prompt`: prompt embedders and similar-prompt batching (RPO);
* :mod:`fastrm.data.tokenizer`: a byte-level ``ModelTokenizer`` for tests and benchmarks.
"""

from fastrm.data.batch import (
    PackedBatch, PaddedBatch, ScoredBatch, collate_packed, collate_padded, group_tokens,
    plain_segment_layout,
)
from fastrm.data.group import (
    GroupingStats, PreferenceGroup, accuracy_by_category, comparisons_from_ranking, comparisons_from_scores,
    expand_to_pairs, merge_comparisons, split_group,
)
from fastrm.data.planner import fill_rate, plan_rows, plan_rows_arrays
from fastrm.data.packing import PackedPreferenceDataset, PackingStats, pack_groups
from fastrm.data.dataset import (
    PreferenceDataset, hh_rlhf_dataset, preference_dataset, qa_feedback_dataset,
    rewardbench_dataset, shp_dataset, synthetic_preference_dataset, ultrafeedback_dataset,
    unpaired_preference_dataset,
)
from fastrm.data.tokenizer import ByteChatTokenizer
from fastrm.data.cross_prompt import (
    CallableEmbedder, HashedNgramEmbedder, SentenceEmbedder, SimilarityOrder,
    SimilarPromptBatchSampler, embed_groups,
)

__all__ = [
    "PackedBatch", "ScoredBatch", "group_tokens", "plain_segment_layout", "PreferenceGroup",
    "GroupingStats", "accuracy_by_category",
    "comparisons_from_ranking", "comparisons_from_scores", "expand_to_pairs",
    "merge_comparisons", "split_group", "PackedPreferenceDataset", "PackingStats", "PaddedBatch",
    "collate_packed", "collate_padded", "fill_rate", "pack_groups", "plan_rows",
    "plan_rows_arrays", "PreferenceDataset", "hh_rlhf_dataset", "preference_dataset",
    "qa_feedback_dataset", "rewardbench_dataset", "shp_dataset", "synthetic_preference_dataset",
    "ultrafeedback_dataset", "unpaired_preference_dataset", "ByteChatTokenizer", "CallableEmbedder",
    "HashedNgramEmbedder", "SentenceEmbedder", "SimilarityOrder", "SimilarPromptBatchSampler",
    "embed_groups",
]
