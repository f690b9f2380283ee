"""Spectra of covariance matrices and the quantities read off them.

Pure functions on tensors: the eigendecomposition (descending, signs fixed),
the intrinsic dimensionality at a variance threshold, saturation, the fraction
of variance kept, the affine map of a PCA projection, random orthogonal
matrices for control experiments, and the seed library's stats
(``idim``, ``lsat``, ``cov``, ``det``, ``trc``, ``dtrc``, ``embed``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._validation import check_positive_int, check_threshold

__all__ = [
    "cov_determinant",
    "cov_trace",
    "diag_trace",
    "eigh_descending",
    "eigvalsh_descending",
    "eigh_through",
    "embed",
    "explained_fraction",
    "explained_fractions",
    "intrinsic_dimensionality",
    "pca_of_rows",
    "projection_affine",
    "random_orthogonal",
    "row_blocks",
    "saturation",
    "times_by_rows",
    "transposed_times_by_rows",
]


def all_finite(*tensors: Tensor) -> bool:
    """Whether every element of ``tensors`` is finite, read off their float64 sums in one sync.

    A sum is non-finite iff some element is (no per-element temporary). The sums
    are taken in float64, so that a half-precision tensor of finite elements is
    never reported non-finite because its sum overflows its own dtype.
    """
    sums = [t.sum(dtype=torch.float64) for t in tensors]
    return bool(torch.isfinite(torch.stack(sums)).all()) if sums else True


def _check_square(matrix: Tensor, name: str = "cov") -> None:
    if not isinstance(matrix, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(matrix).__name__}")
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(matrix.shape)}")
    if not all_finite(matrix):
        raise ValueError(f"{name} contains NaN or infinite values")


def eigh_descending(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric PSD matrix, largest eigenvalue first.

    Computed in float64. Tiny negative eigenvalues (rounding) are clipped to 0.
    Each eigenvector's sign is fixed so that its largest-magnitude entry is
    positive (scikit-learn's convention for ``PCA.components_``).

    Returns:
        ``(eigenvalues, eigenvectors)``: float64 ``(d,)`` descending, and
        ``(d, d)`` with the eigenvectors as columns.
    """
    _check_square(matrix)
    values, vectors = torch.linalg.eigh(matrix.to(torch.float64))
    return values.flip(0).clamp_min(0.0), _fix_signs(vectors.flip(1))


def eigvalsh_descending(matrix: Tensor) -> Tensor:
    """The eigenvalues of a symmetric PSD matrix, largest first, float64, tiny negative ones
    (rounding) clipped to 0: :func:`eigh_descending`'s without its eigenvectors (the
    tridiagonal reduction and its eigenvalues only, about a third of the work)."""
    _check_square(matrix)
    return torch.linalg.eigvalsh(matrix.to(torch.float64)).flip(0).clamp_min(0.0)


def pca_of_rows(
    rows: Tensor, centering: bool = True, vectors: bool = True
) -> tuple[Tensor, Tensor | None]:
    """The spectrum of the covariance (or the second moment) of samples given as rows.

    ``rows`` is ``(n, d)`` with ``n <= d``: fewer samples than features, where the
    ``(d, d)`` matrix has rank at most ``n`` and its ``d``-wide decomposition
    would be mostly spent on zeros. With ``A`` the (centred) rows over ``sqrt(n)``
    and the thin QR ``A^T = Q R``, the matrix is ``A^T A = Q (R R^T) Q^T``: the
    SVD of the ``(n, n)`` ``R`` gives its eigenvalues (the squared singular
    values) and eigenvectors ``Q U``, orthonormal to rounding, and the matrix is
    never formed (whose float64 rounding the decomposition would otherwise inherit).

    Args:
        rows: the samples, ``(n, d)``.
        centering: the covariance (divided by ``n``) if True, else ``E[x x^T]``.
        vectors: also the eigenvectors (else ``None`` in their place).

    Returns:
        ``(eigenvalues, eigenvectors)``: float64 ``(d,)`` descending (the last
        ``d - n`` zero), and ``(d, n)`` with the eigenvectors of the first ``n``
        as columns, signs fixed as in :func:`eigh_descending`; or None.
    """
    n, d = rows.shape
    if not 0 < n <= d:
        raise ValueError(f"pca_of_rows needs (n, d) rows with 0 < n <= d, got {tuple(rows.shape)}")
    a = rows.to(torch.float64)
    if centering:
        a = a - a.mean(0)
    q, r = torch.linalg.qr(a.T / math.sqrt(n))
    if vectors:
        u, s, _ = torch.linalg.svd(r)
        basis = _fix_signs(q @ u)
    else:
        s, basis = torch.linalg.svdvals(r), None
    return torch.cat([s.square(), s.new_zeros(d - n)]), basis


def _fix_signs(vectors: Tensor) -> Tensor:
    """Each column times the sign of its largest-magnitude entry (scikit-learn's convention), in place.

    Ties go to the first such entry, as ``argmax`` has them. On the CPU the
    signs are read off each column's largest and smallest entries, two
    reductions along the rows (``abs().argmax(0)`` takes 2x to 3x as long),
    and only columns whose two have equal magnitudes are searched.
    """
    if not vectors.numel():
        return vectors
    if vectors.device.type == "cpu":
        largest, smallest = vectors.amax(0), vectors.amin(0)
        signs = torch.where(largest > -smallest, 1.0, -1.0).to(vectors.dtype)
        tied = largest == -smallest
        if bool(tied.any()):  # no device sync on the CPU
            signs[tied] = _pivot_signs(vectors[:, tied])
    else:
        signs = _pivot_signs(vectors)
    return vectors.mul_(signs)


def _pivot_signs(vectors: Tensor) -> Tensor:
    """The sign of each column's first largest-magnitude entry (1 for a zero column)."""
    pivots = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors.gather(0, pivots[None, :]))[0]
    return torch.where(signs == 0, 1.0, signs).to(vectors.dtype)


# eigh_through's Cholesky route: the bound on its basis' loss of orthogonality
# (eps x an upper bound on cond(a^T a)) above which the Householder route is
# taken; a tenth of float32's rounding, the precision the projections run in.
_THROUGH_ORTHOGONALITY = 1e-8


def eigh_through(
    a: Tensor, inner: Tensor, vectors: bool = True, cache: dict[str, Any] | None = None
) -> tuple[Tensor, Tensor | None]:
    """Eigendecomposition of ``a @ inner @ a.T`` without forming or decomposing it.

    ``a`` is ``(d, r)`` with ``r < d`` and ``inner`` a symmetric PSD ``(r, r)``
    matrix: the covariance of a layer's input, say, with ``a`` its weight, so
    that the product is the covariance of the layer's output. A narrower ``a``
    (a float32 weight) is converted to float64 a block of rows at a time, never whole. With a thin
    factorisation ``a = Q R`` (``Q`` orthonormal), ``a inner a^T = Q (R inner
    R^T) Q^T``: one ``r``-wide ``eigh`` and orthogonal maps instead of a
    ``d``-wide decomposition, with eigenvectors ``Q V``.

    ``R`` is the Cholesky factor of ``a^T a`` (``Q = a R^{-1}``, never formed),
    all matrix products; ``Q``'s columns are then orthonormal to about
    ``eps * cond(a^T a)``. Where an upper bound on that loss (``eps ||G||_F
    ||R^{-1}||_F^2`` with ``G = a^T a``) exceeds ``_THROUGH_ORTHOGONALITY``, or
    ``a`` is rank-deficient, the Householder QR of ``a`` is used instead
    (orthonormal to rounding; 1.3x to 1.6x the time at 1536 x 576 on one CPU thread).

    With ``vectors=False`` only the eigenvalues are computed: the ``r``-wide
    problem's eigenvalues, none of the maps, through the Cholesky factor wherever
    it exists: the orthogonality bound is of the eigenvectors, and the
    eigenvalues' error (``eps ||a||^2 ||inner||``, times a small constant) is of
    the same order by either route, so the bound (an ``r``-wide inverse) is taken
    only when the eigenvectors are asked for. ``cache``, a dict the caller keeps
    for this same ``a``, holds ``R`` (``(r, r)``) and the route from one call to
    the next (the eigenvalues first, the eigenvectors at their first use): the
    product ``a^T a`` (``d r^2``, as much as the ``r``-wide eigenvalues at 5632 x
    2048) is then formed once.

    Returns:
        ``(eigenvalues, eigenvectors)``: float64 ``(d,)`` descending (the last
        ``d - r`` are zero) and ``(d, r)``, the eigenvectors of the non-zero
        part as columns, signs fixed as in :func:`eigh_descending`; or None.
    """
    d, r = a.shape
    if inner.shape != (r, r) or r >= d:
        raise ValueError(
            f"eigh_through needs a (d, r) with r < d and inner (r, r), got "
            f"{tuple(a.shape)} and {tuple(inner.shape)}"
        )
    inner = inner.to(torch.float64)
    cache = {} if cache is None else cache
    if "lower" not in cache:
        cache["lower"], cache["size"] = _gram_factor(a)
    if vectors and cache["lower"] is not None and not cache.get("checked"):
        if not _orthogonal_enough(cache["lower"], cache["size"]):
            cache["lower"] = None
        cache["checked"] = True
    lower = cache["lower"]  # a^T a = lower lower^T, q = a lower^{-T}; None: Householder QR
    if lower is None:
        q, upper = torch.linalg.qr(a.to(torch.float64), mode="reduced" if vectors else "r")
        small = _symmetric(upper @ inner @ upper.T)
    else:
        small = _symmetric(lower.T @ inner @ lower)
    if not vectors:
        values = eigvalsh_descending(small)
        return torch.cat([values, values.new_zeros(d - r)]), None
    values, eigenvectors = eigh_descending(small)
    if lower is None:
        basis = q @ eigenvectors
    else:
        basis = _times(a, torch.linalg.solve_triangular(lower.T, eigenvectors, upper=True))
    return torch.cat([values, values.new_zeros(d - r)]), _fix_signs(basis)


# float64 products of narrower matrices convert them this many bytes of rows at a time: a
# 5632 x 2048 float32 weight is never copied whole (88 MiB) to form a^T a or a's map.
_ROWS_BYTES = 16 * 2**20


def row_blocks(a: Tensor, width: int = 0) -> Iterator[tuple[slice, Tensor]]:
    """``a``'s rows in float64, a block of ``_ROWS_BYTES`` at a time (all at once if float64
    and ``width`` is 0); ``width``: the float64 row that the caller forms per row too."""
    row = 8 * max(a.shape[1], width)
    whole = a.dtype == torch.float64 and not width
    step = a.shape[0] if whole else max(1, _ROWS_BYTES // row)
    for start in range(0, a.shape[0], step):
        rows = slice(start, start + step)
        yield rows, a[rows].to(torch.float64)


def _times(a: Tensor, b: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """``a @ b`` in float64 for a float64 ``b``, ``a`` converted a block of rows at a time,
    the result in ``dtype`` (a narrower one: converted a block of rows at a time too)."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=dtype, device=b.device)
    if dtype == torch.float64:
        for rows, block in row_blocks(a):
            torch.matmul(block, b, out=out[rows])
        return out
    for rows, block in row_blocks(a, b.shape[1]):
        out[rows] = block @ b
    return out


def times_by_rows(a: Tensor, b: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``a @ b`` computed in float64 with neither ``a`` nor the result ever held whole in
    float64 where they are narrower: ``a`` is converted, and the result (in ``dtype``,
    default float64) formed, a block of rows at a time."""
    return _times(a, b.to(torch.float64), torch.float64 if dtype is None else dtype)


def transposed_times_by_rows(a: Tensor, b: Tensor) -> Tensor:
    """``a^T @ b`` (float64) for ``a`` ``(d, k)`` and ``b`` ``(d, n)``, a narrower one
    converted a block of their common rows at a time, never whole."""
    if a.dtype == b.dtype == torch.float64:
        return a.T @ b
    out = torch.zeros(a.shape[1], b.shape[1], dtype=torch.float64, device=b.device)
    for rows, block in row_blocks(b, a.shape[1]):
        out.addmm_(a[rows].to(torch.float64).T, block)
    return out


def _gram_factor(a: Tensor) -> tuple[Tensor | None, Tensor]:
    """``(L, ||a^T a||_F)`` with ``a^T a = L L^T`` (in float64); ``L`` None where the
    Cholesky factorisation fails (``a`` rank-deficient, to rounding)."""
    gram = a.new_zeros(a.shape[1], a.shape[1], dtype=torch.float64)
    for _, block in row_blocks(a):
        gram.addmm_(block.T, block)
    size = torch.linalg.matrix_norm(gram)
    lower, info = torch.linalg.cholesky_ex(gram)
    return (None if int(info) != 0 else lower), size


def _orthogonal_enough(lower: Tensor, size: Tensor) -> bool:
    """Whether ``a L^{-T}`` (``L`` from :func:`_gram_factor`) is orthonormal to within
    ``_THROUGH_ORTHOGONALITY``: ``||L^{-1}||_F^2 = trace((a^T a)^{-1})`` with
    ``||a^T a||_F`` bounds ``cond(a^T a)``."""
    bound = size * torch.cholesky_inverse(lower).diagonal().sum()
    return float(bound) * torch.finfo(torch.float64).eps <= _THROUGH_ORTHOGONALITY


def _symmetric(matrix: Tensor) -> Tensor:
    return (matrix + matrix.T) / 2


def _cumulative_fraction(eigenvalues: Tensor) -> Tensor | None:
    total = eigenvalues.sum()
    if not total > 0:
        return None
    return eigenvalues.cumsum(0) / total


def intrinsic_dimensionality(eigenvalues: Tensor, threshold: float = 0.99) -> int:
    """Smallest ``k`` whose top-``k`` eigenvalues explain at least ``threshold`` of the variance.

    ``threshold = 1`` keeps every direction (``k = width``), whatever the rounding.
    A spectrum with no variance at all has ``k = 0``. On generic data this equals
    ``sklearn.decomposition.PCA(n_components=threshold, svd_solver="full").n_components_``.

    Args:
        eigenvalues: descending, non-negative eigenvalues.
        threshold: fraction of variance to keep, in (0, 1].
    """
    threshold = check_threshold(threshold)
    width = eigenvalues.shape[0]
    fractions = _cumulative_fraction(eigenvalues)
    if fractions is None:
        return 0
    if threshold >= 1.0:
        return width
    t = torch.tensor([threshold], dtype=fractions.dtype, device=fractions.device)
    k = int(torch.searchsorted(fractions, t, right=False)) + 1
    return min(k, width)


def saturation(k: int, width: int) -> float:
    """Fraction of a layer's width in use: ``k / width`` (0 for an empty layer)."""
    return k / width if width else 0.0


def explained_fractions(eigenvalues: Tensor) -> Tensor:
    """Fractions of the total variance the top ``k`` eigenvalues carry, for ``k = 1..width``.

    All ones when there is no variance at all. ``explained_fraction(e, k)`` is
    element ``k - 1``; thresholds set to these values keep exactly ``k``
    directions (up to ties from zero eigenvalues).
    """
    fractions = _cumulative_fraction(eigenvalues)
    if fractions is None:
        return torch.ones_like(eigenvalues, dtype=torch.float64)
    return fractions.clamp_max(1.0)


def explained_fraction(eigenvalues: Tensor, k: int) -> float:
    """Fraction of the total variance carried by the top ``k`` eigenvalues (1 if there is none)."""
    fractions = _cumulative_fraction(eigenvalues)
    if fractions is None:
        return 1.0
    return 0.0 if k == 0 else float(fractions[k - 1].clamp_max(1.0))


def projection_affine(
    basis: Tensor,
    center: Tensor,
    keepdim: bool = True,
    dtype: torch.dtype = torch.float64,
    rest: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The affine map of a projection onto the span of ``basis`` around ``center``.

    With ``V = basis`` (orthonormal columns, ``(d, k)``) and ``mu = center``:
    ``keepdim=True`` maps ``x -> (x - mu) V V^T + mu`` and ``keepdim=False`` maps
    ``x -> (x - mu) V``. Both are returned as ``(weight, bias)`` for
    ``torch.nn.functional.linear`` (``x @ weight.T + bias``), one fused map.
    Every entry is computed in float64 and then rounded to ``dtype``; the
    ``(d, d)`` weight is built a block of rows at a time, so no float64 copy
    of it is ever held when ``dtype`` is narrower.

    ``rest``, optional, is ``(d, d - k)``: orthonormal columns that complete
    ``basis`` to a basis of the whole space (the other eigenvectors). Where they
    are fewer than ``basis``' columns, ``V V^T`` is built as ``I - R R^T``,
    ``d^2 (d - k)`` multiply-accumulates instead of ``d^2 k``.
    """
    basis = basis.to(torch.float64)
    center = center.to(torch.float64)
    if not keepdim:
        weight = basis.T.contiguous()
        return weight.to(dtype), (-(weight @ center)).to(dtype)
    d, k = basis.shape
    if rest is not None and rest.shape != (d, d - k):
        raise ValueError(
            f"rest must complete basis {tuple(basis.shape)} to ({d}, {d}), got "
            f"shape {tuple(rest.shape)}"
        )
    if rest is not None and rest.shape[1] < k:
        others = rest.to(torch.float64)
        bias = others @ (others.T @ center)  # mu - V V^T mu

        def rows_of(start: int, stop: int) -> Tensor:
            block = -(others[start:stop] @ others.T)
            block[:, start:stop].diagonal().add_(1.0)  # the rows of I - R R^T
            return block
    else:
        bias = center - basis @ (basis.T @ center)

        def rows_of(start: int, stop: int) -> Tensor:
            return basis[start:stop] @ basis.T

    if dtype == torch.float64:
        return rows_of(0, d), bias
    weight = torch.empty(d, d, dtype=dtype, device=basis.device)
    rows = max(1, _BLOCK_BYTES // (8 * max(d, 1)))
    for start in range(0, d, rows):
        weight[start : start + rows] = rows_of(start, start + rows)
    return weight, bias.to(dtype)


_BLOCK_BYTES = 64 * 2**20  # float64 rows of a projection built at a time


def random_orthogonal(
    dim: int = 3, random_state: int | np.random.Generator | None = None
) -> np.ndarray:
    """Haar-random special orthogonal ``(dim, dim)`` matrix (determinant +1), float64.

    Args:
        dim: matrix size, >= 1.
        random_state: seed or ``numpy.random.Generator`` for reproducibility;
            ``None`` draws from the global NumPy state, as the seed library did.
    """
    from scipy.stats import special_ortho_group

    dim = check_positive_int(dim, "dim")
    if dim == 1:
        return np.ones((1, 1))
    state = np.random.mtrand._rand if random_state is None else random_state
    return special_ortho_group.rvs(dim, random_state=state)


def cov_determinant(cov: Tensor) -> float:
    """Determinant of the covariance matrix (generalised variance)."""
    _check_square(cov)
    return float(torch.linalg.det(cov.to(torch.float64)))


def cov_trace(cov: Tensor) -> float:
    """Trace of the covariance matrix (total variance)."""
    _check_square(cov)
    return float(cov.to(torch.float64).trace())


def diag_trace(cov: Tensor) -> float:
    """Trace of the diagonalised covariance: the sum of its clipped eigenvalues."""
    values, _ = eigh_descending(cov)
    return float(values.sum())


def embed(samples: Tensor, eigenvectors: Tensor, center: Tensor, dims: int = 2) -> Tensor:
    """Samples ``(n, d)`` expressed in the top ``dims`` eigendirections: ``(x - center) V[:, :dims]``."""
    dims = check_positive_int(dims, "dims")
    v = eigenvectors[:, :dims].to(torch.float64)
    return (samples.to(torch.float64) - center.to(torch.float64)) @ v
