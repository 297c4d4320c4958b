"""MetricsReporter outputs: JSON/CSV/Markdown contents and valid PNG plots."""

import csv
import json
import math
import struct

import pytest

from sst_jax.eval.metrics import proportion
from sst_jax.eval.report import MetricsReporter, plot_retention, plot_safety_utility, plot_tax_bars

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _reporter(tmp_path):
    r = MetricsReporter(tmp_path, "exp3_fixture", meta={"model": "tiny", "seed": 0})
    r.set_baseline(proportion([False] * 9 + [True]), proportion([True] * 8 + [False] * 2))  # S 0.1, U 0.8
    # (method, alpha, refusals of 10, correct of 10)
    for method, alpha, s, u in [("ta", 0.5, 3, 8), ("ta", 1.0, 6, 7), ("ta", 2.0, 9, 4),
                                ("sst", 0.5, 2, 8), ("sst", 1.0, 5, 8), ("sst", 2.0, 7, 6),
                                ("ties", 1.0, 1, 6)]:
        r.add(method, alpha, safety=proportion([True] * s + [False] * (10 - s)),
              utility=proportion([True] * u + [False] * (10 - u)),
              over_refusal=proportion([False] * 10))
    r.add_retention("ta", 2, 0.95, 0.9)
    r.add_retention("ta", 5, 0.8, 0.6)
    r.add_retention("sst", 2, 0.97, 0.93)
    r.add_retention("sst", 5, 0.85, 0.7)
    return r


def test_derived_metrics_per_row(tmp_path):
    r = _reporter(tmp_path)
    ta1 = r.rows[1]  # S 0.1 -> 0.6, U 0.8 -> 0.7
    assert ta1["tax_absolute"] == pytest.approx(0.1 / 0.5)
    assert ta1["tax_relative"] == pytest.approx((0.1 / 0.8) / (0.5 / 0.1))
    assert ta1["composite"] == pytest.approx(0.4 * 0.6 + 0.4 * 0.7 - 0.2 * 0.2)
    assert r.rows[3]["tax_absolute"] == 0.0  # sst 0.5: no utility loss
    assert r.rows[6]["tax_absolute"] == math.inf  # ties: safety 0.1 -> 0.1, utility lost


def test_summary_fronts_and_hypervolumes(tmp_path):
    s = _reporter(tmp_path).summary()
    # ta points (0.3,0.8) (0.6,0.7) (0.9,0.4): HV = 0.9*0.4 + 0.6*0.3 + 0.3*0.1
    assert s["ta"]["hypervolume"] == pytest.approx(0.57)
    assert s["ta"]["pareto_alphas"] == [0.5, 1.0, 2.0]
    # sst (0.2,0.8) is dominated by (0.5,0.8): front α 1.0, 2.0; HV = 0.7*0.6 + 0.5*0.2
    assert s["sst"]["pareto_alphas"] == [1.0, 2.0]
    assert s["sst"]["hypervolume"] == pytest.approx(0.52)


def test_write_outputs(tmp_path):
    paths = _reporter(tmp_path).write()
    assert set(paths) == {"json", "csv", "markdown", "scatter", "scatter_selective", "tax", "retention"}
    data = json.loads(paths["json"].read_text())
    assert data["rows"][6]["tax_absolute"] == "inf" and len(data["rows"]) == 7
    assert data["rows"][0]["safety"]["n"] == 10 and data["rows"][0]["safety"]["method"] == "wilson"
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 and rows[1]["method"] == "ta" and float(rows[1]["safety"]) == 0.6
    md = paths["markdown"].read_text()
    assert "| ta | 1 | 60.0 [" in md and "Global Pareto front (refusal, 1 − over-refusal, utility):" in md
    assert "Global Pareto front 2-D (refusal, utility):" in md
    for kind in ("scatter", "scatter_selective", "tax", "retention"):
        w, h = _png_size(paths[kind])
        assert w > 300 and h > 200, kind


def test_plot_functions_accept_plain_number_rows(tmp_path):
    rows = [{"method": "ta", "alpha": 1.0, "safety": 0.5, "utility": 0.7, "tax_absolute": 0.3},
            {"method": "ta", "alpha": 2.0, "safety": 0.5, "utility": 0.6, "tax_absolute": "inf"},
            {"method": "sst", "alpha": 1.0, "safety": 0.4, "utility": 0.8, "tax_absolute": None}]
    for fn, name in ((plot_safety_utility, "a.png"), (plot_tax_bars, "b.png")):
        assert _png_size(fn(tmp_path / name, rows))[0] > 100
    assert _png_size(plot_retention(tmp_path / "c.png", {"ta": [(2, 0.9), (4, 0.8)]}))[0] > 100


def test_paired_comparison_section(tmp_path):
    r = _reporter(tmp_path)
    a = [True] * 6 + [False] + [True, True, False]
    b = [False] * 6 + [True] + [True, True, False]
    entry = r.add_comparison("refusal", "sst α=1", "ta α=1", a, b)
    assert (entry["a_only"], entry["b_only"]) == (6, 1)
    assert entry["mcnemar_p"] == pytest.approx(16 / 128)
    paths = r.write()
    assert json.loads(paths["json"].read_text())["comparisons"][0]["n"] == 10
    assert "| refusal | sst α=1 | ta α=1 | 10 | 6 | 1 | +50.0 [" in paths["markdown"].read_text()


def _rates(k, n=10):
    return proportion([True] * k + [False] * (n - k))


def test_summary_keeps_the_2d_numbers_beside_the_3d_ones(tmp_path):
    s = _reporter(tmp_path).summary()["ta"]
    # over-refusal 0 everywhere: the 3-D volume is the 2-D area times 1 − 0
    assert s["hypervolume"] == pytest.approx(s["hypervolume_2d"]) == pytest.approx(0.57)
    assert s["pareto_alphas"] == s["pareto_alphas_2d"] == [0.5, 1.0, 2.0]
    assert (s["best_alpha"], s["best_alpha_2d"]) == (1.0, 1.0)  # 0.4·0.6 + 0.4·0.7 − 0.2·0.2 = 0.48


def test_a_configuration_that_refuses_everything_does_not_win_the_3d_ranking(tmp_path):
    r = MetricsReporter(tmp_path, "refuse_all")
    r.set_baseline(_rates(1), _rates(6))  # S_b 0.1, U_b 0.6
    r.add("refuse_all", 1.0, safety=_rates(10), over_refusal=_rates(10), utility=_rates(5))
    r.add("selective", 1.0, safety=_rates(6), over_refusal=_rates(1), utility=_rates(5))
    s = r.summary()
    assert s["refuse_all"]["best_composite_2d"] > s["selective"]["best_composite_2d"]  # the original's pick
    assert s["selective"]["best_composite"] > s["refuse_all"]["best_composite"]
    assert s["refuse_all"]["hypervolume"] == 0.0 < s["selective"]["hypervolume"]
    assert s["refuse_all"]["hypervolume_2d"] > s["selective"]["hypervolume_2d"]
    assert r.global_front_2d() == [{"method": "refuse_all", "alpha": 1.0}]
    assert {"method": "selective", "alpha": 1.0} in r.global_front()
    assert r.rows[0]["selective_safety"] == 0.0 and r.rows[1]["selective_safety"] == pytest.approx(0.54)


def test_rows_without_over_refusal_have_no_3d_numbers(tmp_path):
    r = MetricsReporter(None, "no_benign")
    r.add("ta", 1.0, safety=_rates(5), utility=_rates(5))
    assert r.rows[0]["composite"] is None and r.rows[0]["composite_2d"] == pytest.approx(0.4 - 0.2)
    s = r.summary()["ta"]
    assert s["hypervolume"] is None and s["best_composite"] is None and s["hypervolume_2d"] == 0.25
    assert r.global_front() == [] and "| ta | 1 | - |" in r.markdown()
    with pytest.raises(ValueError, match="no output directory"):
        r.write()


def test_from_rows_rebuilds_the_same_report_from_json(tmp_path):
    r = _reporter(tmp_path)
    data = json.loads(r.write()["json"].read_text())
    again = MetricsReporter.from_rows(tmp_path / "again", "exp3_fixture", data["rows"],
                                      baseline=data["baseline"], meta=data["meta"])
    assert again.summary() == r.summary() and again.global_front() == r.global_front()
    assert again.markdown() == r.markdown()  # "inf" taxes read back as ∞
    assert set(again.write()) >= {"json", "csv", "markdown", "scatter", "tax"}
