"""SST-Merge, AGL, Fisher merging and sst_multi on constructed problems with known Fishers."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from merge_helpers import dense_adapter, np_delta, random_adapter
from sst_jax.merge import SstFishers, core_space, merge
from sst_jax.merge.sst import MultiFishers
from sst_jax.models.branches import LowRank

K = (0, "q_proj")
LAM = np.array([10.0, 5.0, 0.1, 0.01])  # planted generalized eigenvalues, n = r² = 4


def _planted(rng, n=4, lam=LAM):
    """F_b SPD, V with Vᵀ F_b V = I (planted eigenvectors) and F_h = F_b V Λ Vᵀ F_b."""
    x = rng.normal(size=(n, n))
    fb = x @ x.T + n * np.eye(n)
    lchol = np.linalg.cholesky(fb)
    y, _ = np.linalg.qr(rng.normal(size=(n, n)))
    v = scipy.linalg.solve_triangular(lchol.T, y, lower=False)
    fh = fb @ v @ np.diag(lam) @ v.T @ fb
    return fh, fb, v


def _problem(rng, r=2):
    """One module: utility U (rank 3), safety S (rank r), planted Fishers in S's core space."""
    u = random_adapter(rng, 3, layers=(0,), modules=("q_proj",))
    s = random_adapter(rng, r, layers=(0,), modules=("q_proj",))
    fh, fb, v = _planted(rng, r * r)
    fishers = SstFishers(kind="core", harmful={K: jnp.asarray(fh, jnp.float32)}, benign={K: jnp.asarray(fb, jnp.float32)},
                         n_harmful=1, n_benign=1)
    return u, s, fishers, fh, fb, v


def test_core_space_is_the_compact_svd_of_the_safety_delta(rng):
    s = random_adapter(rng, 3, layers=(0,), modules=("q_proj",))[K]
    cs = core_space(s)
    np.testing.assert_allclose(cs.sigma, np.linalg.svd(np_delta(s), compute_uv=False)[:3], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(cs.p) @ np.diag(cs.sigma) @ np.asarray(cs.q).T, np_delta(s), atol=1e-4)
    np.testing.assert_allclose(np.asarray(cs.p).T @ np.asarray(cs.p), np.eye(3), atol=1e-5)


def test_sst_keeps_planted_high_lambda_directions_and_removes_costly_ones(rng):
    u, s, fishers, fh, fb, v = _problem(rng)
    res = merge("sst", [u], safety=s, alpha=1.0, fishers=fishers, k=2, damping=0.0)
    cs = core_space(s[K])
    phi = np.diag(np.asarray(cs.sigma, np.float64)).reshape(-1)
    c = v.T @ fb @ phi
    want_phi = v[:, :2] @ c[:2]
    (_, patch) = res.factors[K]
    got_phi = np.asarray(patch.core, np.float64).reshape(-1)
    np.testing.assert_allclose(got_phi, want_phi, rtol=1e-3, atol=1e-4)
    # In the planted eigenbasis: the two high-λ coefficients are kept, the costly ones are 0.
    np.testing.assert_allclose(v.T @ fb @ got_phi, [c[0], c[1], 0.0, 0.0], atol=1e-3 * np.abs(c).max())
    want = np_delta(u[K]) + np.asarray(cs.p) @ want_phi.reshape(2, 2) @ np.asarray(cs.q).T
    np.testing.assert_allclose(res.delta(K), want, rtol=1e-3, atol=1e-3)


def test_sst_with_k_full_dimension_returns_safety_unchanged(rng):
    u, s, fishers, *_ = _problem(rng)
    res = merge("sst", [u], safety=s, alpha=0.8, fishers=fishers, k=4, damping=0.1)
    np.testing.assert_allclose(res.delta(K), np_delta(u[K]) + 0.8 * np_delta(s[K]), rtol=1e-4, atol=1e-4)


def test_sst_with_alpha_zero_returns_the_utility_part(rng):
    u, s, fishers, *_ = _problem(rng)
    u2 = random_adapter(rng, 5, layers=(0,), modules=("q_proj",))
    res = merge("sst", [u, u2], [0.5, 2.0], safety=s, alpha=0.0, fishers=fishers, k=2)
    np.testing.assert_allclose(res.delta(K), 0.5 * np_delta(u[K]) + 2.0 * np_delta(u2[K]), rtol=1e-5, atol=1e-5)


def test_sst_shrinkage_equals_regularized_solve(rng):
    u, s, fishers, fh, fb, _ = _problem(rng)
    res = merge("sst", [u], safety=s, fishers=fishers, projector="shrinkage", mu=0.7, damping=0.0)
    cs = core_space(s[K])
    phi = np.diag(np.asarray(cs.sigma, np.float64)).reshape(-1)
    want = np.linalg.solve(fh + 0.7 * fb, fh @ phi)
    np.testing.assert_allclose(np.asarray(res.factors[K][1].core).reshape(-1), want, rtol=1e-3, atol=1e-4)


def test_sst_lambda_threshold_and_energy_pick_the_planted_count(rng):
    u, s, fishers, *_ = _problem(rng)
    by_threshold = merge("sst", [u], safety=s, fishers=fishers, lambda_threshold=1.0, damping=0.0)
    by_energy = merge("sst", [u], safety=s, fishers=fishers, energy=0.999, damping=0.0)
    assert by_threshold.report["modules"]["model.layers.0.self_attn.q_proj"]["safety"]["k"] == 2
    # Energy on λ_j c_j²: the two tiny eigenvalues carry < 0.1% only for these coefficients.
    k_energy = by_energy.report["modules"]["model.layers.0.self_attn.q_proj"]["safety"]["k"]
    assert 1 <= k_energy <= 4


def test_sst_norm_matched_patch_has_the_safety_norm(rng):
    u, s, fishers, *_ = _problem(rng)
    res = merge("sst", [u], safety=s, alpha=0.5, fishers=fishers, k=1, norm_matched=True)
    patch = np.asarray(res.factors[K][1].delta())
    assert np.linalg.norm(patch) == pytest.approx(0.5 * np.linalg.norm(np_delta(s[K])), rel=1e-4)


def test_sst_diagonal_fisher_keeps_top_ratio_coordinates(rng):
    u, s, _, *_ = _problem(rng)
    fh, fb = np.array([4.0, 1.0, 9.0, 0.5]), np.array([1.0, 2.0, 1.0, 1.0])  # ratios 4, .5, 9, .5
    fishers = SstFishers(kind="diagonal", harmful={K: jnp.asarray(fh)}, benign={K: jnp.asarray(fb)}, n_harmful=1, n_benign=1)
    res = merge("sst", [u], safety=s, fishers=fishers, k=2, damping=0.0)
    cs = core_space(s[K])
    phi = np.diag(np.asarray(cs.sigma)).reshape(-1)
    np.testing.assert_allclose(np.asarray(res.factors[K][1].core).reshape(-1), phi * [1, 0, 1, 0], atol=1e-5)


def test_two_sided_with_full_k_equals_one_sided(rng):
    u, s, fishers, *_ = _problem(rng)
    fu_h, fu_b, _ = _planted(rng, 9, np.geomspace(10, 0.01, 9))
    both = SstFishers(kind="core", harmful=fishers.harmful, benign=fishers.benign, n_harmful=1, n_benign=1,
                      utility_harmful={K: jnp.asarray(fu_h, jnp.float32)}, utility_benign={K: jnp.asarray(fu_b, jnp.float32)})
    one = merge("sst", [u], safety=s, fishers=fishers, k=2)
    two = merge("sst", [u], safety=s, fishers=both, k=2, two_sided=True, k_utility=9)
    np.testing.assert_allclose(two.delta(K), one.delta(K), rtol=1e-3, atol=1e-3)
    # With k_utility < r_U², U loses exactly its reversed-problem tail: the result changes.
    three = merge("sst", [u], safety=s, fishers=both, k=2, two_sided=True, k_utility=3)
    assert np.linalg.norm(np.asarray(three.delta(K) - one.delta(K))) > 1e-2


def test_agl_with_beta_zero_equals_task_arithmetic(rng):
    u, s, fishers, *_ = _problem(rng)
    agl = merge("agl", [u], safety=s, alpha=0.7, fishers=fishers, beta=0.0, k=2)
    ta = merge("task_arithmetic", [u], safety=s, alpha=0.7)
    np.testing.assert_allclose(agl.delta(K), ta.delta(K), rtol=1e-5, atol=1e-5)


def test_agl_removes_utility_component_along_top_safety_eigenvectors(rng):
    u, s, fishers, fh, *_ = _problem(rng)
    res = merge("agl", [u], safety=s, alpha=1.0, fishers=fishers, beta=0.5, k=1)
    cs = core_space(s[K])
    p, q = np.asarray(cs.p, np.float64), np.asarray(cs.q, np.float64)
    w, e = np.linalg.eigh(fh)
    e1 = e[:, -1]
    phi_u = (p.T @ np_delta(u[K]) @ q).reshape(-1)
    removed = p @ (e1 * (e1 @ phi_u)).reshape(2, 2) @ q.T
    want = np_delta(u[K]) - 0.5 * removed + np_delta(s[K])
    np.testing.assert_allclose(res.delta(K), want, rtol=1e-3, atol=1e-3)


def test_fisher_merge_matches_hand_computed_weighted_average():
    t1, t2 = np.array([[1.0, 2.0], [3.0, -4.0]]), np.array([[3.0, 0.0], [-1.0, 4.0]])
    f1, f2 = np.array([[1.0, 0.0], [1.0, 3.0]]), np.array([[1.0, 1.0], [3.0, 1.0]])
    res = merge("fisher", [dense_adapter({K: t1}), dense_adapter({K: t2})], [1.0, 2.0],
                fishers=[{K: jnp.asarray(f1)}, {K: jnp.asarray(f2)}], eps=0.0)
    want = [[(1 * 1 + 2 * 3) / 3, 0.0], [(3 - 6) / 7, (-12 + 8) / 5]]
    np.testing.assert_allclose(res.delta(K), want, rtol=1e-6)


def test_sst_multi_with_full_k_equals_task_arithmetic_of_experts(rng):
    experts = [random_adapter(rng, 2, layers=(0,), modules=("q_proj",)) for _ in range(3)]
    fishers = MultiFishers(fishers=tuple({K + (i,): jnp.asarray(_planted(rng)[1], jnp.float32) for i in range(3)}
                                         for _ in range(3)), n_samples=(1, 1, 1))
    res = merge("sst_multi", experts, [0.5, 1.0, 2.0], fishers=fishers, k=4)
    want = sum(w * np_delta(e[K]) for w, e in zip([0.5, 1.0, 2.0], experts))
    np.testing.assert_allclose(res.delta(K), want, rtol=1e-3, atol=1e-3)
    fewer = merge("sst_multi", experts, [0.5, 1.0, 2.0], fishers=fishers, k=1)
    assert all(st["k"] == 1 for st in fewer.report["modules"]["model.layers.0.self_attn.q_proj"]["experts"].values())


def _kfac_problem(rng, out=4, inp=3):
    s = {K: LowRank(a=jnp.asarray(rng.normal(size=(2, inp)), jnp.float32), b=jnp.asarray(rng.normal(size=(out, 2)), jnp.float32),
                    scale=1.0)}
    u = {K: LowRank(a=jnp.asarray(rng.normal(size=(1, inp)), jnp.float32), b=jnp.asarray(rng.normal(size=(out, 1)), jnp.float32),
                    scale=1.0)}
    return u, s


def test_kfac_sst_keeps_the_top_kronecker_pairs_of_a_planted_problem(rng):
    # A_b = I, G_b = I, A_h = diag(3, 2, 1), G_h = diag(4, 1, .5, .25): λ_ij = γ_j α_i, and
    # v_ij = e_j e_iᵀ, so keeping k pairs keeps the k entries of ΔW_S with the largest γ_jα_i.
    u, s = _kfac_problem(rng)
    a_h, g_h = np.diag([3.0, 2.0, 1.0]), np.diag([4.0, 1.0, 0.5, 0.25])
    fishers = SstFishers(kind="kfac", harmful={K: (jnp.asarray(a_h), jnp.asarray(g_h))},
                         benign={K: (jnp.eye(3), jnp.eye(4))}, n_harmful=1, n_benign=1)
    res = merge("sst", [u], safety=s, fishers=fishers, k=4, damping=0.0)
    lam = np.outer(np.diag(g_h), np.diag(a_h))  # (out, in); top 4: 12, 8, 4 (γ₀α₂), 3 (γ₁α₀)
    keep = lam >= 3.0
    assert keep.sum() == 4
    want = np_delta(u[K]) + np.where(keep, np_delta(s[K]), 0.0)
    np.testing.assert_allclose(res.delta(K), want, rtol=1e-4, atol=1e-5)


def test_kfac_sst_with_all_pairs_returns_safety_unchanged(rng):
    u, s = _kfac_problem(rng)
    x, y = rng.normal(size=(3, 3)), rng.normal(size=(4, 4))
    fishers = SstFishers(kind="kfac", harmful={K: (jnp.asarray(x @ x.T), jnp.asarray(y @ y.T))},
                         benign={K: (jnp.asarray(x.T @ x + np.eye(3)), jnp.asarray(y.T @ y + np.eye(4)))},
                         n_harmful=1, n_benign=1)
    res = merge("sst", [u], safety=s, alpha=0.6, fishers=fishers, k=12, damping=0.05)
    np.testing.assert_allclose(res.delta(K), np_delta(u[K]) + 0.6 * np_delta(s[K]), rtol=1e-3, atol=1e-4)


def test_sst_on_top_of_a_ties_utility_part_adds_the_projected_safety_to_it(rng):
    u, s, fishers, *_ = _problem(rng)
    u2 = random_adapter(rng, 3, layers=(0,), modules=("q_proj",))
    util = merge("ties", [u, u2], density=0.5)
    full = merge("sst", [u, u2], safety=s, alpha=0.5, fishers=fishers, k=4, utility=util)
    np.testing.assert_allclose(full.delta(K), np.asarray(util.delta(K)) + 0.5 * np_delta(s[K]), rtol=1e-4, atol=1e-4)
    assert full.report["hparams"]["utility_method"] == "ties"


def test_sst_multi_batched_solve_equals_per_module_projection(rng):
    """Batched GEVPs (mixed ranks, several modules) give each module's unbatched projection."""
    from sst_jax.merge.sst import project_core

    ranks, layers, modules = (2, 3, 2), (0, 1), ("q_proj", "v_proj")
    experts = [random_adapter(rng, r, layers=layers, modules=modules) for r in ranks]
    fishers = MultiFishers(fishers=tuple({(l, m, i): jnp.asarray(_planted(rng, r * r, rng.uniform(0.01, 10, r * r))[1],
                                                                jnp.float32)
                                          for l in layers for m in modules for i, r in enumerate(ranks)}
                                         for _ in ranks), n_samples=(1, 1, 1))
    weights = [0.5, 1.0, 2.0]
    res = merge("sst_multi", experts, weights, fishers=fishers, damping=0.1)
    for key in res.keys:
        want = 0.0
        for i, (e, w) in enumerate(zip(experts, weights)):
            s = core_space(e[key])
            own = fishers.fishers[i][key + (i,)]
            others = sum(fishers.fishers[j][key + (i,)] for j in range(3) if j != i)
            phi, _ = project_core(s.phi, own, others, damping=0.1)
            want = want + np_delta(s.branch(phi.reshape(s.r, s.r), scale=w))
        np.testing.assert_allclose(res.delta(key), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_sst_batched_solve_equals_per_module_projection(rng):
    """SST over several modules (batched GEVPs) gives each module's unbatched projection."""
    from sst_jax.merge.sst import project_core

    layers, modules = (0, 1), ("q_proj", "v_proj")
    u = random_adapter(rng, 3, layers=layers, modules=modules)
    s = random_adapter(rng, 2, layers=layers, modules=modules)
    keys = [(l, m) for l in layers for m in modules]
    planted = {key: _planted(rng) for key in keys}
    fishers = SstFishers(kind="core", harmful={key: jnp.asarray(p[0], jnp.float32) for key, p in planted.items()},
                         benign={key: jnp.asarray(p[1], jnp.float32) for key, p in planted.items()},
                         n_harmful=1, n_benign=1)
    res = merge("sst", [u], safety=s, alpha=0.7, fishers=fishers, k=2)
    for key in keys:
        c = core_space(s[key])
        phi, _ = project_core(c.phi, fishers.harmful[key], fishers.benign[key], damping=0.1, k=2)
        want = np_delta(u[key]) + np_delta(c.branch(phi.reshape(c.r, c.r), scale=0.7))
        np.testing.assert_allclose(res.delta(key), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
