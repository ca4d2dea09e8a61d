"""Confidence intervals for per-item evaluation results.

* :func:`bootstrap_ci`: percentile bootstrap of the mean over items (any per-item values:
  booleans, KL values, probabilities); deterministic for a seed.
* :func:`wilson_interval`: the analytic Wilson score interval for a proportion; better than the
  bootstrap for small ``n`` or rates near 0 or 1 (the percentile bootstrap of 0/20 is (0, 0)).
* :func:`cluster_bootstrap_ci`: the bootstrap resampling whole clusters (items sharing a topic
  are not independent).
* :func:`paired_bootstrap_diff`: the interval of ``mean(a) - mean(b)`` when ``a`` and ``b`` are
  two conditions measured on the same items (steered vs unsteered), resampling items jointly so
  the pairing is kept; narrower than comparing two separate intervals.
* :func:`paired_rate_diff_interval`: Newcombe's square-and-add interval of the difference of
  two rates measured on the same items (his method 10, 1998): informative where the paired
  bootstrap collapses (every item flipping gives [-1, -1]).
* :func:`mean_interval`: the interval a result reports: Wilson for a rate (per-item 0/1 values),
  the bootstrap for the mean of continuous values (KL, scores, probabilities).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

from refusal_dir.errors import ConfigError, DataError

_MAX_DRAWS_PER_CHUNK = 4_000_000
"""Resample indices drawn at once (bounds memory for large ``n``)."""


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def _as_values(values: Sequence[float | bool], *, name: str = "values") -> np.ndarray:
    if isinstance(values, str):
        raise DataError(f"{name} must be a sequence of numbers, not a string")
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise DataError(f"{name} must be one value per item, got shape {array.shape}")
    if array.size == 0:
        raise DataError(f"{name} is empty: a confidence interval needs at least one item")
    if not np.isfinite(array).all():
        raise DataError(f"{name} holds NaN or infinite values: remove or fix those items")
    return array


def bootstrap_ci(
    values: Sequence[float | bool],
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling items).

    Vectorized with numpy; the same values, ``n_resamples`` and ``seed`` give the same interval.
    """
    _check_confidence(confidence)
    if n_resamples < 1:
        raise ConfigError(f"n_resamples must be >= 1, got {n_resamples}")
    array = _as_values(values)
    n = array.size
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_DRAWS_PER_CHUNK // n)
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        indices = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = array[indices].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for ``successes`` out of ``n`` (e.g. 5/10 -> (0.2366, 0.7634))."""
    _check_confidence(confidence)
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise DataError(f"n must be a positive integer, got {n!r}")
    if isinstance(successes, bool) or not isinstance(successes, int | np.integer):
        raise DataError(f"successes must be an integer, got {successes!r}")
    if not 0 <= successes <= n:
        raise DataError(f"successes must lie in 0..{n}, got {successes}")
    return _wilson(successes / n, n, confidence)


def _wilson(p: float, n: float, confidence: float) -> tuple[float, float]:
    """The Wilson interval of a proportion ``p`` observed on ``n`` (possibly effective) items."""
    z = NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if p <= 0.0 else max(0.0, centre - half)
    high = 1.0 if p >= 1.0 else min(1.0, centre + half)
    return low, high


def cluster_bootstrap_ci(
    values: Sequence[float | bool],
    clusters: Sequence[str],
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``, resampling whole clusters.

    For items that are not independent: prompts that share a topic word, or one template
    filled with several words. Each resample draws as many clusters as there are, with
    replacement, and takes the mean over all items of the drawn clusters; with one item per
    cluster this is :func:`bootstrap_ci`.
    """
    _check_confidence(confidence)
    array = _as_values(values)
    if len(clusters) != array.size:
        raise DataError(f"{len(clusters)} cluster labels for {array.size} values: give one per item")
    _, codes = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    sums = np.bincount(codes, weights=array)
    counts = np.bincount(codes).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, sums.size, size=(n_resamples, sums.size))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_bootstrap_diff(
    a: Sequence[float | bool],
    b: Sequence[float | bool],
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    clusters: Sequence[str] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(a) - mean(b)`` over paired items.

    ``a[i]`` and ``b[i]`` must be the same item under two conditions; items are resampled
    jointly (by ``clusters`` when given: :func:`cluster_bootstrap_ci`). An interval that
    excludes 0 says the conditions differ at that confidence.
    """
    first = _as_values(a, name="a")
    second = _as_values(b, name="b")
    if first.size != second.size:
        raise DataError(
            f"a has {first.size} items but b has {second.size}: pair each item under both "
            "conditions"
        )
    if clusters is not None:
        return cluster_bootstrap_ci(
            first - second, clusters, n_resamples=n_resamples, confidence=confidence, seed=seed
        )
    return bootstrap_ci(first - second, n_resamples=n_resamples, confidence=confidence, seed=seed)


def mean_interval(
    values: Sequence[float | bool],
    *,
    binary: bool,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    clusters: Sequence[str] | None = None,
) -> tuple[float, float]:
    """The interval of the mean of per-item ``values``.

    ``clusters`` (one label per item, e.g. a topic): the items are not independent, and the
    interval is a :func:`cluster_bootstrap_ci`; for a rate it is widened to at least the Wilson
    interval of the rate on as many observations as there are clusters, so 0/48 over 12 topics
    reads (0, 0.24), not (0, 0).

    ``binary``: the values are 0/1 judgements (refused, answered, correct) and the mean is a
    rate: the :func:`wilson_interval`, which stays informative at 0 and 1 (0/20 gives
    (0, 0.16), where the percentile bootstrap gives (0, 0)). Otherwise the
    :func:`bootstrap_ci`.
    """
    array = _as_values(values)
    if clusters is not None:
        low, high = cluster_bootstrap_ci(
            values, clusters, n_resamples=n_resamples, confidence=confidence, seed=seed
        )
        if not binary:
            return low, high
        # A rate at 0 or 1 resamples to a point: widen to the Wilson interval that counts each
        # cluster as one observation (never narrower than the clusters allow).
        wide_low, wide_high = _wilson(float(array.mean()), len(set(clusters)), confidence)
        return min(low, wide_low), max(high, wide_high)
    if not binary:
        return bootstrap_ci(values, n_resamples=n_resamples, confidence=confidence, seed=seed)
    if not np.isin(array, (0.0, 1.0)).all():
        raise DataError("binary values must all be 0 or 1 (False or True): pass binary=False")
    return wilson_interval(int(array.sum()), int(array.size), confidence)


def _paired_counts(first: np.ndarray, second: np.ndarray) -> tuple[float, float, float, float]:
    """The paired 2x2 table: (both 1, first only, second only, neither)."""
    both = float(np.sum((first == 1) & (second == 1)))
    only_first = float(np.sum((first == 1) & (second == 0)))
    only_second = float(np.sum((first == 0) & (second == 1)))
    return both, only_first, only_second, float(first.size) - both - only_first - only_second


def _newcombe(
    both: float, only_first: float, only_second: float, neither: float, confidence: float
) -> tuple[float, float]:
    """Newcombe's square-and-add interval of p1 - p2 from a paired 2x2 table (counts may be
    fractional: an effective sample size). The correlation term is continuity-corrected as in
    Newcombe (1998) and Fagerland, Lydersen and Laake, *Statistical Analysis of Contingency
    Tables*, ch. 8."""
    n = both + only_first + only_second + neither
    first_yes, first_no = both + only_first, only_second + neither
    second_yes, second_no = both + only_second, only_first + neither
    p1, p2 = first_yes / n, second_yes / n
    l1, u1 = _wilson(p1, n, confidence)
    l2, u2 = _wilson(p2, n, confidence)
    psi = 0.0
    if min(first_yes, first_no, second_yes, second_no) > 0:
        cross = both * neither - only_first * only_second
        scale = math.sqrt(first_yes * first_no * second_yes * second_no)
        if cross > n / 2:
            psi = (cross - n / 2) / scale
        elif cross < 0:
            psi = cross / scale
    below = (p1 - l1) ** 2 + (u2 - p2) ** 2 - 2 * psi * (p1 - l1) * (u2 - p2)
    above = (p2 - l2) ** 2 + (u1 - p1) ** 2 - 2 * psi * (p2 - l2) * (u1 - p1)
    estimate = p1 - p2
    return max(-1.0, estimate - math.sqrt(max(below, 0.0))), min(1.0, estimate + math.sqrt(max(above, 0.0)))


def paired_rate_diff_interval(
    a: Sequence[float | bool],
    b: Sequence[float | bool],
    *,
    confidence: float = 0.95,
    clusters: Sequence[str] | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """The interval of ``rate(a) - rate(b)`` for 0/1 judgements of the same items under two
    conditions (steered vs unsteered).

    Newcombe's square-and-add interval from the paired 2x2 table: it stays informative when
    every item flips (0 -> 1 on 20 items gives [0.77, 1.00]), where the paired bootstrap
    resamples to the point [1, 1].

    ``clusters`` (one label per item): the items are not independent. The interval is the
    cluster :func:`paired_bootstrap_diff` widened to at least the Newcombe interval of the same
    rates on as many observations as there are clusters (the table scaled to that size).
    """
    _check_confidence(confidence)
    first = _as_values(a, name="a")
    second = _as_values(b, name="b")
    if first.size != second.size:
        raise DataError(
            f"a has {first.size} items but b has {second.size}: pair each item under both conditions"
        )
    if not (np.isin(first, (0.0, 1.0)).all() and np.isin(second, (0.0, 1.0)).all()):
        raise DataError("paired rates need 0/1 values (False or True) in both a and b")
    counts = _paired_counts(first, second)
    if clusters is None:
        return _newcombe(*counts, confidence)
    low, high = paired_bootstrap_diff(
        a, b, n_resamples=n_resamples, confidence=confidence, seed=seed, clusters=clusters
    )
    scale = len(set(clusters)) / first.size
    both, only_first, only_second, neither = (count * scale for count in counts)
    wide_low, wide_high = _newcombe(both, only_first, only_second, neither, confidence)
    return min(low, wide_low), max(high, wide_high)
