"""`sst_jax.merge_adapters` / `write_merge` / `read_examples` (the library front door) against
adapters made by `peft` on a Llama saved by `transformers` (tests/conftest.py `hf_llama_adapters`:
two adapters with different target sets, rank/alpha patterns, rsLoRA)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402

import sst_jax  # noqa: E402
from sst_jax import pipeline  # noqa: E402
from sst_jax.data.examples import Example  # noqa: E402
from sst_jax.errors import AdapterError, DatasetError, HyperParameterError, SstJaxError  # noqa: E402
from sst_jax.lora.algebra import fold  # noqa: E402
from sst_jax.lora.peft_io import load_peft  # noqa: E402
from sst_jax.models import load_model  # noqa: E402

PEFT_MODULE = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)$")
W_U, ALPHA = 0.7, 0.5


@pytest.fixture(scope="module")
def base(hf_llama_adapters):
    return load_model(hf_llama_adapters.base)


def _peft_deltas(path, base_dir) -> dict[tuple[int, str], np.ndarray]:
    """{(layer, module): ΔW} by PEFT's own get_delta_weight for the adapter saved at `path`."""
    model = PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base_dir), path)
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            m = PEFT_MODULE.search(name)
            out[(int(m[1]), m[2])] = mod.get_delta_weight("default").detach().numpy().astype(np.float64)
    return out


def _dense(result) -> dict:
    return {k: np.asarray(v) for k, v in result.to_dense().items()}


# ----------------------------------------------------------------------------- merge_adapters


@pytest.mark.parametrize("method,hparams", [("task_arithmetic", None), ("ties", {"density": 0.5})])
def test_loaded_adapters_and_peft_folders_merge_to_the_same_result(hf_llama_adapters, base, method, hparams):
    inp = hf_llama_adapters
    from_folders = sst_jax.merge_adapters(inp.base, utility=[inp.utility], safety=inp.safety, method=method,
                                          weights=[W_U], alpha=ALPHA, hparams=hparams, progress=False)
    from_objects = sst_jax.merge_adapters(base, utility=[load_peft(inp.utility)], safety=load_peft(inp.safety),
                                          method=method, weights=[W_U], alpha=ALPHA, hparams=hparams,
                                          progress=False)
    a, b = _dense(from_folders), _dense(from_objects)
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def test_different_targets_merge_with_zero_delta_where_untargeted(hf_llama_adapters, base):
    inp = hf_llama_adapters
    result = sst_jax.merge_adapters(base, utility=[inp.utility], safety=inp.safety, method="task_arithmetic",
                                    weights=[W_U], alpha=ALPHA, progress=False)
    du, ds = _peft_deltas(inp.utility, inp.base), _peft_deltas(inp.safety, inp.base)
    assert set(du) != set(ds) and set(du) & set(ds)  # the fixture: overlapping, different targets
    ours = _dense(result)
    assert set(ours) == set(du) | set(ds)
    for key, delta in ours.items():
        ref = W_U * du.get(key, 0.0) + ALPHA * ds.get(key, 0.0)
        np.testing.assert_allclose(delta, ref, rtol=1e-5, atol=1e-6, err_msg=str(key))
    # modules neither adapter targets keep the base weight exactly
    folded = fold(base.params, result.to_dense(), base.config)
    untouched = [(2, m) for m in ("k_proj", "o_proj", "gate_proj", "up_proj")]
    assert not set(untouched) & set(ours)
    for layer, module in untouched:
        np.testing.assert_array_equal(np.asarray(folded["layers"][layer][module]["weight"]),
                                      np.asarray(base.params["layers"][layer][module]["weight"]))


def test_a_merge_result_feeds_another_merge_unchanged(hf_llama_adapters, base):
    inp = hf_llama_adapters
    first = sst_jax.merge_adapters(base, utility=[inp.utility], safety=inp.safety, method="task_arithmetic",
                                   weights=[W_U], alpha=ALPHA, progress=False)
    again = sst_jax.merge_adapters(base, utility=[first], method="task_arithmetic", progress=False)
    a, b = _dense(first), _dense(again)
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs,error,needle", [
    ({"method": "sst", "hparams": {"kk": 1}}, HyperParameterError, "no hyper-parameter 'kk'"),
    ({"method": "sst", "hparams": {"damping": "lots"}}, HyperParameterError, "damping must be a number"),
    ({"method": "no_such_method"}, HyperParameterError, "unknown merge method"),
    ({"method": "sst", "harmful": ["one", "two"]}, DatasetError, "2 rows"),
    ({"method": "fisher"}, DatasetError, "needs one dataset per utility adapter"),
    ({"method": "fisher", "utility_data": [[("p", "r")] * 3] * 2}, DatasetError, "2 datasets for 1"),
    ({"method": "sst", "utility": ["/no/such/adapter"]}, AdapterError, "not a directory"),
])
def test_bad_inputs_fail_before_the_model_is_loaded(hf_llama_adapters, monkeypatch, kwargs, error, needle):
    def no_model(*args, **kw):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(pipeline, "load_model", no_model)
    inp = hf_llama_adapters
    call = {"utility": [inp.utility], "safety": inp.safety, **kwargs}
    with pytest.raises(error, match=needle):
        sst_jax.merge_adapters(inp.base, progress=False, **call)


# ----------------------------------------------------------------------------- read_examples


def test_read_examples_reads_csv_json_jsonl_and_lists_alike(tmp_path):
    pairs = [("What is 2+2?", "4"), ("Name a fruit, please.", "An apple"), ("Say \"hi\"", "hi")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    (tmp_path / "d.json").write_text(json.dumps([{"prompt": p, "response": r} for p, r in pairs]))
    import csv

    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "response"])
        w.writerows(pairs)
    want = [Example(p, r) for p, r in pairs]
    for source in (tmp_path / "d.jsonl", tmp_path / "d.json", tmp_path / "d.csv", pairs):
        assert pipeline.read_examples(source, "utility", need_response=True) == want, source


def test_read_examples_names_the_row_without_a_response(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text('{"prompt": "a", "response": "x"}\n{"prompt": "b", "response": "y"}\n{"prompt": "c"}\n')
    assert pipeline.read_examples(path, "utility")[2] == Example("c")
    with pytest.raises(DatasetError, match=r"u\.jsonl, row 3: no 'response'"):
        pipeline.read_examples(path, "utility", need_response=True)


# ----------------------------------------------------------------------------- write_merge


@pytest.fixture(scope="module")
def ties_result(hf_llama_adapters, base):
    inp = hf_llama_adapters
    return sst_jax.merge_adapters(base, utility=[inp.utility], safety=inp.safety, method="ties", progress=False)


def test_write_merge_of_a_dense_result_without_rank_writes_nothing(ties_result, tmp_path):
    with pytest.raises(SstJaxError, match="'ties' produces a dense ΔW"):
        sst_jax.write_merge(ties_result, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_write_merge_refuses_an_existing_output_and_replaces_it_with_overwrite(ties_result, hf_llama_adapters,
                                                                             tmp_path):
    out = tmp_path / "out"
    sst_jax.write_merge(ties_result, out, rank=2)
    first = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(SstJaxError, match="exists"):
        sst_jax.write_merge(ties_result, out, rank=3)
    assert (out / "adapter_model.safetensors").read_bytes() == first
    sst_jax.write_merge(ties_result, out, rank=3, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                    "merge_report.json", "merge_report.md"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or backup folder left
    report = json.loads((out / "merge_report.json").read_text())
    assert report["rank"] == 3 and set(report["truncation_error"]) == set(report["modules"])
    exported = _peft_deltas(out, hf_llama_adapters.base)
    assert set(exported) == set(ties_result.keys)
    for key, d in exported.items():  # rank ≤ 3: the rest of the spectrum is float32 round-off
        sv = np.linalg.svd(d, compute_uv=False)
        assert sv[3:].max(initial=0.0) <= 1e-5 * sv[0], key


def test_write_merge_with_overwrite_never_deletes_a_folder_it_did_not_write(ties_result, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SstJaxError):
        sst_jax.write_merge(ties_result, out, rank=2, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- caches


def test_model_identity_changes_when_any_projection_weight_changes(base):
    import dataclasses

    import jax.numpy as jnp

    delta = {(0, "q_proj"): jnp.full(base.config.module_shape("q_proj"), 0.5, jnp.float32)}
    other = dataclasses.replace(base, params=fold(base.params, delta, base.config))
    assert pipeline.model_identity(other) != pipeline.model_identity(base)


def test_statistics_cache_tells_seeds_apart_when_the_statistics_use_the_key(hf_llama_adapters, base, tmp_path):
    import dataclasses

    import jax

    from sst_jax.merge import get_method, validate_inputs

    spec = dataclasses.replace(get_method("sst"),
                               statistics=lambda inputs, data, **kw: np.asarray(jax.random.key_data(inputs.key)))
    batch = {k: np.ones((1, 4), np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    batches = {"harmful": [batch], "benign": [batch]}
    adapters = [load_peft(hf_llama_adapters.utility)]

    def stats(seed):
        inputs = validate_inputs(adapters, safety=load_peft(hf_llama_adapters.safety), model=base, modules="union",
                                 key=jax.random.key(seed))
        return pipeline._statistics(spec, inputs, batches, {"labels": "model"}, base, tmp_path, seed)

    first, second = stats(0), stats(1)
    assert not np.array_equal(first, second)


def test_agl_reuses_the_fisher_pass_an_sst_merge_cached(hf_llama_adapters, base, tmp_path, monkeypatch):
    """agl's statistics are sst's (core-space F_h, F_b at sst's defaults): with a cache, an agl
    merge after an sst merge of the same inputs runs no Fisher pass, and its result is the one
    an uncached agl merge computes, bit for bit. A non-default sst Fisher is a different entry."""
    from sst_jax.merge import get_method, sst as sst_module

    assert (pipeline._statistics_params(get_method("agl"), {})
            == pipeline._statistics_params(get_method("sst"), {"fisher": "core"})
            != pipeline._statistics_params(get_method("sst"), {"fisher": "diagonal"}))
    calls, real = [], sst_module.sst_fishers
    monkeypatch.setattr(sst_module, "sst_fishers", lambda *a, **k: calls.append(1) or real(*a, **k))
    common = dict(utility=[load_peft(hf_llama_adapters.utility)], safety=load_peft(hf_llama_adapters.safety),
                  weights=[W_U], alpha=ALPHA, fisher_samples=4, progress=False)
    sst_jax.merge_adapters(base, method="sst", cache_dir=tmp_path, **common)
    cached = sst_jax.merge_adapters(base, method="agl", cache_dir=tmp_path, **common)
    assert len(calls) == 1
    fresh = sst_jax.merge_adapters(base, method="agl", **common)
    assert len(calls) == 2
    a, b = _dense(cached), _dense(fresh)
    assert set(a) == set(b) and a
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))
