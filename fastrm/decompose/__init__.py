"""Decomposed reward models (DRMs, arXiv 2502.13131): preferences as vectors, PCA basis heads.

A backbone embeds both responses of every preference pair (the hidden state at the reward
position); PCA of the differences ``z = e_chosen - e_rejected`` gives ``k`` orthonormal
directions, each a reward head ``r_i = v_i . e`` signed to prefer the chosen responses. A new
user or task is served by a weighted mix ``sum_i alpha_i r_i`` fitted on a few labelled pairs:
one ``D -> 1`` head that the reward model's fused head + loss path uses unchanged.

Pipeline: :func:`embed_pairs` -> :func:`fit_pca` -> :func:`orient_components` ->
:func:`build_report` -> :func:`fit_head_weights` / :func:`adapt_heads` ->
:meth:`DecomposedHeads.save`; :mod:`fastrm.decompose.recipe` runs it from a config
(``fastrm decompose --config decompose_synthetic``).
"""

from fastrm.decompose.adapt import (ADAPT_METHODS, HeadWeights, adapt_heads, few_shot_split,
                                    fit_head_weights, mix_accuracy)
from fastrm.decompose.heads import (DecomposedHeads, head_accuracy, head_loss, load_into_head,
                                    multihead_rewards, orient_components)
from fastrm.decompose.pca import (PCA_METHODS, CovarianceAccumulator, PCAResult, covariance_pca,
                                  exact_pca, fit_pca, randomized_pca)
from fastrm.decompose.report import HeadReport, build_report
from fastrm.decompose.store import EmbeddingStore, PairEmbeddings


def embed_pairs(*args, **kwargs):
    """See :func:`fastrm.decompose.embed.embed_pairs` (imported lazily: it needs the model
    and data packages)."""
    from fastrm.decompose.embed import embed_pairs as _embed_pairs

    return _embed_pairs(*args, **kwargs)


__all__ = [
    "ADAPT_METHODS", "PCA_METHODS", "CovarianceAccumulator", "DecomposedHeads", "EmbeddingStore",
    "HeadReport", "HeadWeights", "PCAResult", "PairEmbeddings", "adapt_heads", "build_report",
    "covariance_pca", "embed_pairs", "exact_pca", "few_shot_split", "fit_head_weights", "fit_pca",
    "head_accuracy", "head_loss", "load_into_head", "mix_accuracy", "multihead_rewards",
    "orient_components", "randomized_pca",
]
