"""PCA of preference-embedding differences: exact, chunked (streamed covariance) and randomized.

Notation: ``z_p = e(x_p, y_p^chosen) - e(x_p, y_p^rejected)`` in ``R^D`` for ``N`` pairs; the
data matrix is ``Z [N, D]``. PCA keeps the top ``k`` eigenpairs of

    C = (1 / (N - ddof)) * sum_p (z_p - mu)(z_p - mu)^T

with ``mu = mean_p z_p, ddof = 1`` when ``center=True`` (what ``sklearn.decomposition.PCA``
does, and what the DRM authors' released code runs) and ``mu = 0, ddof = 0`` when
``center=False``: the second moment ``E[z z^T]``, which is the covariance of the label-symmetric
set ``{z_p} U {-z_p}`` (a pair read either way round). The uncentered form keeps the consensus
preference direction (the mean difference), which centering would remove; it is the default of
:func:`fit_pca` for that reason.

Three solvers, all returning the same :class:`PCAResult` (up to the sign of each component):

* ``"exact"``: ``torch.linalg.svd`` of the centered ``Z`` held in memory (float64).
* ``"covariance"``: streams ``Z`` in chunks and accumulates the ``D x D`` Gram matrix in
  float64 (:class:`CovarianceAccumulator`, mergeable across workers), then ``eigh``. Memory
  ``O(D^2)``, one pass, exact: the choice for data larger than memory when ``D`` is moderate.
* ``"randomized"``: streamed randomized subspace iteration (Halko, Martinsson & Tropp 2011,
  Alg. 4.4 on the covariance operator): ``Q <- orth(C Q)`` with ``C Q`` computed chunk by chunk
  as ``sum_c Z_c^T (Z_c Q)``; a Rayleigh-Ritz step on the last basis gives the eigenpairs.
  Memory ``O(D (k + p))``, ``n_iter + 1`` passes: for large ``D`` or large ``N``.

A *source* is anything :func:`iter_chunks` accepts: a ``[N, D]`` tensor, a list of ``[n_i, D]``
tensors, an object with ``iter_diffs(chunk_size)`` (:class:`fastrm.decompose.store.EmbeddingStore`,
:class:`fastrm.decompose.store.PairEmbeddings`), or a zero-argument callable returning an
iterator of chunks. Multi-pass solvers iterate it several times, so it must be re-iterable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from tqdm.auto import tqdm

PCA_METHODS = ("auto", "exact", "covariance", "randomized")

# "auto" runs the SVD of the data matrix when it is in memory and either small (at most this
# many entries) or wide (N <= D, where the D x D Gram is larger than the data); otherwise the
# covariance route, which is just as exact in float64 and ~4-5x faster than the SVD for tall
# matrices (benchmarks/bench_decompose.py: N=20000, D=1024: 5.3 s vs 26 s on 2 CPU threads).
EXACT_MAX_ENTRIES = 2_000_000
# "auto" switches from the D x D covariance to the randomized solver above this dimension
# (a float64 8192 x 8192 Gram is 512 MB).
COVARIANCE_MAX_DIM = 8192

Source = Union[torch.Tensor, Iterable[torch.Tensor], Callable[[], Iterable[torch.Tensor]], Any]


@dataclass
class PCAResult:
    """Top-``k`` principal directions of the difference matrix.

    Attributes:
        components: ``[k, D]`` float32, orthonormal rows, by decreasing variance.
        explained_variance: ``[k]`` float64 eigenvalues ``lambda_i`` of ``C`` (variance of the
            projection ``(z - mu) . v_i``).
        explained_variance_ratio: ``[k]`` ``lambda_i / trace(C)``.
        total_variance: ``trace(C)``, the variance summed over all ``D`` directions.
        mean: ``[D]`` float64 ``mu`` (zeros when ``center=False``).
        num_samples: ``N``.
        centered: whether ``mu`` was subtracted.
        method: the solver that ran.
    """

    components: torch.Tensor
    explained_variance: torch.Tensor
    explained_variance_ratio: torch.Tensor
    total_variance: float
    mean: torch.Tensor
    num_samples: int
    centered: bool
    method: str

    @property
    def num_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def dim(self) -> int:
        return int(self.components.shape[1])


def iter_chunks(source: Source, chunk_size: int = 4096) -> Iterator[torch.Tensor]:
    """Yields ``[n_c, D]`` chunks of a source (see the module docstring), each ``n_c >= 1``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if isinstance(source, torch.Tensor):
        if source.dim() != 2:
            raise ValueError(f"the difference matrix must be [N, D], got {tuple(source.shape)}")
        for start in range(0, source.shape[0], chunk_size):
            yield source[start : start + chunk_size]
        return
    if hasattr(source, "iter_diffs"):
        yield from source.iter_diffs(chunk_size)
        return
    it = source() if callable(source) else source
    for chunk in it:
        if not isinstance(chunk, torch.Tensor) or chunk.dim() != 2:
            raise ValueError(
                "every chunk of a PCA source must be a [n, D] tensor, got "
                f"{type(chunk).__name__} {tuple(getattr(chunk, 'shape', ()))}"
            )
        if chunk.shape[0]:
            yield chunk


def _svd_flip(components: torch.Tensor) -> torch.Tensor:
    """Deterministic sign: the largest-magnitude coordinate of each row is positive (as sklearn's
    ``svd_flip``), so solvers agree before the preference orientation of :mod:`.heads`."""
    idx = components.abs().argmax(dim=1)
    signs = torch.sign(components.gather(1, idx[:, None]))
    signs[signs == 0] = 1
    return components * signs


def _check_k(k: int, dim: int, n: int, centered: bool) -> None:
    if k < 1:
        raise ValueError(f"num_components must be >= 1, got {k}")
    if k > dim:
        raise ValueError(f"num_components={k} exceeds the embedding dimension D={dim}")
    if n - int(centered) < 1:
        raise ValueError(
            f"PCA needs at least {1 + int(centered)} pairs (center={centered}), got {n}"
        )


def _finish(
    vecs: torch.Tensor, vals: torch.Tensor, total: float, mean: torch.Tensor, n: int,
    centered: bool, method: str,
) -> PCAResult:
    vals = vals.clamp_min(0.0)
    ratio = vals / total if total > 0 else torch.zeros_like(vals)
    return PCAResult(
        components=_svd_flip(vecs).to(torch.float32).contiguous(),
        explained_variance=vals.to(torch.float64),
        explained_variance_ratio=ratio.to(torch.float64),
        total_variance=float(total),
        mean=mean.to(torch.float64).cpu(),
        num_samples=n,
        centered=centered,
        method=method,
    )


def exact_pca(z: torch.Tensor, num_components: int, center: bool = False) -> PCAResult:
    """Exact PCA of an in-memory ``z [N, D]`` by a float64 thin SVD.

    ``Z_c = Z - mu = U S V^T``: ``components = V^T[:k]``, ``lambda = S^2 / (N - ddof)``.
    """
    if z.dim() != 2:
        raise ValueError(f"z must be [N, D], got {tuple(z.shape)}")
    n, d = z.shape
    _check_k(num_components, d, n, center)
    x = z.to(torch.float64)
    mean = x.mean(0) if center else torch.zeros(d, dtype=torch.float64, device=x.device)
    x = x - mean
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    denom = n - int(center)
    vals = s**2 / denom
    total = float(vals.sum())
    return _finish(vh[:num_components].cpu(), vals[:num_components].cpu(), total, mean, n, center, "exact")


class CovarianceAccumulator:
    """Streams ``[n_c, D]`` chunks into float64 sums from which ``C`` is formed exactly.

    Keeps ``n``, ``s = sum (z - c)`` and ``G = sum (z - c)(z - c)^T`` around a fixed shift ``c``
    (the first chunk's mean): the centered covariance is then
    ``(G - n (mu - c)(mu - c)^T) / (n - 1)`` with ``mu = c + s / n``, which avoids the
    cancellation of the naive ``E[z z^T] - mu mu^T`` when ``|mu|`` is large. Two accumulators
    with the same shift merge by summing (:meth:`merge`), e.g. after an all-reduce.
    """

    def __init__(self, dim: int, device: Optional[torch.device | str] = None,
                 shift: Optional[torch.Tensor] = None) -> None:
        self.dim = int(dim)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.n = 0
        self.shift = None if shift is None else shift.to(self.device, torch.float64)
        self.sum = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        self.gram = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)

    def update(self, chunk: torch.Tensor) -> None:
        """Adds the rows of ``chunk [n_c, D]``."""
        if chunk.dim() != 2 or chunk.shape[1] != self.dim:
            raise ValueError(f"chunk must be [n, {self.dim}], got {tuple(chunk.shape)}")
        if chunk.shape[0] == 0:
            return
        x = chunk.to(self.device, torch.float64)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("a chunk of embedding differences holds NaN or inf values")
        if self.shift is None:
            self.shift = x.mean(0)
        x = x - self.shift
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.gram.addmm_(x.T, x)

    def merge(self, other: "CovarianceAccumulator") -> None:
        """Adds another accumulator's sums (same ``D`` and the same shift)."""
        if other.n == 0:
            return
        if self.n == 0 and self.shift is None:
            self.shift = other.shift.clone()
        if other.dim != self.dim or not torch.equal(other.shift.to(self.device), self.shift):
            raise ValueError("accumulators to merge need the same dim and shift (pass shift=)")
        self.n += other.n
        self.sum += other.sum.to(self.device)
        self.gram += other.gram.to(self.device)

    def mean(self) -> torch.Tensor:
        """``[D]`` ``mu``."""
        if self.n == 0:
            raise ValueError("no data was accumulated")
        return self.shift + self.sum / self.n

    def covariance(self, center: bool = False) -> torch.Tensor:
        """``[D, D]`` float64 ``C`` (see the module docstring)."""
        if self.n - int(center) < 1:
            raise ValueError(f"PCA needs at least {1 + int(center)} pairs, got {self.n}")
        c = self.shift
        if center:
            dm = self.sum / self.n  # mu - c
            g = self.gram - self.n * torch.outer(dm, dm)
            return g / (self.n - 1)
        # sum z z^T = G + c s^T + s c^T + n c c^T
        g = self.gram + torch.outer(c, self.sum) + torch.outer(self.sum, c) + self.n * torch.outer(c, c)
        return g / self.n

    def pca(self, num_components: int, center: bool = False) -> PCAResult:
        _check_k(num_components, self.dim, self.n, center)
        cov = self.covariance(center)
        cov = 0.5 * (cov + cov.T)
        vals, vecs = torch.linalg.eigh(cov)  # ascending
        vals, vecs = vals.flip(0)[:num_components], vecs.flip(1)[:, :num_components]
        mean = self.mean() if center else torch.zeros(self.dim, dtype=torch.float64)
        total = float(torch.diagonal(cov).sum())
        return _finish(vecs.T.cpu(), vals.cpu(), total, mean, self.n, center, "covariance")


def _first_chunk(source: Source, chunk_size: int) -> torch.Tensor:
    for chunk in iter_chunks(source, chunk_size):
        return chunk
    raise ValueError("the PCA source is empty (no embedding differences)")


def covariance_pca(
    source: Source,
    num_components: int,
    center: bool = False,
    chunk_size: int = 4096,
    device: Optional[torch.device | str] = None,
    progress: bool = True,
) -> PCAResult:
    """Exact PCA in one streamed pass: accumulates ``C`` chunk by chunk, then ``eigh``."""
    first = _first_chunk(source, chunk_size)
    acc = CovarianceAccumulator(first.shape[1], device=device or first.device)
    for chunk in tqdm(iter_chunks(source, chunk_size), desc="pca: covariance", unit="chunk",
                      disable=not progress, leave=False):
        acc.update(chunk)
    return acc.pca(num_components, center)


def randomized_pca(
    source: Source,
    num_components: int,
    center: bool = False,
    oversample: int = 10,
    n_iter: int = 4,
    chunk_size: int = 4096,
    seed: int = 0,
    device: Optional[torch.device | str] = None,
    progress: bool = True,
) -> PCAResult:
    """Streamed randomized PCA: ``n_iter + 1`` passes, ``O(D (k + oversample))`` memory.

    ``Q_0 = orth(Omega)``, ``Omega [D, l]`` Gaussian, ``l = k + oversample``; each pass computes
    ``Y = C Q`` as ``(sum_c X_c^T (X_c Q) - n d d^T Q) / (N - ddof)`` with ``X_c = Z_c - shift``,
    ``d = mu - shift``; then ``Q <- orth(Y)``. The last pass forms ``B = Q^T C Q [l, l]``; its
    eigenpairs ``(theta, U)`` give ``lambda ~ theta`` and ``components ~ (Q U)^T``. The error
    decays like ``(lambda_{l+1} / lambda_k)^(2 n_iter + 1)``, so a few iterations are exact to
    float precision when the spectrum has a gap after ``k``.
    """
    first = _first_chunk(source, chunk_size)
    d = first.shape[1]
    dev = torch.device(device) if device is not None else first.device
    shift = first.to(dev, torch.float64).mean(0)
    l = min(d, num_components + max(0, oversample))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, l, generator=gen, dtype=torch.float64).to(dev)).Q
    n = 0
    s = torch.zeros(d, dtype=torch.float64, device=dev)
    sq = 0.0
    b = None
    for it in tqdm(range(n_iter + 1), desc="pca: randomized passes", disable=not progress,
                   leave=False):
        y = torch.zeros(d, l, dtype=torch.float64, device=dev)
        count = 0
        for chunk in iter_chunks(source, chunk_size):
            x = chunk.to(dev, torch.float64) - shift
            if it == 0:
                if chunk.shape[1] != d:
                    raise ValueError(f"chunk must be [n, {d}], got {tuple(chunk.shape)}")
                if not bool(torch.isfinite(x).all()):
                    raise ValueError("a chunk of embedding differences holds NaN or inf values")
                s += x.sum(0)
                sq += float((x * x).sum())
            count += x.shape[0]
            y.addmm_(x.T, x @ q)
        if it == 0:
            n = count
            _check_k(num_components, d, n, center)
        elif count != n:
            raise ValueError(
                f"the PCA source is not re-iterable: pass {it} saw {count} rows, the first {n}"
            )
        dm = s / n  # mu - shift
        if center:
            y -= n * torch.outer(dm, dm @ q)
            y /= n - 1
        else:
            # sum z z^T Q with z = x + shift
            y += torch.outer(shift, s @ q) + torch.outer(s, shift @ q) + n * torch.outer(shift, shift @ q)
            y /= n
        if it == n_iter:
            b = q.T @ y
            break
        q = torch.linalg.qr(y).Q
    b = 0.5 * (b + b.T)
    vals, u = torch.linalg.eigh(b)
    vals, u = vals.flip(0)[:num_components], u.flip(1)[:, :num_components]
    vecs = (q @ u).T
    if center:
        total = (sq - n * float(dm @ dm)) / (n - 1)
        mean = shift + dm
    else:
        # sum |z|^2 = sum |x|^2 + 2 shift . s + n |shift|^2
        total = (sq + 2.0 * float(shift @ s) + n * float(shift @ shift)) / n
        mean = torch.zeros(d, dtype=torch.float64)
    return _finish(vecs.cpu(), vals.cpu(), total, mean, n, center, "randomized")


def fit_pca(
    source: Source,
    num_components: int,
    method: str = "auto",
    center: bool = False,
    chunk_size: int = 4096,
    oversample: int = 10,
    n_iter: int = 4,
    seed: int = 0,
    device: Optional[torch.device | str] = None,
    progress: bool = True,
) -> PCAResult:
    """PCA of the embedding differences of a source with the chosen solver.

    ``method="auto"``: ``"exact"`` for an in-memory tensor of at most ``EXACT_MAX_ENTRIES``
    entries or with ``N <= D``, else ``"covariance"`` up to ``D = COVARIANCE_MAX_DIM``, else
    ``"randomized"``.
    """
    if method not in PCA_METHODS:
        raise ValueError(f"pca method={method!r} is not known; choose one of {', '.join(PCA_METHODS)}")
    if method == "auto":
        if isinstance(source, torch.Tensor) and source.dim() == 2 and (
                source.numel() <= EXACT_MAX_ENTRIES or source.shape[0] <= source.shape[1]):
            method = "exact"
        else:
            dim = source.shape[1] if isinstance(source, torch.Tensor) else getattr(source, "dim", None)
            if dim is None:
                dim = _first_chunk(source, chunk_size).shape[1]
            method = "covariance" if dim <= COVARIANCE_MAX_DIM else "randomized"
    if method == "exact":
        z = source if isinstance(source, torch.Tensor) else torch.cat(list(iter_chunks(source, chunk_size)))
        if device is not None:
            z = z.to(device)
        return exact_pca(z, num_components, center)
    if method == "covariance":
        return covariance_pca(source, num_components, center, chunk_size, device, progress)
    return randomized_pca(source, num_components, center, oversample, n_iter, chunk_size, seed,
                          device, progress)
