"""Sharded forward on 8 host CPU devices, in a subprocess (the device-count flag must be set
before jax starts and must not leak into the rest of the test session)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from sst_jax.models import DecoderConfig, forward, load_model, param_shapes
    from sst_jax.models.sharding import batch_sharding, make_mesh, param_specs, shard_params

    out = {"devices": len(jax.devices())}
    m = load_model("tiny", seed=0)
    r = np.random.default_rng(0)
    ids = r.integers(3, m.config.vocab_size, size=(8, 16)).astype(np.int32)
    mask = np.ones_like(ids); mask[1, :5] = 0; mask[6, :9] = 0
    f = jax.jit(forward, static_argnums=0)
    ref = np.asarray(f(m.config, m.params, ids, mask))
    for shape in [(2, 2, 2), (1, 4, 2), (1, 1, 8)]:
        mesh = make_mesh(data=shape[0], fsdp=shape[1], tensor=shape[2])
        params = shard_params(m.params, mesh)
        sids = jax.device_put(ids, batch_sharding(mesh)); smask = jax.device_put(mask, batch_sharding(mesh))
        got = f(m.config, params, sids, smask)
        q = params["layers"][0]["q_proj"]["weight"]
        out[str(shape)] = {"max_abs_diff": float(np.abs(np.asarray(got) - ref).max()),
                           "q_proj_shards": len(q.sharding.device_set),
                           "q_proj_shard_shape": list(q.addressable_shards[0].data.shape)}

    # Qwen2.5-14B-Instruct's config.json, shape only (no allocation).
    qwen = DecoderConfig(vocab_size=152064, d_model=5120, n_layers=48, n_heads=40, n_kv_heads=8,
                         d_ff=13824, architecture="qwen2", rms_eps=1e-6, rope_theta=1e6,
                         bias_modules=("q_proj", "k_proj", "v_proj"), dtype="bfloat16")
    shapes = param_shapes(qwen)
    out["qwen_params"] = int(sum(np.prod(s.shape) for s in jax.tree.leaves(shapes)))
    for shape in [(1, 8, 1), (1, 2, 4), (1, 1, 8), (2, 4, 1)]:
        mesh = make_mesh(data=shape[0], fsdp=shape[1], tensor=shape[2])
        try:
            specs = param_specs(shapes, mesh.shape, strict=True)
            out["qwen_" + str(shape)] = "ok"
            # Per-device bytes of the largest layer matrix under this mesh.
            sh = jax.sharding.NamedSharding(mesh, specs["layers"][0]["gate_proj"]["weight"])
            out["qwen_gate_shard_" + str(shape)] = list(sh.shard_shape(shapes["layers"][0]["gate_proj"]["weight"].shape))
        except ValueError as e:
            out["qwen_" + str(shape)] = str(e)
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def sharded_result():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


# q_proj of the tiny model is (64, 64), spec P("tensor", "fsdp").
@pytest.mark.parametrize("shape,q_shard", [("(2, 2, 2)", [32, 32]), ("(1, 4, 2)", [32, 16]),
                                           ("(1, 1, 8)", [8, 64])])
def test_sharded_forward_equals_single_device(sharded_result, shape, q_shard):
    assert sharded_result["devices"] == 8
    r = sharded_result[shape]
    assert r["max_abs_diff"] < 1e-5
    assert r["q_proj_shards"] == 8
    assert r["q_proj_shard_shape"] == q_shard  # really split, not replicated


def test_qwen14b_param_specs_divide_over_8_devices(sharded_result):
    assert sharded_result["qwen_params"] > 14_000_000_000
    for shape in ["(1, 8, 1)", "(1, 2, 4)", "(1, 1, 8)", "(2, 4, 1)"]:
        assert sharded_result["qwen_" + shape] == "ok"
    assert sharded_result["qwen_gate_shard_(1, 2, 4)"] == [13824 // 4, 5120 // 2]
