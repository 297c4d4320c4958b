"""experiments/study_report.py on the tiny end-to-end run: every pooled rate, paired test and
matched-norm choice is recomputed here from the per-item records; Holm against a hand fixture."""

import numpy as np
import pytest
from scipy import stats

from experiments import study_report
from sst_jax.eval.judge import KeywordRefusalJudge, RefusalRuleJudge


@pytest.fixture(scope="module")
def report(tiny_run):
    _, out, _ = tiny_run
    study = study_report.load_study(out)
    judges = {"keyword": KeywordRefusalJudge(), "rule": RefusalRuleJudge()}
    return study, study_report.build_report(study, judges, main_judge="keyword")


def test_holm_matches_hand_computed_values():
    # p = (0.01, 0.04, 0.03, 0.5): sorted 0.01·4 = 0.04, 0.03·3 = 0.09, 0.04·2 = 0.08 → 0.09 (monotone), 0.5·1
    assert study_report.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert study_report.holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])


def test_pooled_rates_equal_the_records(report):
    study, rep = report
    configs = study_report.exp3_configurations(study)
    for row in rep["rates"]["keyword"]:
        for rate, part, field in (("refusal", "harmful", "refused"), ("over_refusal", "benign", "refused"),
                                  ("utility", "utility", "correct")):
            if rate not in row:
                continue
            items = [r[field] for ev in configs[row["name"]].values() for r in ev["records"][part]]
            assert row[rate]["n"] == len(items) and row[rate]["value"] == pytest.approx(np.mean(items))


def test_rule_judge_rates_are_the_rule_judges_verdicts(report):
    study, rep = report
    configs = study_report.exp3_configurations(study)
    judge = RefusalRuleJudge()
    for row in rep["rates"]["rule"]:
        recs = [r for ev in configs[row["name"]].values() for r in ev["records"]["harmful"]]
        expect = np.mean(judge([r["prompt"] for r in recs], [r["response"] for r in recs]))
        assert row["refusal"]["value"] == pytest.approx(expect)


def test_matched_alpha_tests_recompute_from_records(report):
    study, rep = report
    configs = study_report.exp3_configurations(study)
    assert rep["matched_alpha"], "no SST-vs-baseline pairs"
    methods = {r["method"] for r in rep["matched_alpha"]}
    assert "task_arithmetic" in methods and "sst" not in methods
    for row in rep["matched_alpha"]:
        for rate, part, field in (("refusal", "harmful", "refused"), ("utility", "utility", "correct")):
            a = np.array([r[field] for ev in configs[row["sst"]].values() for r in ev["records"][part]])
            b = np.array([r[field] for ev in configs[row["other"]].values() for r in ev["records"][part]])
            c = row[rate]
            assert (c["a_only"], c["b_only"]) == (int(np.sum(a & ~b)), int(np.sum(~a & b)))
            d = c["a_only"] + c["b_only"]
            assert c["mcnemar_p"] == pytest.approx(1.0 if d == 0 else stats.binomtest(c["a_only"], d).pvalue)
            assert c["difference"]["value"] == pytest.approx(a.mean() - b.mean())
            assert c["holm_p"] >= c["mcnemar_p"]


def test_matched_norm_picks_the_closest_patch(report):
    study, rep = report
    norms = study_report.patch_norms(study)
    alphas = study_report.method_alphas(study)
    assert rep["matched_norm"]
    for row in rep["matched_norm"]:
        for seed, chosen in row["other_alpha_per_seed"].items():
            target = norms[f"sst@{row['sst_alpha']:g}"][seed]
            gaps = {a: abs(norms[f"{row['method']}@{a:g}"][seed] - target) for a in alphas[row["method"]]}
            assert gaps[chosen] == min(gaps.values())


def test_fisher_ablation_rows_and_the_main_setting_agree(report):
    study, rep = report
    rows = rep["fisher_ablation"]
    assert [tuple(r["fisher_samples"]) for r in rows] == [(2, 2), (4, 4)]
    # (4, 4) is the config's own count: the same merge as sst@1, so the same verdicts
    main = next(r for r in rep["rates"]["keyword"] if r["name"] == "sst@1")
    assert rows[1]["refusal"] == main["refusal"] and rows[1]["utility"] == main["utility"]
    # ... and the same safety patch ‖ΔW − ΔW_U‖ as exp3's sst@1 row
    norms = study_report.patch_norms(study)["sst@1"]
    assert rows[1]["patch_norm"] == pytest.approx(np.mean(list(norms.values())), rel=1e-12)
    assert rows[0]["patch_norm"] > 0


def test_report_renders_markdown_json_and_plot(report, tmp_path):
    _, rep = report
    md = study_report.to_markdown(rep)
    assert "SST vs each method at the same α" in md and "Fisher-count ablation" in md and "Hypervolume" in md
    png = study_report.plot_fronts(tmp_path / "f.png", rep)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gzipped_result_files_load_like_the_originals(tiny_run, tmp_path):
    """Per-seed files kept compressed (docs/study/results) pool exactly as the written JSONs."""
    import gzip

    _, out, _ = tiny_run
    original = study_report.load_study(out)
    for exp, sub in study_report.EXPERIMENT_DIRS.items():
        for f in sorted((out / sub).glob(f"{exp}_results_*.json")):
            (tmp_path / sub).mkdir(parents=True, exist_ok=True)
            (tmp_path / sub / (f.name + ".gz")).write_bytes(gzip.compress(f.read_bytes()))
    packed = study_report.load_study(tmp_path)
    assert set(packed) == set(original)
    for exp in original:
        assert packed[exp]["results"] == original[exp]["results"]
        assert [n.removesuffix(".gz") for n in packed[exp]["files"]] == original[exp]["files"]


def test_exp2_over_refusal_pools_the_benign_records(report):
    study, rep = report
    assert rep["exp2"]
    for row in rep["exp2"]:
        evs = [res["results"][str(row["n_experts"])]["methods"][row["method"]]["evaluation"]
               for res in study["exp2"]["results"].values()]
        items = [r["refused"] for ev in evs for r in ev["records"]["benign"]]
        assert row["over_refusal_seeds"] == len(evs)
        assert row["over_refusal"]["n"] == len(items) > 0
        assert row["over_refusal"]["value"] == pytest.approx(np.mean(items))


def test_exp2_without_over_refusal_reports_it_as_not_measured(report):
    study, _ = report
    old = {"exp2": {"results": {s: {**res, "results": {n: {**b, "methods": {
        m: {k: v for k, v in r.items() if k != "over_refusal"} for m, r in b["methods"].items()}}
        for n, b in res["results"].items()}} for s, res in study["exp2"]["results"].items()}}}
    rows = study_report.exp2_table(old)
    assert rows and all(r["over_refusal"] is None and r["over_refusal_seeds"] == 0 for r in rows)


def test_report_names_each_files_commit_and_cpu(report):
    """Which commit and CPU produced each per-seed file (BUILD_NOTES otherwise records it by hand)."""
    study, rep = report
    for exp, e in study.items():
        assert set(rep["sources"][exp]) == set(e["files"])
        for source in rep["sources"][exp].values():
            assert source["git_commit"] and source["cpu"] and source["cpus"] >= 1
    text = study_report.to_markdown(rep)
    some = next(iter(next(iter(rep["sources"].values())).values()))
    assert f"{some['git_commit']}; {some['cpu']}" in text


def test_exp2_paired_tests_recompute_from_records(report):
    """SST, SST-Guard and SST-Multi against every other exp2 method, same items, from the records."""
    study, rep = report
    rows = rep["exp2_paired"]
    block = {seed: res["results"] for seed, res in study["exp2"]["results"].items()}
    n = str(rows[0]["n_experts"])
    methods = set(next(iter(block.values()))[n]["methods"])
    family = [m for m in study_report.SST_FAMILY if m in methods]
    expect = {(a, b) for i, a in enumerate(family) for b in family[i + 1:]}
    expect |= {(a, b) for a in family for b in methods - set(study_report.SST_FAMILY)}
    assert {(r["method"], r["other"]) for r in rows} == expect and ("sst_guard", "task_arithmetic") in expect
    for row in rows:
        for rate, part, field in (("refusal", "harmful", "refused"), ("over_refusal", "benign", "refused"),
                                  ("utility", "utility", "correct")):
            a, b = (np.array([r[field] for s in block for r in block[s][n]["methods"][m]["evaluation"]["records"][part]])
                    for m in (row["method"], row["other"]))
            c = row[rate]
            assert c["n"] == a.size == b.size > 0
            assert (c["a_only"], c["b_only"]) == (int(np.sum(a & ~b)), int(np.sum(~a & b)))
            d = c["a_only"] + c["b_only"]
            assert c["mcnemar_p"] == pytest.approx(1.0 if d == 0 else stats.binomtest(c["a_only"], d).pvalue)
            assert c["difference"]["value"] == pytest.approx(a.mean() - b.mean())
            assert c["holm_p"] >= c["mcnemar_p"]
    assert "exp2: paired tests at N experts" in study_report.to_markdown(rep)


def test_exp2_paired_tests_skip_a_rate_no_run_measured(report):
    study, _ = report
    old = {"exp2": {"results": {s: {**res, "results": {n: {**b, "methods": {
        m: {**r, "evaluation": {**r["evaluation"], "records": {k: v for k, v in r["evaluation"]["records"].items()
                                                               if k != "benign"}}}
        for m, r in b["methods"].items()}} for n, b in res["results"].items()}}
        for s, res in study["exp2"]["results"].items()}}}
    rows = study_report.exp2_paired_tests(old, study_report.JudgedRecords({"keyword": KeywordRefusalJudge()}), "keyword")
    assert rows and all(r["over_refusal"] is None and r["refusal"]["holm_p"] >= r["refusal"]["mcnemar_p"] for r in rows)
    assert "not measured" in study_report.to_markdown({**_minimal_report(), "exp2_paired": rows})


def _minimal_report():
    return {"main_judge": "keyword", "judges": {"keyword": "keyword"}, "seeds": ["0"], "rates": {}, "hypervolume": {},
            "matched_alpha": [], "matched_norm": [], "fisher_ablation": [], "exp2": [], "timings_s": {}}
