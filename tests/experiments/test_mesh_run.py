"""The end-to-end run on `tiny` (configs/smoke.json) on 8 host devices gives what the
one-device run gives (the `tiny_run` fixture), and puts every output in place once:

  data=2,fsdp=2,tensor=2 and data=8   one process, 8 devices
  2 processes × 4 devices             joined by jax.distributed on localhost, data=2,fsdp=2,tensor=2;
                                      process 0 writes everything, process 1 nothing

Tolerances (measured 2026-12-02, jax 0.10.2, CPU):
  adapters  |Δ| ≤ 1e-4·max|tensor| per tensor; measured ≤ 2.3e-5 (three Adam steps turn a
            reduction-order difference in the near-zero gradients of the A factors into
            relative 1e-5; the B factors agree to 5e-6).
  Fishers   |Δ| ≤ 1e-4·max|leaf| per statistic (every cached Fisher / moment, in write order).
  metrics   refusal / over-refusal / utility rates, verdicts and greedy responses equal;
            every other number rtol 1e-5; measured ≤ 2e-6 (SST-Guard's patch norm).
DARE is left out of the metric comparison: its masks are keyed by the adapters' content
digest (`merge.ties.expert_digest`), so adapters that differ in their last bits draw other
masks and its numbers move by ~5e-3 (by design: same adapters, same masks).
"""

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from multihost_helpers import EXPERIMENTS, final_outputs, run

SMOKE = str(Path(__file__).resolve().parents[2] / "configs" / "smoke.json")


def _adapters(out: Path) -> dict:
    return {p.parent.name: load_file(p) for p in (out / "cache" / "adapter").glob("*/adapter_model.safetensors")}


def _statistics(out: Path) -> list:
    """Cached Fisher statistics in the order they were written (their names hash the adapters'
    content, which differs in the last bits between the runs)."""
    paths = sorted((out / "cache" / "statistics").glob("*.pkl"), key=lambda p: p.stat().st_mtime_ns)
    return [pickle.loads(p.read_bytes()) for p in paths]


def _arrays(x):
    """The arrays of a cached statistic (dataclasses, dicts by key, sequences), in a fixed order."""
    if dataclasses.is_dataclass(x):
        for f in dataclasses.fields(x):
            yield from _arrays(getattr(x, f.name))
    elif isinstance(x, dict):
        for k in sorted(x, key=repr):
            yield from _arrays(x[k])
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _arrays(v)
    elif hasattr(x, "shape") or isinstance(x, (int, float)) and not isinstance(x, bool):
        yield np.asarray(x, np.float64)


def _results(out: Path) -> dict:
    files = [json.loads(p.read_text()) for p in out.glob("exp*/exp*_results_*.json")]
    return {f["experiment"]: f["results"] for f in files}


def _is_dare(key, value) -> bool:
    return str(key).startswith("dare") or (isinstance(value, dict) and str(value.get("method", "")).startswith("dare"))


def _differences(x, y, path: str = ""):
    """(path, x, y) of every leaf that differs beyond the tolerance, DARE subtrees skipped."""
    if isinstance(x, dict):
        assert set(x) == set(y), f"{path}: keys {sorted(set(x) ^ set(y))}"
        for k in x:
            if not _is_dare(k, x[k]):
                yield from _differences(x[k], y[k], f"{path}/{k}")
    elif isinstance(x, list):
        assert len(x) == len(y), f"{path}: {len(x)} != {len(y)} items"
        for i, (u, v) in enumerate(zip(x, y)):
            if not _is_dare(i, u):
                yield from _differences(u, v, f"{path}[{i}]")
    elif isinstance(x, float) and isinstance(y, float) and path.rsplit("/", 1)[-1] != "value":
        if not np.isclose(x, y, rtol=1e-5, atol=1e-7):
            yield path, x, y
    elif x != y:  # rates ("value"), verdicts, responses, labels: exactly
        yield path, x, y


CASES = {"data=2,fsdp=2,tensor=2": (8, 1), "data=8": (8, 1), "2 processes, data=2,fsdp=2,tensor=2": (4, 2)}


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("case", list(CASES))
def test_the_tiny_run_on_8_devices_equals_one_device(tiny_run, tmp_path, case):
    _, one, _ = tiny_run
    devices, processes = CASES[case]
    out = tmp_path / "results"
    writes = run(EXPERIMENTS, ["--mode", "minimal", "--model", "tiny", "--config", SMOKE, "--experiment", "all",
                               "--output_dir", str(out), "--log_file", "", "--mesh", case.split(", ")[-1]],
                 devices=devices, processes=processes, logs=tmp_path / "logs")

    a, b = _adapters(one), _adapters(out)
    assert sorted(a) == sorted(b) and a
    for name in a:
        assert a[name].keys() == b[name].keys()
        for t in a[name]:
            np.testing.assert_allclose(b[name][t], a[name][t], atol=1e-4 * np.abs(a[name][t]).max(), err_msg=t)

    s1, s8 = _statistics(one), _statistics(out)
    assert len(s1) == len(s8) and s1
    for x, y in zip(s1, s8):
        lx, ly = list(_arrays(x)), list(_arrays(y))
        assert len(lx) == len(ly)
        for u, v in zip(lx, ly):
            u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
            np.testing.assert_allclose(v, u, atol=1e-4 * max(np.abs(u).max(initial=0.0), 1e-30))

    r1, r8 = _results(one), _results(out)
    assert sorted(r8) == ["exp1", "exp2", "exp3"]
    diffs = [d for exp in r1 for d in _differences(r1[exp], r8[exp], exp)]
    assert not diffs, diffs[:10]

    placed = final_outputs(writes[0], out)
    assert placed and max(placed.values()) == 1, [p for p, n in placed.items() if n > 1]
    assert len([p for p in placed if "_results_" in p]) == 3
    assert all(not w for w in writes[1:]), writes[1][:5]  # only process 0 writes
