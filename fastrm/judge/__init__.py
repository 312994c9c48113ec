"""Preference data from models: diverse multi-model generation and LLM-as-judge labelling.

Generation (:mod:`fastrm.judge.generate`): several :class:`ModelEntry` (backend + sampling
settings + n) x prompts -> one row per response, written incrementally and resumable.
Backends: :class:`LocalBackend` (torchtune decoder, batched KV-cache sampling) and
:class:`OpenAIBackend` (any OpenAI-compatible server over HTTP).

Labelling: :func:`make_pairs` (pairing strategies) -> :class:`PairwiseJudge` ("A or B?" in both
orders, probabilities from answer-token logprobs, contradictions dropped) or
:class:`MeanLogprobJudge` (order-independent) -> :class:`PreferenceTransform` / :func:`label_pairs`
(``chosen``, ``rejected``, ``margin = logit(p) / beta``; :func:`fit_beta` fits ``beta``).

CLI: :func:`fastrm.judge.cli.main_generate`, :func:`fastrm.judge.cli.main_judge`.
"""

from fastrm.judge.bt import BetaFit, fit_beta, margin_from_prob, prob_from_margin
from fastrm.judge.generate import GenerateStats, ModelEntry, generate_responses, load_prompts, row_key, row_seed
from fastrm.judge.judge import (
    JudgeStats,
    MeanLogprobJudge,
    PairJudgement,
    PairwiseJudge,
    combine_orders,
    label_logit,
    parse_verdict,
)
from fastrm.judge.local import LocalBackend, encode_chat_prompt
from fastrm.judge.openai_compat import OpenAIBackend
from fastrm.judge.pairing import make_pairs
from fastrm.judge.store import JsonlStore, jsonl_to_parquet, read_rows
from fastrm.judge.transform import PreferenceTransform, label_pairs, load_pairs, preference_row
from fastrm.judge.types import Completion, GenerationBackend, GenerationRequest, SamplingParams, TokenLogprob

__all__ = [
    "BetaFit", "Completion", "GenerateStats", "GenerationBackend", "GenerationRequest", "JsonlStore",
    "JudgeStats", "LocalBackend", "MeanLogprobJudge", "ModelEntry", "OpenAIBackend", "PairJudgement",
    "PairwiseJudge", "PreferenceTransform", "SamplingParams", "TokenLogprob", "combine_orders",
    "encode_chat_prompt", "fit_beta", "generate_responses", "jsonl_to_parquet", "label_logit",
    "label_pairs", "load_pairs", "load_prompts", "make_pairs", "margin_from_prob", "parse_verdict",
    "preference_row", "prob_from_margin", "read_rows", "row_key", "row_seed",
]
