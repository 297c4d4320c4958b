"""Data-parallel Fisher passes on 4 (forced host) devices equal the single-device results.

Runs in a subprocess: the device count is fixed when JAX starts."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from sst_jax.data.chat import collate, encode_chat
    from sst_jax.fisher import core_fisher, core_spaces, kfac_accumulate, weight_diag_fisher
    from sst_jax.fisher.per_sample import accumulate
    from sst_jax.models import LowRank, load_model

    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(0)
    out = {}

    def loss(t, fixed, ex):
        h = jnp.tanh(ex["x"] @ t["a"].T)
        return -jax.nn.log_softmax(h @ t["b"].T)[ex["y"]]

    t = {"a": jnp.asarray(rng.standard_normal((5, 4)), jnp.float32),
         "b": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)}
    blocks = [{"x": rng.standard_normal((n, 4)).astype(np.float32),
               "y": rng.integers(0, 3, n).astype(np.int32)} for n in (13, 8)]
    kw = dict(stats=("mean", "diag", "dense", "gram"), chunk=2, progress=False)
    one = accumulate(loss, t, blocks, **kw)
    dp = accumulate(loss, t, blocks, mesh=mesh, **kw)
    diff = jax.tree.map(lambda u, v: float(np.abs(np.asarray(u) - np.asarray(v)).max()),
                        (one.mean, one.diag, one.dense, one.gram), (dp.mean, dp.diag, dp.dense, dp.gram))
    out["accumulate"] = max(jax.tree.leaves(diff))
    out["accumulate_n"] = [one.n_samples, dp.n_samples]

    def tap_loss(taps, w, sub):
        logits = sub["x"] @ w.T + taps["lin"]
        ll = jnp.take_along_axis(jax.nn.log_softmax(logits), sub["y"][..., None], axis=-1)[..., 0]
        return -ll.mean(-1), {"lin": sub["x"]}, jnp.ones(sub["y"].shape, jnp.float32)

    w = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
    kb = [{"x": rng.standard_normal((11, 5, 3)).astype(np.float32),
           "y": rng.integers(0, 4, (11, 5)).astype(np.int32)}]
    k1 = kfac_accumulate(tap_loss, w, kb, {"lin": 4}, {"lin": 3}, chunk=2, progress=False)
    k4 = kfac_accumulate(tap_loss, w, kb, {"lin": 4}, {"lin": 3}, chunk=2, mesh=mesh, progress=False)
    out["kfac"] = max(float(np.abs(k1.a["lin"] - k4.a["lin"]).max()), float(np.abs(k1.g["lin"] - k4.g["lin"]).max()))
    out["kfac_scale"] = float(np.abs(k1.g["lin"]).max())

    tiny = load_model("tiny", seed=0)
    cfg = tiny.config
    enc = [encode_chat(tiny.tokenizer, p, r) for p, r in
           [("Hi?", "Hello."), ("2+2?", "4."), ("Sky color?", "Blue."), ("Yes?", "No."), ("Go.", "OK.")]]
    batch = collate([e[0] for e in enc], cfg.pad_token_id, loss_masks=[e[1] for e in enc])
    key = (1, "o_proj")
    o, i = cfg.module_shape("o_proj")
    s = {key: (LowRank(a=jnp.asarray(rng.standard_normal((2, i)), jnp.float32),
                       b=jnp.asarray(rng.standard_normal((o, 2)), jnp.float32)),)}
    c1 = core_fisher(tiny, {}, core_spaces(s), [batch], chunk=1, progress=False).dense[key]
    c4 = core_fisher(tiny, {}, core_spaces(s), [batch], chunk=1, mesh=mesh, progress=False).dense[key]
    out["core"] = float(np.abs(np.asarray(c1) - np.asarray(c4)).max())
    out["core_scale"] = float(np.abs(np.asarray(c1)).max())
    w1 = weight_diag_fisher(tiny, {}, [key], [batch], chunk=1, progress=False)
    w4 = weight_diag_fisher(tiny, {}, [key], [batch], chunk=1, mesh=mesh, progress=False)
    out["wdiag"] = float(np.abs(np.asarray(w1.diag[key]) - np.asarray(w4.diag[key])).max())
    out["wdiag_scale"] = float(np.abs(np.asarray(w1.diag[key])).max())
    out["wdiag_n"] = [w1.n_samples, w4.n_samples]
    print("RESULT" + json.dumps(out))
""")


def test_data_parallel_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
    res = json.loads(line[len("RESULT"):])
    assert res["accumulate_n"] == [21, 21]
    assert res["accumulate"] < 1e-5
    assert res["kfac"] < 1e-5 * max(1.0, res["kfac_scale"])
    assert res["core"] < 1e-5 * max(1e-3, res["core_scale"])
    assert res["wdiag_n"] == [5, 5]
    assert res["wdiag_scale"] > 0 and res["wdiag"] < 1e-5 * res["wdiag_scale"]
