"""Task arithmetic, TIES, magnitude pruning and DARE against hand-computed fixtures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from merge_helpers import dense_adapter, np_delta, random_adapter
from sst_jax.merge import merge
from sst_jax.merge.dare import expert_mask

K = (0, "q_proj")
T1 = np.array([[3.0, -1.0, 0.5], [-2.0, 4.0, 1.0]])
T2 = np.array([[-1.0, -2.0, 2.0], [1.0, 3.0, -0.2]])


def test_task_arithmetic_equals_weighted_sum_of_deltas_exactly(rng):
    u1, u2, s = random_adapter(rng, 2), random_adapter(rng, 5), random_adapter(rng, 3)
    res = merge("task_arithmetic", [u1, u2], [0.7, -0.3], safety=s, alpha=1.5)
    for key in u1:
        want = 0.7 * np_delta(u1[key]) - 0.3 * np_delta(u2[key]) + 1.5 * np_delta(s[key])
        np.testing.assert_allclose(np.asarray(res.delta(key), np.float64), want, rtol=1e-5, atol=1e-5)
        assert res.rank(key) == 2 + 5 + 3


def test_ties_matches_hand_computed_fixture():
    # density 0.5 keeps 3 of 6 entries: trim1 = [[3,0,0],[-2,4,0]], trim2 = [[0,-2,2],[0,3,0]].
    # Weighted sum (w = 1, 0.5) = [[3,-1,1],[-2,5.5,0]] elects signs [[+,-,+],[-,+,+]];
    # entry (1,1): both agree, (4 + 0.5·3) / 2 = 2.75.
    res = merge("ties", [dense_adapter({K: T1}), dense_adapter({K: T2})], [1.0, 0.5], density=0.5)
    np.testing.assert_allclose(res.delta(K), [[3.0, -1.0, 1.0], [-2.0, 2.75, 0.0]], atol=1e-6)


def test_ties_sign_election_variants_differ_where_expected():
    # One entry: t1 = 1, t2 = -1.5 with weights (1, 0.5): weighted sum +0.25 elects +,
    # the unweighted sum -0.5 elects -; frequency ties 0 and elects +.
    a, b = dense_adapter({K: np.array([[1.0]])}), dense_adapter({K: np.array([[-1.5]])})
    got = {m: float(merge("ties", [a, b], [1.0, 0.5], density=1.0, majority_sign=m).delta(K)[0, 0])
           for m in ("weighted", "total", "frequency")}
    assert got == pytest.approx({"weighted": 1.0, "total": -0.75, "frequency": 1.0})


def test_magnitude_prune_matches_hand_computed_fixture():
    res = merge("magnitude_prune", [dense_adapter({K: T1}), dense_adapter({K: T2})], [1.0, 0.5], density=0.5)
    np.testing.assert_allclose(res.delta(K), [[3.0, -1.0, 1.0], [-2.0, 5.5, 0.0]], atol=1e-6)


def test_dare_linear_matches_masks_rescaled_by_inverse_density():
    adapters = [dense_adapter({K: T1}), dense_adapter({K: T2})]
    res = merge("dare_linear", adapters, [1.0, 0.5], density=0.25, seed=3)
    base = jax.random.PRNGKey(3)
    # Each adapter's mask is keyed by its own factors at K (not by its list position).
    m1, m2 = (np.asarray(expert_mask(base, K, a[K], 0.25)) for a in adapters)
    np.testing.assert_allclose(res.delta(K), (m1 * T1 + 0.5 * m2 * T2) / 0.25, atol=1e-6)


def test_dare_ties_matches_hand_computed_fixture_with_its_masks():
    adapters = [dense_adapter({K: T1}), dense_adapter({K: T2})]
    res = merge("dare_ties", adapters, [1.0, 1.0], density=0.5, seed=1)
    base = jax.random.PRNGKey(1)
    d1, d2 = (np.asarray(expert_mask(base, K, a[K], 0.5)) * t / 0.5 for a, t in zip(adapters, (T1, T2)))
    sign = np.where(d1 + d2 >= 0, 1.0, -1.0)
    agree1, agree2 = np.sign(d1) == sign, np.sign(d2) == sign
    want = (agree1 * d1 + agree2 * d2) / np.maximum(agree1 + agree2, 1)
    np.testing.assert_allclose(res.delta(K), want, atol=1e-6)


def _reordered(adapter):
    return {k: adapter[k] for k in sorted(adapter, reverse=True)}


def test_dare_same_seed_same_merge_regardless_of_module_order(rng):
    u1, u2 = random_adapter(rng, 2), random_adapter(rng, 3)
    a = merge("dare_ties", [u1, u2], density=0.3, seed=7)
    b = merge("dare_ties", [_reordered(u1), _reordered(u2)], density=0.3, seed=7)
    # A module's mask also does not depend on which other modules are merged.
    c = merge("dare_ties", [{K: u1[K]}, {K: u2[K]}], density=0.3, seed=7)
    for key in u1:
        np.testing.assert_array_equal(a.delta(key), b.delta(key))
    np.testing.assert_array_equal(a.delta(K), c.delta(K))


def test_dare_different_seed_gives_different_mask(rng):
    u = [random_adapter(rng, 2)]
    a, b = (merge("dare_linear", u, density=0.5, seed=s).delta(K) for s in (0, 1))
    assert np.mean((np.asarray(a) != 0) != (np.asarray(b) != 0)) > 0.2


def test_dare_expected_value_is_the_undropped_delta(rng):
    u = [random_adapter(rng, 2, layers=(0,), modules=("q_proj",))]
    mean = np.mean([np.asarray(merge("dare_linear", u, density=0.5, key=jax.random.PRNGKey(s)).delta(K))
                    for s in range(400)], axis=0)
    want = np_delta(u[0][K])
    # Each entry's estimator has std |x|·√((1-p)/p / 400) = |x|/20; allow 4σ.
    assert np.all(np.abs(mean - want) <= 4 * np.abs(want) / 20 + 1e-5)


def test_magnitude_trim_keeps_top_k_by_numpy_sort():
    from sst_jax.merge.ties import magnitude_trim

    x = np.random.default_rng(5).normal(size=(31, 17)).astype(np.float32)
    k = int(0.3 * x.size)
    expect = np.where(np.abs(x) >= np.sort(np.abs(x).ravel())[::-1][k - 1], x, 0.0)
    got = np.asarray(magnitude_trim(jnp.asarray(x), 0.3))
    np.testing.assert_array_equal(got, expect)
    assert np.count_nonzero(got) == k


def test_magnitude_trim_keeps_all_entries_tied_at_the_threshold():
    from sst_jax.merge.ties import magnitude_trim

    x = jnp.asarray([[3.0, -2.0, 2.0, 1.0], [2.0, 0.5, -0.0, -4.0]])
    # k = ⌊0.4·8⌋ = 3: the 3rd largest |x| is 2, shared by three entries; all are kept.
    expect = np.array([[3.0, -2.0, 2.0, 0.0], [2.0, 0.0, 0.0, -4.0]])
    np.testing.assert_array_equal(np.asarray(magnitude_trim(x, 0.4)), expect)
