"""Top-k gradient sparsification with error feedback (numpy, 1-D float32, no I/O).

    topk_exact(x, k)                  indices of the k largest |x| (introselect), ascending
    topk_approx(x, k, rng)            threshold from a random sample of |x|; count within +-10% of k
    SparseUpdate                      (indices, values, size): what one member contributes to a round
    ErrorFeedbackSparsifier           keeps what was not sent (and what a failed round gave back)

Tie rule (both modes): among entries of equal magnitude at the selection boundary the lower index wins,
so ``topk_exact(x, k)`` equals ``np.sort(np.argsort(-np.abs(x), kind="stable")[:k])``.

Error feedback, momentum correction and momentum factor masking follow Deep Gradient Compression
(Lin et al., ICLR 2018, arXiv:1712.01887): with momentum m > 0,
    u <- m*u + g;  v <- v + u;  send top-k of v;  v[sent] = 0;  u[sent] = 0   (momentum factor masking)
and with m = 0 simply  v <- v + g;  send top-k of v;  v[sent] = 0.
Whatever is not sent stays in v (the residual) and joins the next round: no gradient mass is lost.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np

# Sample size for the approximate threshold. The m-th largest of s samples estimates the k-th largest of
# n values with m = s*k/n expected hits; the selected count then has a relative std of about
# 1/sqrt(m) (binomial). At the default density of 1%, s = 2**17 gives m ~ 1311, a std of ~2.8%, so the
# +-10% window is ~3.6 std wide and the (correct, slower) refinement path runs for well under 1% of calls.
# DGC (Lin et al. 2018) likewise estimates its threshold from a sample of 0.1%-1% of the gradient.
DEFAULT_SAMPLE_SIZE = 1 << 17
APPROX_TOLERANCE = 0.10  # selected count of topk_approx lies in [ceil(0.9k), floor(1.1k)] (issue 3)
MODES = ("exact", "approx")


def _check_vector(x: object, name: str = "x") -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    return x


def _is_int(v: object) -> TypeGuard[int | np.integer[Any]]:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_k(k: object, n: int) -> int:
    if not _is_int(k):
        raise ValueError(f"k must be an int, got {type(k).__name__}")
    if not 0 <= k <= n:
        raise ValueError(f"k={k} out of range [0, {n}]")
    return int(k)


def _all_finite(x: np.ndarray) -> bool:
    """True when x holds no NaN/Inf: min and max propagate NaN and expose +-Inf, without a mask array."""
    return x.size == 0 or bool(np.isfinite(x.min()) and np.isfinite(x.max()))


def _topk_exact_abs(a: np.ndarray, k: int) -> np.ndarray:
    """Top-k of a non-negative vector ``a``, ascending, lower index first among ties at the boundary."""
    n = a.size
    if k == 0:
        return np.empty(0, np.int64)
    if k == n:
        return np.arange(n, dtype=np.int64)
    t = np.partition(a, n - k)[n - k]  # the k-th largest value
    idx = np.flatnonzero(a >= t)  # >= k entries, ascending
    extra = idx.size - k
    if extra > 0:  # ties at t beyond the k-th: drop the highest-indexed ones
        ties = np.flatnonzero(a[idx] == t)
        idx = np.delete(idx, ties[-extra:])
    return idx.astype(np.int64, copy=False)


def _approx_window(k: int) -> tuple[int, int]:
    return math.ceil(k * (1 - APPROX_TOLERANCE)), math.floor(k * (1 + APPROX_TOLERANCE))


def _topk_approx_abs(a: np.ndarray, k: int, rng: np.random.Generator, sample_size: int) -> np.ndarray:
    """Sampled threshold on a non-negative vector; at most three passes over ``a`` (see topk_approx)."""
    n = a.size
    if k == 0:
        return np.empty(0, np.int64)
    if k == n or n <= sample_size:  # sampling cannot beat one selection over so few values
        return _topk_exact_abs(a, k)
    lo, hi = _approx_window(k)
    sample = a[rng.integers(0, n, size=sample_size)]
    sample.sort()
    m = min(sample_size, max(1, round(sample_size * k / n)))  # expected sampled hits above the k-th largest
    # First the unbiased estimate; if it selects too few, a threshold from twice as many sample hits.
    for hits in (m, min(sample_size, 2 * m + 8)):
        t = sample[sample_size - hits]
        idx = np.flatnonzero(a >= t)
        if idx.size > hi:  # every top-k entry is >= t, so the exact top-k of the candidates is exact overall
            return idx[_topk_exact_abs(a[idx], k)]
        if idx.size >= lo:
            return idx.astype(np.int64, copy=False)
    return _topk_exact_abs(a, k)


def topk_exact(x: np.ndarray, k: int) -> np.ndarray:
    """Indices (int64, ascending) of the k entries of largest magnitude; ties go to the lower index.

    x: (n,) finite floats. ValueError for non-1-D or non-float input, NaN/Inf, or k outside [0, n].
    """
    _check_vector(x)
    k = _check_k(k, x.size)
    if not _all_finite(x):
        raise ValueError("x holds NaN or Inf")
    return _topk_exact_abs(np.abs(x), k)


def topk_approx(
    x: np.ndarray, k: int, rng: np.random.Generator, sample_size: int = DEFAULT_SAMPLE_SIZE
) -> np.ndarray:
    """Indices (int64, ascending) of entries with |x| >= a threshold estimated from ``sample_size`` random
    entries; the count is guaranteed within [ceil(0.9k), floor(1.1k)].

    Every selected magnitude is >= every unselected one. If the estimate selects more than 1.1k, the exact
    top-k among those candidates is returned (exactly k); if fewer than 0.9k, a lower sample quantile is
    tried once, then exact top-k over all of x. Vectors no longer than the sample use exact top-k.
    """
    _check_vector(x)
    k = _check_k(k, x.size)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy Generator, got {type(rng).__name__}")
    if not _is_int(sample_size) or sample_size < 1:
        raise ValueError(f"sample_size must be a positive int, got {sample_size!r}")
    if not _all_finite(x):
        raise ValueError("x holds NaN or Inf")
    return _topk_approx_abs(np.abs(x), k, rng, int(sample_size))


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no truth value; compare fields explicitly
class SparseUpdate:
    """A sparse vector of length ``size``: ``values[i]`` sits at ``indices[i]``."""

    indices: np.ndarray  # (nnz,) int64, strictly increasing, each in [0, size)
    values: np.ndarray  # (nnz,) float32
    size: int  # length of the dense vector

    def __post_init__(self) -> None:
        if not _is_int(self.size) or self.size < 0:
            raise ValueError(f"size must be a non-negative int, got {self.size!r}")
        for name, arr, dtype in (("indices", self.indices, np.int64), ("values", self.values, np.float32)):
            if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype != dtype:
                got = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
                raise ValueError(f"{name} must be a 1-D {np.dtype(dtype).name} array, got {got}")
        if self.indices.size != self.values.size:
            raise ValueError(f"{self.indices.size} indices but {self.values.size} values")
        if self.indices.size > self.size:
            raise ValueError(f"{self.indices.size} entries exceed size {self.size}")
        if self.indices.size:
            if self.indices[0] < 0 or self.indices[-1] >= self.size:
                raise ValueError(f"indices out of range [0, {self.size})")
            if self.indices.size > 1 and not bool(np.all(self.indices[1:] > self.indices[:-1])):
                raise ValueError("indices must be strictly increasing")

    @property
    def nnz(self) -> int:
        return int(self.indices.size)

    def to_dense(self) -> np.ndarray:
        """(size,) float32 with zeros off the support."""
        out = np.zeros(self.size, np.float32)
        out[self.indices] = self.values
        return out


def check_density(value: object, what: str = "density") -> float:
    """``value`` if it is a top-k fraction in (0, 1] (a real number, not a bool); else ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{what} must be in (0, 1], got {value!r}")
    return float(value)


class ErrorFeedbackSparsifier:
    """Top-k with error feedback (and optional DGC momentum correction) for one flat gradient of ``size``.

    select(grad) -> SparseUpdate  adds grad to the accumulator and takes its top-k out of it.
    restore(update)               puts back what a failed round did not deliver (v[idx] += values).
    residual                      read-only view of what is held back (v).
    """

    def __init__(
        self,
        size: int,
        density: float = 0.01,
        mode: str = "exact",
        momentum: float = 0.0,
        seed: int = 0,
        *,
        sample_size: int = DEFAULT_SAMPLE_SIZE,
    ) -> None:
        if not _is_int(size) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        check_density(density)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not _is_int(seed):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if not _is_int(sample_size) or sample_size < 1:
            raise ValueError(f"sample_size must be a positive int, got {sample_size!r}")
        self.size = int(size)
        self.density = float(density)
        self.mode = mode
        self.momentum = float(momentum)
        self.sample_size = int(sample_size)
        self.k = max(1, round(self.density * self.size))
        self._rng = np.random.default_rng(seed)
        self._v = np.zeros(self.size, np.float32)  # accumulated, not yet sent (the residual)
        self._u = np.zeros(self.size, np.float32) if self.momentum > 0 else None  # DGC velocity
        self._abs = np.empty(self.size, np.float32)  # scratch for |v|, reused every call

    @property
    def residual(self) -> np.ndarray:
        """Read-only view of the held-back accumulator v; later select/restore calls change it."""
        view = self._v.view()
        view.flags.writeable = False
        return view

    def select(
        self, grad: np.ndarray, quantize: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> SparseUpdate:
        """Accumulate ``grad`` ((size,) float32, finite) and take the top-k of the accumulator out.

        ``quantize`` (e.g. ``lambda v: codecs.quantize_values(v, "fp16")``) maps the selected values to
        what the wire will carry; the rounding error stays in the residual, so nothing is lost to fp16.
        """
        _check_vector(grad, "grad")
        if grad.dtype != np.float32 or grad.size != self.size:
            raise ValueError(f"grad must be float32 of shape ({self.size},), got {grad.dtype} {grad.shape}")
        if not _all_finite(grad):
            raise ValueError("grad holds NaN or Inf")
        if self._u is not None:
            self._u *= np.float32(self.momentum)
            self._u += grad
            self._v += self._u
        else:
            self._v += grad
        np.abs(self._v, out=self._abs)
        if self.mode == "exact":
            idx = _topk_exact_abs(self._abs, self.k)
        else:
            idx = _topk_approx_abs(self._abs, self.k, self._rng, self.sample_size)
        values = self._v[idx]  # fancy indexing: a copy
        if quantize is not None:
            sent = np.asarray(quantize(values))
            if sent.dtype != np.float32 or sent.shape != values.shape:
                raise ValueError(f"quantize must return float32 {values.shape}, got {sent.dtype} {sent.shape}")
            self._v[idx] = values - sent  # the rounding error is held back, not lost
            values = sent
        else:
            self._v[idx] = 0.0
        if self._u is not None:
            self._u[idx] = 0.0  # momentum factor masking
        return SparseUpdate(idx, values, self.size)

    def restore(self, update: SparseUpdate) -> None:
        """Give back an update that a failed round did not deliver: v[indices] += values.

        With momentum, the masked velocity is not restored (DGC masks it on selection either way).
        """
        if not isinstance(update, SparseUpdate):
            raise ValueError(f"expected a SparseUpdate, got {type(update).__name__}")
        if update.size != self.size:
            raise ValueError(f"update of size {update.size} for a sparsifier of size {self.size}")
        if not _all_finite(update.values):
            raise ValueError("update values hold NaN or Inf")
        self._v[update.indices] += update.values  # indices are unique, so no lost duplicate writes
