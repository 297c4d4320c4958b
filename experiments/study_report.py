"""The study's report: pools the per-seed result files of a study run and answers "does SST
win, where, by how much, with what confidence".

    python -m experiments.study_report --results_dir ~/.cache/sst-jax/study [--output DIR]

Reads every exp1/exp2/exp3 result JSON under `results_dir` (a seed that appears in several
files is taken from the newest), then writes `study_report.md`, `study_report.json` and
`study_fronts.png` (into `--output`, default the results dir):

  * S alone's refusal / over-refusal, per seed and pooled, under every judge;
  * exp3: each method × α, rates pooled over seeds (Wilson interval of the summed counts),
    and each method's 3-D / 2-D hypervolume per seed (mean, sd, and the pooled-rate value);
  * paired tests of SST against every other method, on the same items: at matched α, and at
    matched size of the safety patch ‖ΔW_merged − ΔW_U‖_F (for each SST point, the other
    method's α whose patch norm is closest, in the same seed). Items of all seeds are
    concatenated (each seed's pairs share an item; seeds' test sets differ only by their
    seeded subsample), exact McNemar on the discordant pairs, paired bootstrap interval of the
    difference, the per-seed differences' mean and sd, and Holm's correction over each table's
    family of tests;
  * the Fisher-count ablation, exp2's N-expert retention, refusal and over-refusal, exp2's paired
    tests (SST, SST-Guard and SST-Multi against every other method at each N, same items), and
    wall time by phase.

Verdicts are recomputed from the per-item records with each judge (`--judges`), so judges are
compared on the same responses; utility is exact match and does not depend on the judge.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from experiments.common import EXPERIMENT_DIRS
from experiments.report import format_number, markdown_table
from sst_jax.eval.metrics import paired_comparison, pooled_proportion, proportion
from sst_jax.eval.report import json_safe, write_text
from sst_jax.eval.scoring import rescore
from sst_jax.io_utils import atomic_write_json

REFERENCE = "sst"
RATE_RECORDS = {"refusal": "harmful", "over_refusal": "benign"}
DIRECTION = {"refusal": "higher is safer", "over_refusal": "lower is better", "utility": "higher is better"}


# ---------------------------------------------------------------------------------------------
# Loading


def load_study(results_dir: str | Path) -> dict[str, dict[str, Any]]:
    """{experiment: {"results": {seed: results}, "files": [...], "timings": {file: timings_s},
    "judge", "sample_counts", "config"}} from every result JSON under `results_dir`."""
    root = Path(results_dir)
    out: dict[str, dict[str, Any]] = {}
    for exp, sub in EXPERIMENT_DIRS.items():
        # The timestamp sorts them; .json.gz: per-seed files kept in git (docs/study/results).
        files = sorted([*(root / sub).glob(f"{exp}_results_*.json"), *(root / sub).glob(f"{exp}_results_*.json.gz")],
                       key=lambda f: f.name)
        if not files:
            continue
        entry = out.setdefault(exp, {"results": {}, "files": [], "timings": {}})
        for f in files:
            payload = json.loads(gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_text())
            entry["results"].update(payload["results"])  # newer files win
            entry["files"].append(f.name)
            entry["timings"][f.name] = payload.get("timings_s", {})
            versions = payload.get("versions") or {}  # commit and CPU: recorded since 2026-12-03
            entry.setdefault("sources", {})[f.name] = {k: versions[k] for k in ("git_commit", "cpu", "cpus")
                                                       if k in versions}
            entry.update(judge=payload.get("judge"), sample_counts=payload.get("sample_counts"),
                         config=payload.get("config"), versions=payload.get("versions"))
    if not out:
        raise SystemExit(f"{root}: no exp1/exp2/exp3 result files (expected {', '.join(EXPERIMENT_DIRS.values())})")
    return out


# ---------------------------------------------------------------------------------------------
# Verdicts per judge


def verdicts(ev: Mapping, rate: str, judge=None) -> list[bool]:
    """Per-item outcomes of an evaluation: refused (harmful / benign records; re-judged with
    `sst_jax.eval.scoring.rescore` when a judge is given) or correct (utility)."""
    if rate == "utility":
        return [bool(r["correct"]) for r in ev["records"]["utility"]]
    records = ev["records"] if judge is None else rescore(ev, judge)[1]
    return [bool(r["refused"]) for r in records.get(RATE_RECORDS[rate]) or []]


class JudgedRecords:
    """Memoised verdicts: each evaluation is re-judged once per judge, whatever the tables ask."""

    def __init__(self, judges: Mapping[str, Any]):
        self.judges = dict(judges)
        self._memo: dict[tuple, dict] = {}

    def __call__(self, ev: Mapping, rate: str, judge_name: str) -> list[bool]:
        if rate == "utility":
            return verdicts(ev, rate)
        key = (id(ev), judge_name)
        if key not in self._memo:
            self._memo[key] = {"records": rescore(ev, self.judges[judge_name])[1]}
        return verdicts(self._memo[key], rate)


# ---------------------------------------------------------------------------------------------
# Statistics


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1)."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    m = len(p)
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def mean_sd(values: Iterable[float]) -> dict:
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if arr.size > 1 else None, "n": int(arr.size)}


def paired(a_by_seed: Mapping[str, list[bool]], b_by_seed: Mapping[str, list[bool]], *, seed: int = 0) -> dict:
    """SST (a) vs another configuration (b) on the same items, seeds concatenated, plus the
    per-seed rate differences."""
    seeds = [s for s in a_by_seed if s in b_by_seed]
    a = [x for s in seeds for x in a_by_seed[s]]
    b = [x for s in seeds for x in b_by_seed[s]]
    comp = paired_comparison(a, b, seed=seed)
    per_seed = [float(np.mean(a_by_seed[s]) - np.mean(b_by_seed[s])) for s in seeds if a_by_seed[s]]
    return {"n": comp.n, "seeds": seeds, "a_only": comp.a_only, "b_only": comp.b_only,
            "difference": comp.difference.as_dict(), "mcnemar_p": comp.mcnemar_p,
            "per_seed_difference": mean_sd(per_seed)}


# ---------------------------------------------------------------------------------------------
# Tables


def exp3_configurations(study: Mapping) -> dict[str, dict[str, dict]]:
    """{config name: {seed: ev}} of exp3 (method@α) plus exp1's extra configurations."""
    out: dict[str, dict[str, dict]] = {}
    for exp in ("exp1", "exp3"):
        for seed, res in study.get(exp, {}).get("results", {}).items():
            for name, ev in res.get("configurations", {}).items():
                out.setdefault(name, {})[seed] = ev
    return out


def patch_norms(study: Mapping) -> dict[str, dict[str, float]]:
    """{config name: {seed: ‖ΔW_merged − ΔW_U‖_F}} from exp3's rows."""
    out: dict[str, dict[str, float]] = {}
    for seed, res in study.get("exp3", {}).get("results", {}).items():
        for row in res.get("rows", []):
            if row.get("patch_norm") is not None:
                out.setdefault(row["name"], {})[seed] = float(row["patch_norm"])
    return out


def method_alphas(study: Mapping) -> dict[str, list[float]]:
    cfg = study["exp3"]["config"]["exp3"]
    return {m: [float(a) for a in cfg["alphas"]] for m in cfg["methods"]}


def rates_table(configs: Mapping[str, Mapping[str, dict]], names: Sequence[str], judged: JudgedRecords,
                judge: str) -> list[dict]:
    rows = []
    for name in names:
        by_seed = configs.get(name)
        if not by_seed:
            continue
        row = {"name": name, "seeds": sorted(by_seed)}
        for rate in ("refusal", "over_refusal", "utility"):
            ests = [proportion(judged(ev, rate, judge)) for ev in by_seed.values()
                    if rate != "utility" or ev["records"].get("utility")]
            if ests and all(e.n for e in ests):
                row[rate] = pooled_proportion(ests).as_dict()
                row[f"{rate}_per_seed"] = mean_sd(e.value for e in ests)
        rows.append(row)
    return rows


def hypervolumes(study: Mapping) -> dict[str, dict]:
    """Per method: the per-seed 3-D / 2-D hypervolumes (exp3 summaries) with mean and sd."""
    out: dict[str, dict] = {}
    for seed, res in study.get("exp3", {}).get("results", {}).items():
        for method, s in res.get("summary", {}).items():
            e = out.setdefault(method, {"per_seed": {}})
            e["per_seed"][seed] = {"hypervolume": s.get("hypervolume"), "hypervolume_2d": s.get("hypervolume_2d")}
    for e in out.values():
        e["hypervolume"] = mean_sd(v["hypervolume"] for v in e["per_seed"].values())
        e["hypervolume_2d"] = mean_sd(v["hypervolume_2d"] for v in e["per_seed"].values())
    return out


def matched_alpha_tests(configs, alphas: Mapping[str, list[float]], judged: JudgedRecords, judge: str) -> list[dict]:
    rows = []
    for method, grid in alphas.items():
        if method == REFERENCE:
            continue
        for alpha in grid:
            a_name, b_name = f"{REFERENCE}@{alpha:g}", f"{method}@{alpha:g}"
            if a_name not in configs or b_name not in configs:
                continue
            row = {"method": method, "alpha": alpha, "sst": a_name, "other": b_name}
            for rate in ("refusal", "over_refusal", "utility"):
                a = {s: judged(ev, rate, judge) for s, ev in configs[a_name].items()}
                b = {s: judged(ev, rate, judge) for s, ev in configs[b_name].items()}
                row[rate] = paired(a, b)
            rows.append(row)
    _adjust(rows)
    return rows


def matched_norm_tests(configs, alphas, norms, judged: JudgedRecords, judge: str) -> list[dict]:
    """For each SST α and each other method: that method's α (same seed) whose safety-patch
    norm is closest to SST's; the pairs are then compared like matched_alpha_tests."""
    rows = []
    for method, grid in alphas.items():
        if method == REFERENCE:
            continue
        for alpha in alphas.get(REFERENCE, []):
            a_name = f"{REFERENCE}@{alpha:g}"
            if a_name not in norms:
                continue
            choice = {}
            for seed, n_sst in norms[a_name].items():
                options = [(abs(norms[f"{method}@{b:g}"][seed] - n_sst), b) for b in grid
                           if seed in norms.get(f"{method}@{b:g}", {})]
                if options:
                    choice[seed] = min(options)[1]
            if not choice:
                continue
            row = {"method": method, "sst_alpha": alpha, "other_alpha_per_seed": choice,
                   "sst_norm": mean_sd(norms[a_name][s] for s in choice),
                   "other_norm": mean_sd(norms[f"{method}@{choice[s]:g}"][s] for s in choice)}
            for rate in ("refusal", "over_refusal", "utility"):
                a = {s: judged(configs[a_name][s], rate, judge) for s in choice}
                b = {s: judged(configs[f"{method}@{choice[s]:g}"][s], rate, judge) for s in choice}
                row[rate] = paired(a, b)
            rows.append(row)
    _adjust(rows)
    return rows


def _adjust(rows: list[dict]) -> None:
    """Holm over the family of one table's tests, per rate."""
    for rate in ("refusal", "over_refusal", "utility"):
        tested = [r[rate] for r in rows if r[rate] is not None]
        for c, adj in zip(tested, holm([c["mcnemar_p"] for c in tested]) if tested else []):
            c["holm_p"] = adj


def ablation_table(study: Mapping, judged: JudgedRecords, judge: str) -> list[dict]:
    rows: dict[str, dict] = {}
    for seed, res in study.get("exp3", {}).get("results", {}).items():
        for r in res.get("fisher_ablation", []):
            e = rows.setdefault(r["label"], {"label": r["label"], "fisher_samples": r["fisher_samples"], "evs": {},
                                             "norms": []})
            e["evs"][seed] = {"records": r["records"]}
            if r.get("patch_norm") is not None:  # rows written since 2026-12-02
                e["norms"].append(float(r["patch_norm"]))
    out = []
    for e in rows.values():
        row = {"label": e["label"], "fisher_samples": e["fisher_samples"], "seeds": sorted(e["evs"]),
               "patch_norm": float(np.mean(e["norms"])) if e["norms"] else None}
        for rate in ("refusal", "over_refusal", "utility"):
            row[rate] = pooled_proportion([proportion(judged(ev, rate, judge)) for ev in e["evs"].values()]).as_dict()
        out.append(row)
    return sorted(out, key=lambda r: tuple(r["fisher_samples"]))


def exp2_table(study: Mapping) -> list[dict]:
    out: dict[tuple, dict] = {}
    for seed, res in study.get("exp2", {}).get("results", {}).items():
        alone = res.get("safety_alone", {}).get("metrics", {}).get("refusal")
        for n, block in res.get("results", {}).items():
            for method, m in block.get("methods", {}).items():
                e = out.setdefault((int(n), method), {"n_experts": int(n), "method": method,
                                                      "retention": [], "worst": [], "refusal": [], "over_refusal": [],
                                                      "alone": []})
                e["retention"].append(m["retention_mean"])
                e["worst"].append(m["retention_worst"])
                e["refusal"].append(m["refusal"])
                if m.get("over_refusal"):  # absent in runs made before exp2 measured it
                    e["over_refusal"].append(m["over_refusal"])
                if alone:
                    e["alone"].append(alone)
    rows = []
    for e in out.values():
        rows.append({"n_experts": e["n_experts"], "method": e["method"], "retention_mean": mean_sd(e["retention"]),
                     "retention_worst": min((w for w in e["worst"] if w is not None), default=None), "refusal": pooled_proportion(e["refusal"]).as_dict(),
                     "over_refusal": pooled_proportion(e["over_refusal"]).as_dict() if e["over_refusal"] else None,
                     "over_refusal_seeds": len(e["over_refusal"]),
                     "safety_alone_refusal": pooled_proportion(e["alone"]).as_dict() if e["alone"] else None})
    return sorted(rows, key=lambda r: (r["n_experts"], r["method"]))


# SST and its two N-expert variants: each is tested against every other exp2 method.
SST_FAMILY = ("sst", "sst_guard", "sst_multi")


def exp2_paired_tests(study: Mapping, judged: JudgedRecords, judge: str) -> list[dict]:
    """exp2 at each N: every SST-family method (a) against every other method (b) and the family
    among themselves, on the same items (harmful, benign, and the N domains' utility items),
    seeds concatenated; Holm over each N's table per rate."""
    evs: dict[tuple[int, str], dict[str, Mapping]] = {}
    for seed, res in study.get("exp2", {}).get("results", {}).items():
        for n, block in res.get("results", {}).items():
            for method, m in block.get("methods", {}).items():
                if m.get("evaluation", {}).get("records"):
                    evs.setdefault((int(n), method), {})[seed] = m["evaluation"]
    rows = []
    for n in sorted({n for n, _ in evs}):
        methods = sorted(m for k, m in evs if k == n)
        family = [m for m in SST_FAMILY if m in methods]
        pairs = [(a, b) for i, a in enumerate(family) for b in family[i + 1:]]
        pairs += [(a, b) for a in family for b in methods if b not in SST_FAMILY]
        table = []
        for a, b in pairs:
            row = {"n_experts": n, "method": a, "other": b}
            for rate in ("refusal", "over_refusal", "utility"):
                va = {s: judged(ev, rate, judge) for s, ev in evs[(n, a)].items()}
                vb = {s: judged(ev, rate, judge) for s, ev in evs[(n, b)].items()}
                both = [s for s in va if va[s] and vb.get(s)]  # runs before exp2 measured over-refusal: none
                row[rate] = paired({s: va[s] for s in both}, {s: vb[s] for s in both}) if both else None
            table.append(row)
        _adjust(table)
        rows += table
    return rows


def phase_times(study: Mapping) -> dict[str, dict]:
    return {exp: {f: t for f, t in e["timings"].items()} for exp, e in study.items()}


# ---------------------------------------------------------------------------------------------
# Report


def build_report(study: Mapping, judges: Mapping[str, Any], *, main_judge: str) -> dict:
    judged = JudgedRecords(judges)
    configs = exp3_configurations(study)
    alphas = method_alphas(study)
    norms = patch_norms(study)
    seeds = sorted({s for e in study.values() for s in e["results"]}, key=int)
    names = ["base", "safety_only", "utility_only"] + [f"{m}@{a:g}" for m, g in alphas.items() for a in g]
    report = {
        "seeds": seeds, "files": {exp: e["files"] for exp, e in study.items()},
        "judges": {name: getattr(j, "name", name) for name, j in judges.items()}, "main_judge": main_judge,
        "sample_counts": next(iter(study.values())).get("sample_counts"),
        "versions": next(iter(study.values())).get("versions"),
        "rates": {name: rates_table(configs, names, judged, name) for name in judges},
        "hypervolume": hypervolumes(study),
        "matched_alpha": matched_alpha_tests(configs, alphas, judged, main_judge),
        "matched_norm": matched_norm_tests(configs, alphas, norms, judged, main_judge),
        "fisher_ablation": ablation_table(study, judged, main_judge),
        "exp2": exp2_table(study),
        "exp2_paired": exp2_paired_tests(study, judged, main_judge),
        "timings_s": phase_times(study),
        "sources": {exp: dict(e.get("sources", {})) for exp, e in study.items()},
    }
    return report


def _pct(est: Mapping | None) -> str:
    if not est:
        return "–"
    return f"{100 * est['value']:.1f} [{100 * est['low']:.0f},{100 * est['high']:.0f}]"


def _pp(comp: Mapping) -> str:
    d = comp["difference"]
    return f"{100 * d['value']:+.1f} [{100 * d['low']:+.1f},{100 * d['high']:+.1f}]"


def _p(x: float) -> str:
    return f"{x:.2g}" if x >= 1e-3 else f"{x:.1e}"


def _ms(e: Mapping | None, scale: float = 1.0, digits: int = 3) -> str:
    if not e or e.get("mean") is None:
        return "–"
    sd = "" if e.get("sd") is None else f" ± {scale * e['sd']:.{digits}f}"
    return f"{scale * e['mean']:.{digits}f}{sd}"


def _comparison_cell(comp: Mapping | None) -> str:
    """A paired test as one table cell: difference [interval], McNemar p (Holm; per-seed mean ± sd)."""
    if comp is None:
        return "not measured"
    return (f"{_pp(comp)} p={_p(comp['mcnemar_p'])} (Holm {_p(comp['holm_p'])}; "
            f"{_ms(comp['per_seed_difference'], 100, 1)})")


def to_markdown(rep: Mapping) -> str:
    j = rep["main_judge"]
    lines = [f"# Study report (seeds {', '.join(map(str, rep['seeds']))}; judge for the tests: {rep['judges'][j]})", ""]
    sc = rep.get("sample_counts") or {}
    if sc:
        lines += [f"Sample counts (last seed): `{json.dumps({k: v for k, v in sc.items() if not isinstance(v, dict)})}`", ""]
    lines += ["## Rates pooled over seeds (%, 95 % Wilson interval of the summed counts)", ""]
    for judge, rows in rep["rates"].items():
        lines += [f"### judge: {rep['judges'][judge]}", ""]
        lines += [markdown_table(["configuration", "seeds", "refusal", "over-refusal", "utility"],
                                 [[r["name"], len(r["seeds"]), _pct(r.get("refusal")), _pct(r.get("over_refusal")),
                                   _pct(r.get("utility"))] for r in rows]), ""]
    lines += ["## Hypervolume per seed (mean ± sd over seeds)", "",
              markdown_table(["method", "3-D (refusal, 1 − over-refusal, utility)", "2-D (refusal, utility)", "seeds"],
                             [[m, _ms(e["hypervolume"]), _ms(e["hypervolume_2d"]), e["hypervolume"]["n"]]
                              for m, e in sorted(rep["hypervolume"].items(),
                                                 key=lambda kv: -(kv[1]["hypervolume"]["mean"] or 0))]), ""]
    for title, key, col in (("SST vs each method at the same α", "matched_alpha", "alpha"),
                            ("SST vs each method at the closest safety-patch norm ‖ΔW − ΔW_U‖_F", "matched_norm", "sst_alpha")):
        lines += [f"## {title}", "",
                  "Difference SST − other in points (paired bootstrap 95 % interval over the concatenated items); "
                  "exact McNemar p, Holm-adjusted over the table per rate; per-seed difference mean ± sd.", ""]
        rows = []
        for r in rep[key]:
            other = r.get("other") or ", ".join(f"s{s}:α={a:g}" for s, a in r["other_alpha_per_seed"].items())
            cells = [r["method"], f"{r[col]:g}", other]
            cells += [_comparison_cell(r[rate]) for rate in ("refusal", "over_refusal", "utility")]
            if key == "matched_norm":
                cells.append(f"{_ms(r['sst_norm'], 1, 2)} vs {_ms(r['other_norm'], 1, 2)}")
            cells.append(r["refusal"]["n"])
            rows.append(cells)
        header = ["vs", "SST α", "other", "Δ refusal", "Δ over-refusal", "Δ utility"]
        header += (["patch norm SST vs other"] if key == "matched_norm" else []) + ["n pairs (safety)"]
        lines += [markdown_table(header, rows), ""]
    if rep["fisher_ablation"]:
        lines += ["## Fisher-count ablation (harmful + benign samples)", "",
                  markdown_table(["configuration", "refusal", "over-refusal", "utility", "patch norm (mean over seeds)",
                                  "seeds"],
                                 [[r["label"], _pct(r["refusal"]), _pct(r["over_refusal"]), _pct(r["utility"]),
                                   format_number(r.get("patch_norm")), len(r["seeds"])]
                                  for r in rep["fisher_ablation"]]), ""]
    if rep["exp2"]:
        lines += ["## exp2: N experts + S", "",
                  markdown_table(["N", "method", "retention mean (± sd over seeds)", "worst task", "refusal", "over-refusal (seeds)",
                                  "S alone refusal"],
                                 [[r["n_experts"], r["method"], _ms(r["retention_mean"], 1, 2), format_number(r["retention_worst"], 2),
                                   _pct(r["refusal"]),
                                   f"{_pct(r['over_refusal'])} ({r['over_refusal_seeds']})" if r["over_refusal"] else "not measured",
                                   _pct(r["safety_alone_refusal"])] for r in rep["exp2"]]), ""]
    if rep.get("exp2_paired"):
        lines += ["## exp2: paired tests at N experts", "",
                  "Difference method − other in points on the same items (paired bootstrap 95 % interval); exact "
                  "McNemar p, Holm-adjusted over each N's table per rate; per-seed difference mean ± sd. Utility: "
                  "exact match on all N domains' held-out items.", ""]
        rows = []
        for r in rep["exp2_paired"]:
            cells = [r["n_experts"], r["method"], r["other"]]
            cells += [_comparison_cell(r[rate]) for rate in ("refusal", "over_refusal", "utility")]
            cells.append(r["refusal"]["n"] if r["refusal"] else 0)
            rows.append(cells)
        lines += [markdown_table(["N", "method", "vs", "Δ refusal", "Δ over-refusal", "Δ utility", "n pairs (safety)"],
                                 rows), ""]
    lines += ["## Wall time by phase (s)", ""]
    for exp, files in rep["timings_s"].items():
        for f, t in files.items():
            source = rep.get("sources", {}).get(exp, {}).get(f, {})
            where = "; ".join(str(source[k]) for k in ("git_commit", "cpu") if k in source)
            lines.append(f"- {exp} `{f}`: " + ", ".join(f"{k} {v:.0f}" for k, v in t.items())
                         + (f" ({where}, {source.get('cpus', '?')} CPUs)" if where else ""))
    return "\n".join(lines) + "\n"


def plot_fronts(path: Path, rep: Mapping) -> Path | None:
    """Pooled (refusal, over-refusal) and (refusal, utility) of every method's α sweep."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rep["rates"][rep["main_judge"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        if "@" in r["name"] and r.get("utility"):
            by_method.setdefault(r["name"].split("@")[0], []).append(r)
    for method, rs in sorted(by_method.items()):
        xs = [100 * r["refusal"]["value"] for r in rs]
        for ax, key in zip(axes, ("over_refusal", "utility")):
            ys = [100 * r[key]["value"] for r in rs]
            ax.plot(xs, ys, marker="o", label=method)
    for r in rows:
        if r["name"] in ("safety_only", "utility_only", "base") and r.get("refusal"):
            axes[0].scatter([100 * r["refusal"]["value"]], [100 * r["over_refusal"]["value"]], marker="x", color="k")
            axes[0].annotate(r["name"], (100 * r["refusal"]["value"], 100 * r["over_refusal"]["value"]), fontsize=7)
    axes[0].set(xlabel="refusal on harmful (%)", ylabel="over-refusal on benign (%) — lower is better")
    axes[1].set(xlabel="refusal on harmful (%)", ylabel="utility (%)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"α sweeps pooled over seeds {', '.join(map(str, rep['seeds']))}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_judges(names: Sequence[str]) -> dict[str, Any]:
    from experiments.runner import make_judge
    return {n: make_judge(n) for n in names}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pool a study's per-seed result files into one report.")
    parser.add_argument("--results_dir", default="results", help="The study's --output_dir (its exp*/ result files).")
    parser.add_argument("--output", default=None, help="Where the report goes (default: --results_dir).")
    parser.add_argument("--judges", default="keyword,rule",
                        help="Comma list of judges to re-score the records with (keyword, rule, semantic); "
                             "the first one is used for the paired tests.")
    args = parser.parse_args(argv)
    names = [n for n in args.judges.split(",") if n]
    study = load_study(args.results_dir)
    rep = build_report(study, make_judges(names), main_judge=names[0])
    out = Path(args.output or args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "study_report.json", json_safe(rep))
    write_text(out / "study_report.md", to_markdown(rep))
    plot_fronts(out / "study_fronts.png", rep)
    print(to_markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
