"""Dense merges (TIES, DARE, magnitude pruning) are exported one module at a time: the low-rank
PEFT adapter (`to_peft(rank=...)`) and the merged HF weights (`to_merged_hf`) are byte-identical
to exporting the same merge held all at once (a dict of every module, the former result), and
the export never holds more than one module's dense ΔW."""

import gc
import weakref
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from sst_jax.merge import DenseModules, MergeResult, merge
from sst_jax.merge.ties import ties_tensors
from sst_jax.models import LowRank

TARGETS = ("q_proj", "v_proj", "down_proj")


def _adapter(config, rng, r):
    out = {}
    for layer in range(config.n_layers):
        for m in TARGETS:
            o, i = config.module_shape(m)
            out[(layer, m)] = LowRank(a=jnp.asarray(rng.normal(size=(r, i)) / np.sqrt(i), jnp.float32),
                                      b=jnp.asarray(rng.normal(size=(o, r)) * 0.3, jnp.float32), scale=2.0)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _all_at_once(result: MergeResult) -> MergeResult:
    """The same merge as a plain dict of every module's ΔW (how results were held before)."""
    dense = {k: result.dense.stream(k) for k in result.dense}
    return MergeResult(method=result.method, factors=dict(result.factors), dense=dense, report=dict(result.report))


@pytest.fixture(scope="module")
def experts(tiny_model):
    rng = np.random.default_rng(0)
    return [_adapter(tiny_model.config, rng, r) for r in (2, 3, 4)]


@pytest.mark.parametrize("method,hparams", [("ties", {"density": 0.3}), ("dare_ties", {"density": 0.5}),
                                            ("dare_linear", {"density": 0.5}), ("magnitude_prune", {})])
def test_peft_and_hf_exports_equal_the_all_at_once_result(tiny_model, experts, tmp_path, method, hparams):
    streamed = merge(method, experts, [0.5, 0.8, 1.0], model=tiny_model, **hparams)
    assert isinstance(streamed.dense, DenseModules) and repr(streamed.dense).endswith("0 kept)")
    reference = _all_at_once(merge(method, experts, [0.5, 0.8, 1.0], model=tiny_model, **hparams))

    err_s = streamed.to_peft(str(tmp_path / "streamed"), rank=3)
    err_r = reference.to_peft(str(tmp_path / "reference"), rank=3)
    assert err_s == err_r
    assert _files(tmp_path / "streamed") == _files(tmp_path / "reference")  # same adapter bytes
    streamed.to_merged_hf(tiny_model, str(tmp_path / "hf_streamed"))
    reference.to_merged_hf(tiny_model, str(tmp_path / "hf_reference"))
    assert _files(tmp_path / "hf_streamed") == _files(tmp_path / "hf_reference")  # same merged tensors
    assert repr(streamed.dense).endswith("0 kept)")  # the exports kept nothing
    # The report's norms are filled in as the modules are produced: the all-at-once values.
    norms = {p: m["norm"] for p, m in streamed.report["modules"].items()}
    expected = {p: float(np.linalg.norm(np.asarray(reference.dense[k]))) for k, p in
                zip(reference.keys, norms)}
    np.testing.assert_allclose(list(norms.values()), list(expected.values()), rtol=1e-6)


def test_ties_result_equals_the_stacked_reference(tiny_model, experts):
    result = merge("ties", experts, [0.5, 0.8, 1.0], model=tiny_model, density=0.3)
    for key in result.keys:
        stacked = jnp.stack([e[key].delta() for e in experts])
        want = ties_tensors(stacked, jnp.asarray([0.5, 0.8, 1.0]), density=0.3)
        np.testing.assert_allclose(result.delta(key), want, rtol=1e-5, atol=1e-6)


def test_an_export_holds_one_dense_module_at_a_time(tiny_model, experts, tmp_path):
    result = merge("ties", experts, [0.5, 0.8, 1.0], model=tiny_model, density=0.3)
    alive, peak = [0], [0]

    def gone():
        alive[0] -= 1

    def watch(key, delta):
        gc.collect()  # count only modules still referenced
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(delta, gone)

    result.dense.on_produce(watch)
    result.to_peft(str(tmp_path / "peft"), rank=2)
    gc.collect()
    assert peak[0] == 1, peak
    peak[0] = 0
    result.to_merged_hf(tiny_model, str(tmp_path / "hf"))
    gc.collect()
    assert peak[0] == 1, peak
    assert alive[0] == 0
    # Reading the result (as a dict) still keeps what was read: it is produced once.
    first = result.dense[result.keys[0]]
    assert result.dense[result.keys[0]] is first
