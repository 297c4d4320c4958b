"""SST-Guard: the input-side projector against scipy/numpy in float64, its optimality against a
generic KKT solve, the sample-matrix form against the dense one, and the merge on the tiny
decoder (harmful outputs kept, benign change within the bound, exact PEFT export)."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from merge_helpers import SHAPES, np_delta, random_adapter
from sst_jax.merge import SstFishers, merge, validate_inputs
from sst_jax.merge.sst_guard import (GuardMoments, dense_guard, guard_matrix, guard_moments, input_moments, input_samples,
                                     sample_guard)
from sst_jax.errors import NumericalError
from sst_jax.fisher import kfac_factors
from sst_jax.models import LowRank, forward, load_model

DAMP = 0.1


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _moments(rng, n, n_h=None, n_b=None):
    """K_h (rank n_h when given) and K_b as mean outer products of random inputs; K_b,δ."""
    xh = rng.normal(size=(n_h or 3 * n, n)) * rng.uniform(0.2, 3.0, size=n)
    xb = rng.normal(size=(n_b or 3 * n, n)) * rng.uniform(0.2, 3.0, size=n)
    kh, kb = xh.T @ xh / len(xh), xb.T @ xb / len(xb)
    kbd = kb + DAMP * np.trace(kb) / n * np.eye(n)
    return kh, kb, kbd


def test_guard_eigenpairs_match_scipy_and_are_kb_orthonormal(x64, rng):
    kh, kb, kbd = _moments(rng, 12)
    g = dense_guard(jnp.asarray(kh), jnp.asarray(kb), damping=DAMP)
    w_ref = scipy.linalg.eigh(kh, kbd, eigvals_only=True)[::-1]
    np.testing.assert_allclose(g.eigvals, w_ref, rtol=1e-10)
    u = np.asarray(g.u)
    np.testing.assert_allclose(u.T @ kbd @ u, np.eye(12), atol=1e-10)
    np.testing.assert_allclose(np.asarray(g.ku), kbd @ u, atol=1e-12)


def test_guarded_update_kills_the_top_k_directions_and_keeps_the_rest(x64, rng):
    kh, kb, kbd = _moments(rng, 12)
    w, u = scipy.linalg.eigh(kh, kbd)
    w, u = w[::-1], u[:, ::-1]  # scipy's own eigenvectors, descending
    dt = rng.normal(size=(7, 12))
    k = 5
    got = np.asarray(guard_matrix(jnp.asarray(dt), dense_guard(jnp.asarray(kh), jnp.asarray(kb), damping=DAMP), k))
    np.testing.assert_allclose(got @ kbd @ u[:, :k], 0.0, atol=1e-10)
    np.testing.assert_allclose(got @ kbd @ u[:, k:], dt @ kbd @ u[:, k:], atol=1e-10)


def test_closed_form_minimises_benign_change_under_the_constraint(x64, rng):
    """min tr(D K_b,δ Dᵀ) s.t. (ΔT + D) K_b,δ U_k = 0, solved row by row from the KKT system
    [[2K, C], [Cᵀ, 0]] [d; ν] = [0; −Cᵀt] (C = K_b,δ U_k from scipy) by least squares."""
    n, k = 10, 4
    kh, kb, kbd = _moments(rng, n)
    u = scipy.linalg.eigh(kh, kbd)[1][:, ::-1][:, :k]
    c = kbd @ u
    dt = rng.normal(size=(6, n))
    kkt = np.block([[2 * kbd, c], [c.T, np.zeros((k, k))]])
    want = np.stack([np.linalg.lstsq(kkt, np.concatenate([np.zeros(n), -c.T @ t]), rcond=None)[0][:n] for t in dt])
    got = np.asarray(guard_matrix(jnp.asarray(dt), dense_guard(jnp.asarray(kh), jnp.asarray(kb), damping=DAMP), k)) - dt
    np.testing.assert_allclose(got, want, atol=1e-10)
    # And a feasible competitor (D + anything killing C) costs more.
    null = scipy.linalg.null_space(c.T)
    other = want + rng.normal(size=(6, null.shape[1])) @ null.T * 0.1
    cost = lambda d: np.trace(d @ kbd @ d.T)  # noqa: E731
    assert cost(other) > cost(want) * (1 + 1e-6)


def test_harmful_energy_after_the_guard_is_the_unkept_tail(x64, rng):
    n, k = 12, 4
    kh, kb, kbd = _moments(rng, n)
    w, u = scipy.linalg.eigh(kh, kbd)
    w, u = w[::-1], u[:, ::-1]
    dt = rng.normal(size=(5, n))
    terms = w * np.sum((dt @ kbd @ u) ** 2, axis=0)  # μᵢ‖ΔT K_b,δ uᵢ‖², by hand
    np.testing.assert_allclose(np.trace(dt @ kh @ dt.T), terms.sum(), rtol=1e-10)
    got = np.asarray(guard_matrix(jnp.asarray(dt), dense_guard(jnp.asarray(kh), jnp.asarray(kb), damping=DAMP), k))
    np.testing.assert_allclose(np.trace(got @ kh @ got.T), terms[k:].sum(), rtol=1e-9)
    assert terms[k:].sum() < terms.sum()


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_sample_matrix_form_equals_the_dense_form(rng, dtype, tol):
    n_in, n_h, n_b, k = 40, 5, 12, 4  # in > n_h + n_b: the sample form solves a 17×17 problem
    xh = rng.normal(size=(n_h, n_in)) / np.sqrt(n_h)
    xb = (rng.normal(size=(n_b, n_in)) * rng.uniform(0.3, 2.0, size=n_in)) / np.sqrt(n_b)
    a = rng.normal(size=(3, n_in))
    with jax.enable_x64(dtype == np.float64):
        xh_, xb_ = jnp.asarray(xh, dtype), jnp.asarray(xb, dtype)
        dense = dense_guard(xh_.T @ xh_, xb_.T @ xb_, damping=DAMP)
        samp = sample_guard(xh_, xb_, damping=DAMP)
        assert samp.u.shape == (n_in, n_h + n_b)
        np.testing.assert_allclose(samp.eigvals[:n_h], dense.eigvals[:n_h], rtol=tol * 10, atol=tol)
        ref = np.asarray(guard_matrix(jnp.asarray(a, dtype), dense, k), np.float64)
        got = np.asarray(guard_matrix(jnp.asarray(a, dtype), samp, k), np.float64)
    np.testing.assert_allclose(got, ref, atol=tol * np.abs(ref).max())
    assert np.abs(got - a).max() > 1e-2  # the guard did something


def test_sample_form_float32_solves_a_spiky_kb_that_n_eps_rejected(rng):
    """The shape of the study's seed-2 exp2 failure (N = 4): float32 K_b whose trace sits almost
    all in one input direction, in a row space of m = 1000 > √(δ/eps) ≈ 920. Damping 0.1 floors its pivot²
    ratio at δ/(in+δ) ≈ 9.8e-5, below m·eps = 1.2e-4, the old threshold (checked here). The guard
    is solved and agrees with the dense float64 GEVP (scipy) to float32 accuracy."""
    n_in = 1024
    v = rng.normal(size=n_in)
    v /= np.linalg.norm(v)
    xh = rng.normal(size=(300, n_in))
    xh[0] = 30 * v  # puts the spike on the first row-space coordinate, where Cholesky meets it first
    xb = np.outer(rng.uniform(0.5, 1.5, 700), v) * 100 + 0.3 * rng.normal(size=(700, n_in))
    xh32, xb32 = jnp.asarray(xh, jnp.float32), jnp.asarray(xb, jnp.float32)
    eps = float(np.finfo(np.float32).eps)
    with pytest.raises(NumericalError, match=r"min/max pivot² = 9.8\de-05 ≤ rcond 0.000119"):
        with mock.patch("sst_jax.merge.sst_guard.default_rcond", lambda m, *a, **kw: m * eps):
            sample_guard(xh32, xb32, damping=DAMP)
    g = sample_guard(xh32, xb32, damping=DAMP)
    kh, kb = xh.T @ xh, xb.T @ xb
    kbd = kb + DAMP * np.trace(kb) / n_in * np.eye(n_in)
    w_ref = scipy.linalg.eigh(kh, kbd, eigvals_only=True)[::-1][:1000]  # the rest are 0 (rank 1000)
    np.testing.assert_allclose(g.eigvals, w_ref, atol=2e-6 * w_ref[0])  # measured 1.9e-7
    u = np.asarray(g.u, np.float64)
    np.testing.assert_allclose(u.T @ kbd @ u, np.eye(1000), atol=3e-5)  # measured 3.2e-6


K = (0, "q_proj")


def _planted_merge_inputs(rng):
    u1 = random_adapter(rng, 3, layers=(0,), modules=("q_proj", "down_proj"))
    u2 = random_adapter(rng, 2, layers=(0,), modules=("q_proj", "down_proj"))
    s = random_adapter(rng, 2, layers=(0,), modules=("q_proj", "down_proj"))
    mom = {}
    for key in u1:
        n = SHAPES[key[1]][1]
        kh, kb, _ = _moments(rng, n)
        mom[key] = (kh, kb)
    fishers = GuardMoments(harmful={k: jnp.asarray(v[0], jnp.float32) for k, v in mom.items()},
                           benign={k: jnp.asarray(v[1], jnp.float32) for k, v in mom.items()}, n_harmful=1, n_benign=1)
    return u1, u2, s, mom, fishers


def _np_projector(kh, kb, k):
    kbd = kb + DAMP * np.trace(kb) / len(kb) * np.eye(len(kb))
    u = scipy.linalg.eigh(kh, kbd)[1][:, ::-1][:, :k]
    return np.eye(len(kb)) - kbd @ u @ u.T


def test_guard_on_top_of_ties_guards_the_dense_utility(rng):
    u1, u2, s, mom, fishers = _planted_merge_inputs(rng)
    ties = merge("ties", [u1, u2], density=0.5)
    res = merge("sst_guard", [u1, u2], safety=s, alpha=0.7, fishers=fishers, k=2, utility=ties)
    for key, (kh, kb) in mom.items():
        want = np.asarray(ties.delta(key), np.float64) @ _np_projector(kh, kb, 2) + 0.7 * np_delta(s[key])
        np.testing.assert_allclose(res.delta(key), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert key in res.dense and res.report["hparams"]["utility_method"] == "ties"


def test_guard_on_top_of_task_arithmetic_keeps_exact_factors_of_unchanged_rank(rng):
    u1, u2, s, mom, fishers = _planted_merge_inputs(rng)
    ta = merge("task_arithmetic", [u1, u2], [0.5, 1.5])
    res = merge("sst_guard", [u1, u2], [0.5, 1.5], safety=s, alpha=1.0, fishers=fishers, k=3, utility=ta)
    assert res.exact
    for key, (kh, kb) in mom.items():
        assert res.rank(key) == ta.rank(key) + 2
        p = _np_projector(kh, kb, 3)
        # The same projector guards every expert: Σ wⱼ ΔTⱼ P.
        want = (0.5 * np_delta(u1[key]) + 1.5 * np_delta(u2[key])) @ p + np_delta(s[key])
        np.testing.assert_allclose(res.delta(key), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # Default utility (Σ wⱼΔTⱼ from the inputs) is the same merge.
    default = merge("sst_guard", [u1, u2], [0.5, 1.5], safety=s, alpha=1.0, fishers=fishers, k=3)
    np.testing.assert_allclose(default.delta(K), res.delta(K), rtol=1e-5, atol=1e-5)


def test_energy_rule_removes_the_requested_share_of_harmful_energy(rng):
    u1, u2, s, mom, fishers = _planted_merge_inputs(rng)
    res = merge("sst_guard", [u1, u2], safety=s, fishers=fishers, energy=0.9)
    for key, (kh, kb) in mom.items():
        st = res.report["modules"][f"model.layers.0.{'self_attn' if key[1] == 'q_proj' else 'mlp'}.{key[1]}"]["guard"]
        assert st["harmful_energy_after"] <= 0.1 * st["harmful_energy"] * (1 + 1e-4)
        # The report's energies are the harmful-input energy of the update, by hand.
        dt = np_delta(u1[key]) + np_delta(u2[key])
        np.testing.assert_allclose(st["harmful_energy"], np.trace(dt @ kh @ dt.T), rtol=1e-3)
        got = np.asarray(res.delta(key), np.float64) - np_delta(s[key])
        np.testing.assert_allclose(st["harmful_energy_after"], np.trace(got @ kh @ got.T), rtol=1e-2,
                                   atol=1e-4 * st["harmful_energy"])


def test_sst_safety_part_is_the_sst_methods_projected_patch(rng):
    u1, u2, s, mom, fishers = _planted_merge_inputs(rng)
    sst_f = SstFishers(kind="core", harmful={}, benign={}, n_harmful=1, n_benign=1)
    for key in s:
        x = rng.normal(size=(4, 4))
        sst_f.harmful[key] = jnp.asarray(x @ x.T, jnp.float32)
        sst_f.benign[key] = jnp.asarray(x.T @ x + np.eye(4), jnp.float32)
    both = GuardMoments(harmful=fishers.harmful, benign=fishers.benign, sst=sst_f)
    res = merge("sst_guard", [u1, u2], safety=s, alpha=0.8, fishers=both, k=2, safety_part="sst", sst_k=2)
    plain = merge("sst_guard", [u1, u2], safety=s, alpha=0.8, fishers=both, k=2)
    ref = merge("sst", [u1, u2], safety=s, alpha=0.8, fishers=sst_f, k=2)
    for key in s:
        patch = np.asarray(ref.delta(key)) - np_delta(u1[key]) - np_delta(u2[key])
        np.testing.assert_allclose(np.asarray(res.delta(key)) - np.asarray(plain.delta(key)) + 0.8 * np_delta(s[key]),
                                   patch, rtol=1e-3, atol=1e-4 * np.abs(patch).max())


# ----------------------------------------------------------------------------- on the tiny decoder

TARGETS = ("q_proj", "v_proj")
HARM, BENIGN = np.arange(10, 16), np.arange(40, 50)  # disjoint token sets


@pytest.fixture(scope="module")
def model():
    return load_model("tiny", seed=0, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64)


def _adapter(model, rng, r, std, layers=(0,)):
    out = {}
    for layer, m in ((layer, m) for layer in layers for m in TARGETS):
        o, i = model.config.module_shape(m)
        out[(layer, m)] = LowRank(a=jnp.asarray(rng.normal(size=(r, i)) / np.sqrt(i), jnp.float32),
                              b=jnp.asarray(rng.normal(size=(o, r)) * std, jnp.float32), scale=2.0)
    return out


def _batch(rng, vocab, n, t=12):
    ids = rng.choice(vocab, size=(n, t)).astype(np.int32)
    loss = np.zeros((n, t), np.int32)
    loss[:, t // 2:] = 1
    return {"input_ids": ids, "attention_mask": np.ones((n, t), np.int32), "loss_mask": loss}


@pytest.fixture(scope="module")
def planted(model):
    """Harmful and benign prompts use disjoint tokens, so at layer 0 their q/v inputs span
    different 6- and 10-dimensional subspaces of ℝ³²: the guard with k = 6 can shield S
    exactly on harmful inputs."""
    rng = np.random.default_rng(5)
    u, s = _adapter(model, rng, 4, 1.0), _adapter(model, rng, 2, 0.5)
    data = {"harmful": _batch(rng, HARM, 6), "benign": _batch(rng, BENIGN, 8)}
    test = {"harmful": _batch(rng, HARM, 4), "benign": _batch(rng, BENIGN, 4)}
    guard = merge("sst_guard", [u], safety=s, alpha=1.0, model=model, data=data, k=len(HARM), form="dense")
    ta = merge("task_arithmetic", [u], safety=s, alpha=1.0)
    return u, s, data, test, guard, ta


def _logits(model, branches, batch):
    return np.asarray(forward(model.config, model.params, batch["input_ids"], batch["attention_mask"],
                              branches=branches), np.float64)


def test_guard_keeps_safety_behaviour_on_harmful_inputs_where_task_arithmetic_does_not(model, planted):
    u, s, _, test, guard, ta = planted
    keep = _logits(model, {k: (lr,) for k, lr in s.items()}, test["harmful"])  # θ₀ + S
    dev_ta = np.abs(_logits(model, ta.to_branches(), test["harmful"]) - keep).max()
    dev_guard = np.abs(_logits(model, guard.to_branches(), test["harmful"]) - keep).max()
    assert dev_ta > 0.05
    assert dev_guard < 1e-3 * dev_ta  # harmful inputs lie in the span of the k guarded directions


def test_benign_module_outputs_move_by_at_most_the_bound(model, planted):
    u, s, data, test, guard, _ = planted
    batch = data["benign"]
    _, x = forward(model.config, model.params, batch["input_ids"], batch["attention_mask"],
                   branches={k: (lr,) for k, lr in u.items()}, capture_inputs=True)
    pos = np.concatenate([batch["loss_mask"][:, 1:], np.zeros_like(batch["loss_mask"][:, :1])], axis=1).astype(bool)
    total_change = 0.0
    for key in u:
        d = (np.asarray(guard.delta(key), np.float64) - np_delta(s[key])) - np_delta(u[key])  # ΔT' − ΔT
        xs = np.asarray(x[key], np.float64)[pos]
        measured = np.mean(np.sum((xs @ d.T) ** 2, axis=1))  # E_b‖D x‖² with the real forward's inputs
        bound = guard.report["modules"][f"model.layers.0.self_attn.{key[1]}"]["guard"]["benign_bound"]
        assert 0 < measured <= bound * (1 + 1e-4)
        total_change += measured
    assert total_change > 0


def test_guard_from_data_equals_guard_from_cached_moments_and_exports_exactly(model, planted, tmp_path):
    from sst_jax.lora.peft_io import load_peft

    u, s, data, _, guard, _ = planted
    inputs = validate_inputs([u], safety=s, model=model)
    cached = merge("sst_guard", [u], safety=s, alpha=1.0,
                   fishers=guard_moments(inputs, data["harmful"], data["benign"], form="dense"), k=len(HARM))
    guard.to_peft(str(tmp_path / "g"))
    adapter = load_peft(str(tmp_path / "g"))
    for key in u:
        np.testing.assert_allclose(cached.delta(key), guard.delta(key), rtol=1e-6, atol=1e-7)
        assert adapter.rank(key) == 4 + 2
        np.testing.assert_allclose(np.asarray(adapter.delta(key)), np.asarray(guard.delta(key)), rtol=1e-6,
                                   atol=1e-7)


def test_input_samples_are_the_kfac_input_factor(model, planted):
    u, s, data, *_ = planted
    base = {k: (lr,) for k, lr in u.items()}
    x = input_samples(model, base, sorted(u), [data["benign"]])
    a = kfac_factors(model, base, sorted(u), [data["benign"]], chunk=4, progress=False).a
    for key in u:
        xs = np.asarray(x[key], np.float64)
        np.testing.assert_allclose(xs.T @ xs, a[key], rtol=1e-4, atol=1e-6)


def test_input_moments_are_the_kfac_input_factor(model, planted):
    # The guard's dense K from one forward pass equals K-FAC's A factor (per-sample backward pass).
    u, s, data, *_ = planted
    base = {k: (lr,) for k, lr in u.items()}
    batches = [{f: v[:3] for f, v in data["benign"].items()}, {f: v[3:] for f, v in data["benign"].items()}]
    k = input_moments(model, base, sorted(u), batches)
    a = kfac_factors(model, base, sorted(u), batches, chunk=4, progress=False).a
    for key in u:
        np.testing.assert_allclose(np.asarray(k[key]), np.asarray(a[key]), rtol=1e-5, atol=1e-6 * np.abs(a[key]).max())
    # Not the unweighted moments of every position: only those that predict response tokens count.
    from sst_jax.merge.sst_guard import _captured

    key = sorted(u)[0]
    x = np.concatenate([np.asarray(_captured(model.config, model.params, base, b["input_ids"], b["attention_mask"])[key])
                        .reshape(-1, a[key].shape[0]) for b in batches])
    assert not np.allclose(x.T @ x / len(x), np.asarray(a[key]), rtol=1e-2)


def test_sample_form_merge_equals_dense_form_merge_on_the_model(model, planted):
    u, s, data, *_ = planted
    few = {name: {f: v[:2] for f, v in b.items()} for name, b in data.items()}  # 12 + 12 tokens < in = 32
    kw = dict(safety=s, alpha=1.0, model=model, data=few, k=4)
    auto, dense = merge("sst_guard", [u], **kw), merge("sst_guard", [u], form="dense", **kw)
    for key in u:
        st = auto.report["modules"][f"model.layers.0.self_attn.{key[1]}"]["guard"]
        assert st["form"] == "samples" and st["dim"] == 24  # solved in the 24-dim row space
        ref = np.asarray(dense.delta(key))
        np.testing.assert_allclose(auto.delta(key), ref, atol=1e-5 * np.abs(ref).max())


def test_sequential_measures_each_layers_harmful_moments_at_the_partly_guarded_merge():
    from sst_jax.merge.sst_guard import dense_guard as solve

    model2 = load_model("tiny", seed=1, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    rng = np.random.default_rng(7)
    u, s = _adapter(model2, rng, 4, 1.0, layers=(0, 1)), _adapter(model2, rng, 2, 0.5, layers=(0, 1))
    data = {"harmful": _batch(rng, HARM, 6), "benign": _batch(rng, BENIGN, 8)}
    kw = dict(safety=s, alpha=1.0, model=model2, data=data, k=3, form="dense")  # k < 6: layer 0 leaks
    seq, flat = merge("sst_guard", [u], sequential=True, **kw), merge("sst_guard", [u], **kw)
    mods = lambda res, layer, m: res.report["modules"][f"model.layers.{layer}.self_attn.{m}"]["guard"]  # noqa: E731
    for m in TARGETS:  # the bottom layer sees θ₀ + ΔW_S either way
        np.testing.assert_allclose(mods(seq, 0, m)["eigvals"], mods(flat, 0, m)["eigvals"], rtol=1e-5)
    # Layer 1: K_h at θ₀ + (guarded U + S) on layer 0 + S on layer 1, measured here independently.
    point = {k: seq.factors[k] if k[0] == 0 else (s[k],) for k in s}
    layer1 = [(1, m) for m in TARGETS]
    kh = kfac_factors(model2, point, layer1, [data["harmful"]], chunk=6, progress=False).a
    kb = kfac_factors(model2, {k: (lr,) for k, lr in u.items()}, layer1, [data["benign"]], chunk=8, progress=False).a
    for key in layer1:
        want = np.asarray(solve(kh[key], kb[key], damping=DAMP).eigvals)[:8]
        np.testing.assert_allclose(mods(seq, 1, key[1])["eigvals"][:6], want[:6], rtol=1e-4)
        assert not np.allclose(mods(flat, 1, key[1])["eigvals"][:6], want[:6], rtol=1e-2)
        ref = np.asarray(seq.delta(key))
        assert np.abs(ref - np.asarray(flat.delta(key))).max() > 1e-3 * np.abs(ref).max()
