"""All three experiments end to end on the `tiny` preset: schema, per-sample records behind
every aggregate, determinism, and resume from cache."""

import math

import pytest

TOP_LEVEL = {"schema_version", "experiment", "model", "model_source", "mode", "seeds", "config",
             "sample_counts", "judge", "timings_s", "versions", "results"}


def _numbers(payloads: dict[str, dict]) -> dict:
    """Everything but timings, versions and file-specific fields."""
    return {k: v["results"] for k, v in payloads.items()}


def _check_estimate(est: dict, records: list, field: str):
    assert set(est) >= {"value", "low", "high", "n"}
    assert est["n"] == len(records)
    assert math.isclose(est["value"], sum(bool(r[field]) for r in records) / len(records))
    assert est["low"] - 1e-12 <= est["value"] <= est["high"] + 1e-12


@pytest.fixture(scope="module")
def runs(tiny_run, run_tiny_experiments, tmp_path_factory):
    _, first_dir, first = tiny_run  # the session's shared run (tests/experiments/conftest.py)
    second = run_tiny_experiments(tmp_path_factory.mktemp("second"))  # fresh cache: recomputed from scratch
    resumed = run_tiny_experiments(first_dir)  # same flags, same output dir: served from the cache
    return first, second, resumed, first_dir


def test_every_result_file_has_the_documented_schema(runs):
    first, _, _, out = runs
    assert set(first) == {"exp1", "exp2", "exp3"}
    for exp, payload in first.items():
        assert set(payload) >= TOP_LEVEL and set(payload["headline_methods"]) <= set(payload), exp
        assert payload["schema_version"] == 2 and payload["seeds"] == [0]
        assert {"git_commit", "cpu", "cpus", "jax", "backend"} <= set(payload["versions"]), exp
    assert (out / "exp1_safety_utility").is_dir() and (out / "exp3_baseline").is_dir()
    assert list((out / "exp3_baseline").glob("*.png")), "exp3 writes its plots"
    assert list((out / "exp2_multitask").glob("*retention.png"))


def test_aggregates_are_computed_from_the_per_sample_records(runs):
    first = runs[0]
    exp1 = first["exp1"]["results"]["0"]
    for name, ev in exp1["configurations"].items():
        _check_estimate(ev["metrics"]["refusal"], ev["records"]["harmful"], "refused")
        _check_estimate(ev["metrics"]["over_refusal"], ev["records"]["benign"], "refused")
        _check_estimate(ev["metrics"]["utility"], ev["records"]["utility"], "correct")
        assert all({"prompt", "answer", "response"} <= set(r) for r in ev["records"]["utility"])
        if name in ("base", "safety_only", "utility_only"):  # MC utility beside the primary one
            _check_estimate(ev["metrics"]["utility_mc"], ev["records"]["utility_mc"], "correct")
            assert all(len(r["choice_loglik"]) == 4 for r in ev["records"]["utility_mc"])
        # smoke computes the refusal NLL (minimal and the study turn it off): mean of the per-item values
        per_item = [r["refusal_nll"] for r in ev["records"]["harmful"]]
        assert math.isclose(ev["metrics"]["refusal_nll"], sum(per_item) / len(per_item), rel_tol=1e-9)
    assert set(exp1["safety_tax"]) == {"task_arithmetic@1", "sst@1", "sst_guard@1"}
    exp3 = first["exp3"]["results"]["0"]
    methods = {r["method"] for r in exp3["rows"]}
    assert methods == {"task_arithmetic", "ties", "dare_ties", "agl", "fisher", "sst", "sst_guard"}
    assert len(exp3["rows"]) == 7 * 2
    exp2 = first["exp2"]["results"]["0"]["results"]["2"]["methods"]
    # smoke's exp2 runs the additive, TIES and SST-family merges (DARE-TIES and AGL are in exp3;
    # minimal keeps only TA, SST and sst_multi there, for time)
    assert set(exp2) == {"task_arithmetic", "ties", "sst", "sst_multi", "sst_guard"}
    for method, r in exp2.items():  # exp2 measures over-refusal on the benign test prompts
        benign = [rec["refused"] for rec in r["evaluation"]["records"]["benign"]]
        assert r["over_refusal"]["n"] == len(benign) == 6, method
        assert r["over_refusal"]["value"] == sum(benign) / len(benign), method


def test_same_seed_gives_the_same_numbers(runs):
    first, second, _, _ = runs
    assert _numbers(first) == _numbers(second)


def test_a_rerun_with_the_same_flags_resumes_from_the_cache(runs):
    first, _, resumed, _ = runs
    assert _numbers(first) == _numbers(resumed)
    for exp, payload in resumed.items():
        assert "train_safety" not in payload["timings_s"] and "fisher" not in payload["timings_s"], exp
