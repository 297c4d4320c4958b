"""Streaming TIES/DARE: results independent of the order adapters are listed in (bitwise),
DARE masks keyed by each adapter's content, and equal to the stacked (all-experts-at-once)
formulation, which we rebuild here from ΔW stacks in numpy."""

import jax
import numpy as np
import pytest

from merge_helpers import np_delta, random_adapter
from sst_jax.merge import merge
from sst_jax.merge.dare import expert_mask
from sst_jax.merge.ties import expert_digest

METHODS = [("ties", dict(density=0.4)), ("magnitude_prune", dict(density=0.3)),
           ("dare_linear", dict(density=0.5, seed=3)), ("dare_ties", dict(density=0.5, seed=3))]


def _experts(rng, n=5):
    return [random_adapter(rng, r) for r in (2, 3, 2, 4, 1)[:n]]


@pytest.mark.parametrize("method,hp", METHODS)
def test_same_experts_in_another_order_give_a_bitwise_identical_merge(rng, method, hp):
    ads, weights = _experts(rng), [0.9, 0.4, 1.3, 0.7, 1.1]
    perm = [3, 0, 4, 2, 1]
    a = merge(method, ads, weights, **hp)
    b = merge(method, [ads[i] for i in perm], [weights[i] for i in perm], **hp)
    for key in a.keys:
        np.testing.assert_array_equal(np.asarray(a.delta(key)), np.asarray(b.delta(key)))


def test_safety_adapter_listed_as_a_utility_with_weight_alpha_gives_the_same_dare_merge(rng):
    u1, u2, s = _experts(rng, 3)
    a = merge("dare_ties", [u1, u2], [1.0, 0.5], safety=s, alpha=0.8, density=0.4, seed=1)
    b = merge("dare_ties", [s, u2, u1], [0.8, 0.5, 1.0], density=0.4, seed=1)
    for key in a.keys:
        np.testing.assert_array_equal(np.asarray(a.delta(key)), np.asarray(b.delta(key)))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_another_seed_gives_another_dare_merge(rng, method):
    ads = _experts(rng, 3)
    a, b = (merge(method, ads, density=0.5, seed=s) for s in (0, 1))
    key = a.keys[0]
    assert np.mean(np.asarray(a.delta(key)) != np.asarray(b.delta(key))) > 0.2


def test_dare_mask_depends_on_the_adapter_content_and_module_not_its_position(rng):
    u1, u2 = _experts(rng, 2)
    base, key = jax.random.PRNGKey(0), (0, "q_proj")
    m_u1 = np.asarray(expert_mask(base, key, u1[key], 0.5))
    assert not np.array_equal(m_u1, np.asarray(expert_mask(base, key, u2[key], 0.5)))
    other = (1, "q_proj")  # same shape, other module path
    assert not np.array_equal(m_u1, np.asarray(expert_mask(base, other, u1[other], 0.5)))
    # A one-ulp change of one factor entry is another adapter.
    a = np.asarray(u1[key].a).copy()
    a[0, 0] = np.nextafter(a[0, 0], np.float32(np.inf))
    assert expert_digest(u1[key]) != expert_digest(type(u1[key])(a=a, b=u1[key].b, scale=u1[key].scale))


def _stacked_reference(method, ads, weights, hp):
    """The non-streaming definition on a full (n, out, in) float64 stack, masks from expert_mask."""
    key = (0, "down_proj")
    stack = np.stack([np_delta(a[key]) for a in ads])
    w = np.asarray(weights)[:, None, None]
    if method.startswith("dare"):
        base = jax.random.PRNGKey(hp["seed"])
        masks = np.stack([np.asarray(expert_mask(base, key, a[key], hp["density"])) for a in ads])
        tasks = stack * masks / hp["density"]
    else:
        k = int(hp["density"] * stack[0].size)
        tasks = np.stack([np.where(np.abs(t) >= np.sort(np.abs(t).ravel())[-k], t, 0.0) for t in stack])
    if method in ("magnitude_prune", "dare_linear"):
        return key, np.sum(w * tasks, axis=0)
    sign = np.where(np.sum(w * tasks, axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(tasks) == sign
    return key, np.sum(agree * w * tasks, axis=0) / np.maximum(agree.sum(0), 1)


@pytest.mark.parametrize("method,hp", METHODS)
def test_streaming_equals_the_stacked_definition(rng, method, hp):
    ads, weights = _experts(rng), [0.9, -0.4, 1.3, 0.7, 1.1]
    key, want = _stacked_reference(method, ads, weights, hp)
    got = np.asarray(merge(method, ads, weights, **hp).delta(key), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_adapter_missing_a_module_contributes_nothing_there(rng):
    u1, u2 = _experts(rng, 2)
    key = (0, "q_proj")
    partial = {k: v for k, v in u2.items() if k != key}
    both = merge("dare_ties", [u1, partial], density=0.5, seed=2, modules="union")
    alone = merge("dare_ties", [u1], density=0.5, seed=2)
    np.testing.assert_array_equal(np.asarray(both.delta(key)), np.asarray(alone.delta(key)))
