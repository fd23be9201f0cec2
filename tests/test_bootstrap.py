import numpy as np
import pytest

from chemlit.eval.bootstrap import bootstrap_mae, paired_bootstrap_delta


def test_interval_contains_the_estimate_and_narrows_with_more_molecules():
    rng = np.random.default_rng(1)
    small = bootstrap_mae(np.abs(rng.normal(0, 40, 50)))
    large = bootstrap_mae(np.abs(rng.normal(0, 40, 5000)))
    assert small.low < small.estimate < small.high
    assert (large.high - large.low) < (small.high - small.low) / 5
    # For |N(0, 40)| the true MAE is 40*sqrt(2/pi) = 31.9; the large-sample interval covers it.
    assert large.low < 40 * np.sqrt(2 / np.pi) < large.high


def test_constant_errors_give_a_zero_width_interval():
    ci = bootstrap_mae([5.0] * 20)
    assert (ci.estimate, ci.low, ci.high) == (5.0, 5.0, 5.0)


def test_paired_bootstrap_sees_a_consistent_small_gain_that_unpaired_noise_hides():
    rng = np.random.default_rng(2)
    base = np.abs(rng.normal(0, 50, 400))
    better = np.maximum(base - 2.0, 0.0)          # every molecule 2 °C better (or already at 0)
    delta = paired_bootstrap_delta(better, base)
    assert delta.estimate < 0 and delta.excludes_zero()
    same = paired_bootstrap_delta(base, base.copy())
    assert same.estimate == 0.0 and not same.excludes_zero()


def test_paired_needs_equal_lengths():
    with pytest.raises(ValueError):
        paired_bootstrap_delta([1.0, 2.0], [1.0])
