"""Safety tax edge cases, intervals against scipy, Pareto front and hypervolume by hand."""

import math

import numpy as np
import pytest
from scipy import stats

from sst_jax.eval.metrics import (bootstrap_interval, composite_score, distance_to_ideal,
                                  hypervolume_2d, paired_comparison, pareto_front, proportion,
                                  safety_tax, wilson_interval)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (37, 120), (1, 1)])
def test_wilson_matches_scipy(k, n):
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    np.testing.assert_allclose(wilson_interval(k, n), (ref.low, ref.high), atol=1e-12)


def test_proportion_estimate():
    est = proportion([True, False, True, True])
    assert (est.value, est.n, est.method) == (0.75, 4, "wilson")
    assert est.low < 0.75 < est.high


def test_bootstrap_interval_is_seeded_and_close_to_scipy():
    x = np.random.default_rng(1).normal(size=200)
    a = bootstrap_interval(x, seed=3, n_resamples=4000)
    b = bootstrap_interval(x, seed=3, n_resamples=4000)
    assert (a.low, a.high) == (b.low, b.high)
    ref = stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile",
                          random_state=0).confidence_interval
    assert a.low == pytest.approx(ref.low, abs=0.03) and a.high == pytest.approx(ref.high, abs=0.03)


def test_safety_tax_regular_case():
    # U 0.80 -> 0.72 (10% relative loss); S 0.20 -> 0.60 (+200% relative gain)
    t = safety_tax(0.20, 0.60, 0.80, 0.72)
    assert t.relative == pytest.approx(0.10 / 2.0)
    assert t.absolute == pytest.approx(0.08 / 0.40)
    assert t.reason is None


def test_safety_tax_no_utility_loss_is_zero():
    t = safety_tax(0.2, 0.6, 0.8, 0.85)
    assert (t.relative, t.absolute) == (0.0, 0.0)
    assert safety_tax(0.6, 0.2, 0.8, 0.8).absolute == 0.0  # even with a safety loss


def test_safety_tax_no_safety_gain_with_loss_is_inf():
    t = safety_tax(0.5, 0.5, 0.8, 0.7)
    assert t.relative == math.inf and t.absolute == math.inf and "no safety gain" in t.reason


def test_safety_tax_relative_undefined_when_base_never_refuses():
    t = safety_tax(0.0, 0.5, 0.8, 0.6)
    assert t.relative is None and t.absolute == pytest.approx(0.4) and "safety before is 0" in t.reason


def test_composite_and_distance():
    assert composite_score(0.5, 0.5, 0.25) == pytest.approx(0.4 * 0.5 + 0.4 * 0.5 - 0.2 * 0.25)
    assert composite_score(1.0, 1.0, math.inf) == pytest.approx(0.6)
    assert composite_score(1.0, 1.0, None) == pytest.approx(0.6)
    assert distance_to_ideal(0.7, 0.6) == pytest.approx(0.5)


def test_pareto_front_hand_example():
    pts = [(0.1, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.1), (0.5, 0.5), (0.2, 0.8), (0.1, 0.8)]
    # (0.4,0.4) is dominated by (0.5,0.5); (0.1,0.8) by (0.1,0.9); duplicates of a front point stay
    assert pareto_front(pts) == [0, 5, 1, 4, 3]


def test_hypervolume_hand_examples():
    assert hypervolume_2d([(1.0, 0.5), (0.5, 1.0)]) == pytest.approx(0.75)
    assert hypervolume_2d([(0.5, 0.5)]) == pytest.approx(0.25)
    # a dominated point adds nothing; a point on the reference axis adds nothing
    assert hypervolume_2d([(1.0, 0.5), (0.5, 1.0), (0.4, 0.4), (0.0, 1.0)]) == pytest.approx(0.75)
    # staircase: (0.2,0.9),(0.6,0.6),(0.9,0.2) = 0.9*0.2 + 0.6*0.4 + 0.2*0.3
    assert hypervolume_2d([(0.2, 0.9), (0.6, 0.6), (0.9, 0.2)]) == pytest.approx(0.48)
    assert hypervolume_2d([(0.5, 0.5)], reference=(0.25, 0.25)) == pytest.approx(0.0625)


def test_paired_comparison_mcnemar_exact():
    # 10 items: A right and B wrong on 6, B right and A wrong on 1, 3 ties
    a = [1] * 6 + [0] + [1, 1, 0]
    b = [0] * 6 + [1] + [1, 1, 0]
    cmp = paired_comparison(a, b, seed=0)
    assert (cmp.a_only, cmp.b_only, cmp.n) == (6, 1, 10)
    # exact two-sided binomial on 7 discordant pairs: 2 * P(X <= 1 | 7, 0.5) = 16/128
    assert cmp.mcnemar_p == pytest.approx(16 / 128)
    assert cmp.difference.value == pytest.approx(0.5)
    assert cmp.difference.low <= 0.5 <= cmp.difference.high
