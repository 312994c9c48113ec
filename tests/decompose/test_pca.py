"""PCA solvers: exact SVD vs float64 eigh reference, chunked covariance == exact, randomized."""

import pytest
import torch

from fastrm.decompose.pca import (CovarianceAccumulator, covariance_pca, exact_pca, fit_pca,
                                  iter_chunks, randomized_pca)
from fastrm.decompose.store import EmbeddingStore, PairEmbeddings


def _spiked(n, d, k, seed, offset=0.0):
    """Data with a clear spectral gap after k: k strong directions + isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    scales = torch.ones(d, dtype=torch.float64) * 0.3
    scales[:k] = torch.linspace(5.0, 2.0, k, dtype=torch.float64)
    z = (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ q.T
    return (z + offset * q[:, 0]).to(torch.float32)


def _reference(z, k, center):
    x = z.double()
    mu = x.mean(0) if center else torch.zeros(x.shape[1], dtype=torch.float64)
    x = x - mu
    c = x.T @ x / (x.shape[0] - int(center))
    vals, vecs = torch.linalg.eigh(c)
    return vals.flip(0), vecs.flip(1).T, torch.trace(c)


def _assert_same_subspace(a, b, atol):
    # rows agree up to sign
    cos = (a.double() * b.double()).sum(1).abs()
    assert torch.allclose(cos, torch.ones_like(cos), atol=atol), cos


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("n,d,k", [(300, 16, 4), (50, 40, 6), (1000, 8, 8)])
def test_exact_matches_eigh_reference(n, d, k, center):
    z = _spiked(n, d, min(k, 4), seed=n + d, offset=1.5)
    res = exact_pca(z, k, center=center)
    vals, vecs, total = _reference(z, k, center)
    torch.testing.assert_close(res.explained_variance, vals[:k], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(res.total_variance, float(total), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(res.explained_variance_ratio, vals[:k] / total, rtol=1e-9, atol=1e-9)
    _assert_same_subspace(res.components[: min(k, 4)], vecs[: min(k, 4)], atol=1e-5)
    assert torch.allclose(res.components @ res.components.T, torch.eye(k), atol=1e-5)


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunked_covariance_equals_exact(center, chunk_size):
    z = _spiked(257, 24, 5, seed=3, offset=4.0)
    ex = exact_pca(z, 6, center=center)
    ch = covariance_pca(z, 6, center=center, chunk_size=chunk_size, progress=False)
    torch.testing.assert_close(ch.explained_variance, ex.explained_variance, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ch.total_variance, ex.total_variance, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ch.mean, ex.mean, rtol=1e-9, atol=1e-10)
    # identical after the shared deterministic sign convention
    torch.testing.assert_close(ch.components, ex.components, rtol=0, atol=1e-5)


def test_chunked_pca_streams_a_disk_store(tmp_path):
    z = _spiked(500, 12, 3, seed=5, offset=2.0)
    base = torch.randn(500, 12)
    store = EmbeddingStore.create(tmp_path / "s", dim=12, shard_size=64)
    for i in range(0, 500, 37):  # appends that straddle shard boundaries
        store.append(base[i:i + 37] + z[i:i + 37], base[i:i + 37])
    assert not EmbeddingStore.open(tmp_path / "s").complete  # interrupted here: not reusable
    store.close()
    assert store.complete
    reopened = EmbeddingStore.open(tmp_path / "s")
    assert reopened.num_pairs == 500 and len(reopened.meta["shards"]) == 8
    ch = fit_pca(reopened, 4, method="covariance", chunk_size=50, progress=False)
    ex = exact_pca((base + z) - base, 4)
    torch.testing.assert_close(ch.explained_variance, ex.explained_variance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ch.components, ex.components, rtol=0, atol=1e-4)


def test_accumulator_merge_equals_single_pass():
    z = _spiked(400, 10, 3, seed=7, offset=3.0)
    one = CovarianceAccumulator(10)
    one.update(z)
    a = CovarianceAccumulator(10, shift=z[:5].double().mean(0))
    b = CovarianceAccumulator(10, shift=z[:5].double().mean(0))
    a.update(z[:123])
    b.update(z[123:])
    a.merge(b)
    for center in (False, True):
        torch.testing.assert_close(a.covariance(center), one.covariance(center), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("chunk_size", [33, 4096])
def test_randomized_matches_exact_with_gap(center, chunk_size):
    z = _spiked(600, 64, 5, seed=11, offset=1.0)
    ex = exact_pca(z, 5, center=center)
    rd = randomized_pca(z, 5, center=center, n_iter=6, chunk_size=chunk_size, seed=1, progress=False)
    torch.testing.assert_close(rd.explained_variance, ex.explained_variance, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(rd.total_variance, ex.total_variance, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rd.components, ex.components, rtol=0, atol=1e-4)


def test_auto_method_and_sources():
    z = _spiked(100, 8, 2, seed=2)
    assert fit_pca(z, 2).method == "exact"
    assert fit_pca(torch.randn(2100, 1000), 2, progress=False).method == "covariance"  # tall, big
    pe = PairEmbeddings(z + 1.0, torch.ones_like(z))
    assert fit_pca(pe, 2, progress=False).method == "covariance"
    chunks = list(iter_chunks(z, 30))
    res = fit_pca(lambda: iter(chunks), 2, progress=False)
    torch.testing.assert_close(res.explained_variance, exact_pca(z, 2).explained_variance,
                               rtol=1e-9, atol=1e-9)


def test_bad_inputs_raise():
    z = torch.randn(10, 4)
    with pytest.raises(ValueError, match="num_components"):
        exact_pca(z, 5)
    with pytest.raises(ValueError, match="method"):
        fit_pca(z, 2, method="svd")
    with pytest.raises(ValueError, match="empty"):
        fit_pca(lambda: iter([]), 2, method="covariance")
    bad = z.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        covariance_pca(bad, 2, progress=False)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        exact_pca(z[:1], 1, center=True)
    # a one-shot generator is not re-iterable: the multi-pass solver says so
    gen = iter(list(iter_chunks(z, 3)))
    with pytest.raises(ValueError, match="re-iterable|empty"):
        randomized_pca(gen, 2, progress=False)
