"""Calibration: activation ranges for int8 quantization, from values seen on user data.

``RangeObserver`` is fed the float values of a graph on calibration batches (the frontend runs
the graph; this module only does the statistics) and turns them into a (min, max) per value:

- ``minmax``: the extremes seen;
- ``percentile``: the ``percentile``-th / (100 - ``percentile``)-th percentiles (outliers are
  clipped instead of stretching the scale);
- ``entropy``: the clipping threshold whose 8-bit histogram diverges least (Kullback-Leibler)
  from the full-precision histogram of |x|.

Non-finite values (NaN, +-Inf) are ignored with a warning naming the value; a value with no
finite element at all is a KilnError, as is any range that would give a non-finite scale.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from kiln.ir import KilnError

METHODS = ("minmax", "percentile", "entropy")
SAMPLE_PER_BATCH = 1 << 16
HIST_BINS = 2048

log = logging.getLogger("kiln.calibration")


class RangeObserver:
    """Accumulates what calibration batches show of each value; ``ranges()`` summarizes."""

    def __init__(self, method: str = "minmax", percentile: float = 99.99, seed: int = 0) -> None:
        if method not in METHODS:
            raise KilnError(f"unknown calibration method {method!r}",
                            hint=f"use one of {', '.join(METHODS)}")
        if not 50.0 < percentile <= 100.0:
            raise KilnError(f"calibration percentile {percentile} must be in (50, 100]")
        self.method = method
        self.percentile = percentile
        self._rng = np.random.default_rng(seed)
        self._lo: dict[str, float] = {}
        self._hi: dict[str, float] = {}
        self._samples: dict[str, list[np.ndarray]] = {}
        self._nonfinite: dict[str, int] = {}
        self._seen: dict[str, int] = {}

    def observe(self, value: str, array: np.ndarray) -> None:
        """Record one batch of ``value``."""
        a = np.asarray(array, dtype=np.float32).reshape(-1)
        self._seen[value] = self._seen.get(value, 0) + a.size
        finite = np.isfinite(a)
        if not finite.all():
            self._nonfinite[value] = self._nonfinite.get(value, 0) + int((~finite).sum())
            a = a[finite]
        if a.size == 0:
            return
        self._lo[value] = min(self._lo.get(value, math.inf), float(a.min()))
        self._hi[value] = max(self._hi.get(value, -math.inf), float(a.max()))
        if self.method != "minmax":
            if a.size > SAMPLE_PER_BATCH:
                # With replacement: an unbiased sample for percentiles and histograms, at the
                # cost of SAMPLE_PER_BATCH reads (one without replacement shuffles all of a).
                a = a[self._rng.integers(0, a.size, SAMPLE_PER_BATCH)]
            self._samples.setdefault(value, []).append(a)

    def ranges(self) -> dict[str, tuple[float, float]]:
        """(min, max) per observed value, by the observer's method."""
        for value, count in sorted(self._nonfinite.items()):
            log.warning("calibration: ignored %d non-finite values of %%%s (of %d)", count,
                        value, self._seen[value])
        empty = sorted(v for v in self._seen if v not in self._lo)
        if empty:
            raise KilnError(f"calibration saw no finite value of {', '.join(empty)}",
                            node=empty[0], hint="check the calibration data (NaN/Inf inputs "
                                                "or a layer that overflows on them)")
        out = {}
        for value in self._lo:
            lo, hi = self._lo[value], self._hi[value]
            if self.method == "percentile":
                sample = np.concatenate(self._samples[value])
                lo, hi = (float(v) for v in np.percentile(
                    sample, [100.0 - self.percentile, self.percentile]))
            elif self.method == "entropy":
                t = entropy_threshold(np.concatenate(self._samples[value]),
                                      levels=255 if lo >= 0 else 127)
                lo, hi = max(lo, -t), min(hi, t)
            if not (np.isfinite(lo) and np.isfinite(hi)):
                raise KilnError(f"calibrated range of %{value} is not finite", node=value)
            out[value] = (lo, hi)
        return out


def entropy_threshold(sample: np.ndarray, levels: int = 255, bins: int = HIST_BINS) -> float:
    """The |x| clipping threshold that minimizes KL(P || Q), P the histogram of |x| clipped at
    the threshold (outliers folded into the last bin), Q that histogram merged into ``levels``
    equal buckets and spread back evenly over the bins that were non-empty."""
    mags = np.abs(sample)
    amax = float(mags.max(initial=0.0))
    if amax == 0.0:
        return 0.0
    hist, edges = np.histogram(mags, bins=bins, range=(0.0, amax))
    hist = hist.astype(np.float64)
    best, best_kl = bins, math.inf
    for stop in range(levels, bins + 1, max(1, (bins - levels) // 128)):
        p = hist[:stop].copy()
        p[-1] += hist[stop:].sum()
        # Merge the stop bins into `levels` buckets, then expand each back over its bins.
        bucket = (np.arange(stop) * levels) // stop
        sums = np.bincount(bucket, weights=hist[:stop], minlength=levels)
        nonzero = np.bincount(bucket, weights=(hist[:stop] > 0).astype(float), minlength=levels)
        q = np.where(hist[:stop] > 0, sums[bucket] / np.maximum(nonzero[bucket], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if ps == 0 or qs == 0:
            continue
        p, q = p / ps, q / qs
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best, best_kl = stop, kl
    return float(edges[best])
