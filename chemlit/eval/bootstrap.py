"""Confidence intervals for MAE, and paired comparisons of two models on the same molecules.

The work we continue declared a result from 50 molecules whose difference was not significant; so
every MAE here comes with a 95% percentile-bootstrap interval, and "model A beats model B" is a
paired bootstrap of the per-molecule error difference (resampling molecules, keeping pairs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0

    def __str__(self) -> str:
        return f"{self.estimate:.1f} [{self.low:.1f}, {self.high:.1f}]"


def _percentiles(samples: np.ndarray, estimate: float, confidence: float) -> Interval:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return Interval(float(estimate), float(low), float(high))


def bootstrap_mae(abs_errors, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> Interval:
    """MAE with a percentile-bootstrap interval over molecules. ``abs_errors``: (N,) |pred - true|."""
    errors = np.asarray(abs_errors, dtype=float)
    if errors.size == 0:
        raise ValueError("no errors to bootstrap")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, errors.size, size=(n_resamples, errors.size))  # (R, N)
    return _percentiles(errors[idx].mean(axis=1), errors.mean(), confidence)


def paired_bootstrap_delta(abs_errors_a, abs_errors_b, n_resamples: int = 2000, confidence: float = 0.95,
                           seed: int = 0) -> Interval:
    """MAE(a) - MAE(b) on the same molecules, resampling molecules with their pair of errors.

    Negative means a is better. If the interval excludes zero, the difference is significant at
    the chosen confidence.
    """
    a, b = np.asarray(abs_errors_a, dtype=float), np.asarray(abs_errors_b, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired errors need the same non-zero length, got {a.shape} and {b.shape}")
    diff = a - b                                                          # (N,)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(n_resamples, diff.size))        # (R, N)
    return _percentiles(diff[idx].mean(axis=1), diff.mean(), confidence)
