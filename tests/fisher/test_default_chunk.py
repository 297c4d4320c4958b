"""The Fisher `chunk` (samples per vmapped gradient step) defaults from the backend in one
place, `sst_jax.fisher.default_chunk`: 4 on CPU, 16 on GPU/TPU; an explicit chunk wins."""

import dataclasses
import types

import jax
import numpy as np
import pytest

from sst_jax.fisher import ACCELERATOR_CHUNK, CPU_CHUNK, default_chunk, per_sample, resolve_chunk
from sst_jax.fisher import estimators
from sst_jax.merge import api, list_methods
from sst_jax.models.sharding import make_mesh


def test_default_chunk_is_4_on_cpu_and_16_on_gpu_and_tpu():
    assert jax.default_backend() == "cpu"  # the test suite runs on CPU
    assert default_chunk() == default_chunk("cpu") == CPU_CHUNK == 4
    assert default_chunk("gpu") == default_chunk("cuda") == default_chunk("TPU") == ACCELERATOR_CHUNK == 16


def test_an_explicit_chunk_wins_and_none_follows_the_mesh_platform():
    assert resolve_chunk(7) == 7
    mesh = make_mesh(data=1, fsdp=1, tensor=1, devices=jax.local_devices()[:1])
    assert resolve_chunk(None, mesh) == resolve_chunk(None) == 4


def test_every_data_aware_method_takes_its_chunk_default_from_the_backend():
    with_chunk = [spec for spec in map(api.get_method, list_methods()) if any(p.name == "chunk" for p in spec.params)]
    assert {"sst", "sst_multi", "agl", "fisher", "sst_guard"} <= {s.name for s in with_chunk}
    for spec in with_chunk:
        assert spec.param("chunk").default is None, spec.name
        assert spec.param("chunk").parse("8", spec.name) == 8


def _spy(monkeypatch, module, name, position):
    """Record the chunk (positional argument `position`) each compile of `module.name` gets."""
    seen, real = [], getattr(module, name)

    def spy(*args):
        seen.append(args[position])
        return real(*args)

    monkeypatch.setattr(module, name, spy)
    return seen


def test_fisher_passes_without_a_chunk_use_the_default(monkeypatch, tiny_model):
    from sst_jax.models import LowRank

    cfg = tiny_model.config
    key = (0, "q_proj")
    o, i = cfg.module_shape("q_proj")
    rng = np.random.default_rng(0)
    lr = LowRank(a=rng.normal(size=(2, i)).astype(np.float32) / np.sqrt(i),
                 b=rng.normal(size=(o, 2)).astype(np.float32), scale=1.0)
    ids = rng.integers(3, cfg.vocab_size, size=(6, 10)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    steps = _spy(monkeypatch, per_sample, "_compiled_step", 2)
    taps = _spy(monkeypatch, estimators, "_compiled_taps", 5)
    spaces = {key: estimators.core_space(lr)}
    default = estimators.core_fisher(tiny_model, {}, spaces, [batch], progress=False).dense[key]
    explicit = estimators.core_fisher(tiny_model, {}, spaces, [batch], chunk=3, progress=False).dense[key]
    estimators.weight_diag_fisher(tiny_model, {}, [key], [batch], progress=False)
    assert steps == [4, 3] and taps == [4]
    np.testing.assert_allclose(default, explicit, rtol=1e-5, atol=1e-7)  # chunk changes speed, not the result


def test_merge_adapters_records_the_default_chunk_and_an_explicit_one_wins(monkeypatch, hf_llama_adapters):
    pytest.importorskip("torch")
    from sst_jax import pipeline
    from sst_jax.models import load_model

    seen = []
    spec = api.get_method("sst")
    monkeypatch.setitem(api._REGISTRY, "sst", dataclasses.replace(
        spec, fn=lambda inputs, **kw: seen.append(kw["chunk"]) or api.get_method("task_arithmetic").fn(inputs)))
    monkeypatch.setattr(pipeline, "_resolve_data", lambda *a, **k: types.SimpleNamespace(sources={}))
    monkeypatch.setattr(pipeline, "_build_batches", lambda *a, **k: {})
    monkeypatch.setattr(pipeline, "_statistics", lambda spec, inputs, batches, hp, *a: seen.append(hp["chunk"]))
    inp = hf_llama_adapters
    model = load_model(inp.base)
    first = pipeline.merge_adapters(model, utility=[inp.utility], safety=inp.safety, method="sst", progress=False)
    pipeline.merge_adapters(model, utility=[inp.utility], safety=inp.safety, method="sst", hparams={"chunk": 6},
                            progress=False)
    assert seen == [4, 4, 6, 6]
    assert first.report["hparams"]["chunk"] == 4
