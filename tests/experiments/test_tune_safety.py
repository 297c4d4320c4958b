"""The safety-recipe sweep on `tiny`: grid parsing, validation-only prompts, pooled rates, ranking."""

from pathlib import Path

import pytest

from experiments.common import Cache, load_config
from experiments.tune_safety import main, parse_axis, rank_key, sweep, to_markdown
from experiments.workbench import build_splits

SMOKE = str(Path(__file__).resolve().parents[2] / "configs" / "smoke.json")


@pytest.fixture(scope="module")
def cfg():
    return load_config("minimal", "tiny", SMOKE)


def test_grid_axes_are_checked_against_the_config(cfg):
    assert parse_axis("train_safety.steps=2,4", cfg) == (("train_safety", "steps"), [2, 4])
    assert parse_axis("train_safety.lr=0.01,1", cfg) == (("train_safety", "lr"), [0.01, 1.0])
    for bad, match in [("train_safety.stepz=2", "no key"), ("train_safety.steps=2.5", "integer"),
                       ("train_safety.lr=fast", "number"), ("train_safety", "KEY.PATH"), ("lora=1", "dict")]:
        with pytest.raises(ValueError, match=match):
            parse_axis(bad, cfg)


def test_bad_flags_fail_in_one_line_before_the_model_loads(capsys):
    with pytest.raises(SystemExit, match="no key 'train_safety.nope'"):
        main(["--model", "tiny", "--config", SMOKE, "--grid", "train_safety.nope=1"])
    with pytest.raises(SystemExit, match="--grid"):
        main(["--model", "tiny", "--config", SMOKE])


def test_ranking_puts_points_that_meet_both_targets_first():
    row = lambda r, o: {"refusal": {"value": r}, "over_refusal": {"value": o}}  # noqa: E731
    rows = [row(1.0, 0.9), row(0.92, 0.18), row(0.95, 0.1), row(0.5, 0.0)]
    ranked = sorted(rows, key=lambda x: rank_key(x, (0.9, 0.2)))
    assert [(x["refusal"]["value"], x["over_refusal"]["value"]) for x in ranked] == \
        [(0.95, 0.1), (0.92, 0.18), (0.5, 0.0), (1.0, 0.9)]  # refuse-everything ranks last


def test_sweep_measures_s_alone_on_held_back_training_prompts_only(cfg, tiny_model, tmp_path):
    axes = [parse_axis("train_safety.steps=1,2", cfg)]
    cache = Cache(tmp_path / "cache")
    report = sweep(tiny_model, cfg, axes, seeds=[0, 1], validation=4, cache=cache)
    assert sorted(r["point"]["train_safety.steps"] for r in report["rows"]) == [1, 2]
    val, test = build_splits(cfg, seed=0, validation=4), build_splits(cfg, seed=0)
    assert not set(val.harmful_test) & set(test.harmful_test)  # never the test prompts
    for row in report["rows"]:
        assert row["refusal"]["n"] == row["over_refusal"]["n"] == 8  # 4 per pool × 2 seeds, pooled
        for rate in ("refusal", "over_refusal"):
            per_seed = [row["per_seed"][s][rate] for s in ("0", "1")]
            assert row[rate]["value"] == pytest.approx(sum(per_seed) / 2)
    assert report["rows"] == sorted(report["rows"], key=lambda r: rank_key(r, (0.9, 0.2)))
    entries = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    again = sweep(tiny_model, cfg, axes, seeds=[0, 1], validation=4, cache=cache)  # served from the cache
    assert again["rows"] == report["rows"]
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()) == entries
    table = to_markdown(report)
    assert table.count("| train_safety.steps=") == 2 and "n" in table


def test_the_command_writes_its_table_and_json(tmp_path):
    import json
    assert main(["--model", "tiny", "--config", SMOKE, "--grid", "train_safety.steps=1", "--validation", "4",
                 "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "tune_safety.json").read_text())
    assert [r["point"] for r in report["rows"]] == [{"train_safety.steps": 1}]
    assert report["judge"] == "keyword-gcg" and report["config"] == SMOKE
    assert (tmp_path / "tune_safety.md").read_text() == to_markdown(report)


def _report(points, judge="keyword-gcg"):
    rows = [{"point": {"train_safety.steps": steps},
             "refusal": {"value": r, "low": r, "high": r, "n": 100},
             "over_refusal": {"value": o, "low": o, "high": o, "n": 100}} for steps, r, o in points]
    return {"validation_prompts_per_pool": 100, "seeds": [0], "targets": [0.9, 0.2], "judge": judge,
            "rows": rows, "config": "configs/study.json"}


def test_collect_ranks_reports_of_separate_runs_together(tmp_path):
    import json
    for name, points in {"a": [(48, 0.85, 0.20)], "b": [(96, 0.93, 0.15), (144, 1.0, 0.9)]}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "tune_safety.json").write_text(json.dumps(_report(points)))
    assert main(["--collect", str(tmp_path)]) == 0
    table = (tmp_path / "tune_safety.md").read_text()
    order = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| train_safety")]
    assert order == ["train_safety.steps=96", "train_safety.steps=48", "train_safety.steps=144"]


def test_collect_refuses_reports_measured_differently(tmp_path):
    import json
    for name, judge in (("a", "keyword-gcg"), ("b", "refusal-rule-v2")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tune_safety.json").write_text(json.dumps(_report([(48, 0.8, 0.2)], judge=judge)))
    with pytest.raises(SystemExit, match="differ in judge"):
        main(["--collect", str(tmp_path)])
    with pytest.raises(SystemExit, match="no tune_safety.json"):
        main(["--collect", str(tmp_path / "a" / "missing")])
