"""Top-level headline entries of a result JSON, under the method names users know.

The user's guide checks results with e.g. `jq '.["SST-Merge"]' exp3_results_*.json`, so every
result file carries, beside the full per-seed `results`, one top-level entry per method that
ran (`METHOD_ALIASES`; a method without an alias appears under its registry name) with the
experiment's headline numbers, and `headline_methods` {entry name: registry name}. A method
absent from a run gets no entry (never a null). Everything here is a pure function of the
payload `experiments/runner.py` builds before writing it; the entries are JSON-safe (an
infinite tax is the string "inf").

With several seeds the rates are pooled over the seeds' (disjoint) evaluation items (Wilson
interval of the summed counts) and the derived numbers (tax, composite, fronts, hypervolumes)
are computed from the pooled rates; each seed's own numbers are under `per_seed`. With one
seed the pooled numbers are that seed's. experiments/SCHEMA.md documents every field.
"""

from __future__ import annotations

from typing import Any, Mapping

from sst_jax.eval.metrics import pooled_proportion, safety_tax
from sst_jax.eval.report import MetricsReporter, json_safe

METHOD_ALIASES = {
    "sst": "SST-Merge",
    "task_arithmetic": "TA",
    "ties": "TIES",
    "dare_linear": "DARE",
    "dare_ties": "DARE-TIES",
    "agl": "AGL",
    "fisher": "Fisher",
    "sst_multi": "SST-Multi",
    "sst_guard": "SST-Guard",
    "magnitude_prune": "Magnitude-Prune",
}
RESERVED = {"schema_version", "experiment", "model", "model_source", "mode", "seeds", "config",
            "sample_counts", "judge", "timings_s", "versions", "results", "headline_methods"}
RATES = ("refusal", "over_refusal", "utility")


def headline_name(method: str) -> str:
    """The top-level key of `method`'s entry: its alias, else its registry name."""
    name = METHOD_ALIASES.get(method, method)
    return f"method:{name}" if name in RESERVED else name


def headline_entries(experiment: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """{entry name: headline summary} for every method in the payload's results, plus
    `headline_methods`. `payload` is what runner.run_model writes (its `results` per seed)."""
    per_seed = payload.get("results") or {}
    if not per_seed:
        return {}
    build = {"exp1": _exp1, "exp2": _exp2, "exp3": _exp3}.get(experiment)
    if build is None:
        raise ValueError(f"no headline entries for experiment {experiment!r}")
    by_method = build(per_seed)
    entries = {headline_name(m): json_safe({"method": m, "experiment": experiment,
                                             "seeds": [_seed(s) for s in per_seed], **e})
               for m, e in by_method.items()}
    entries["headline_methods"] = {headline_name(m): m for m in by_method}
    return entries


def _seed(s: str) -> int | str:
    return int(s) if str(s).lstrip("-").isdigit() else s


def _pooled(estimates: list) -> dict | None:
    estimates = [e for e in estimates if e]
    return pooled_proportion(estimates).as_dict() if estimates else None


def _rates(evaluations: list[dict]) -> dict:
    return {k: _pooled([ev["metrics"].get(k) for ev in evaluations]) for k in RATES}


# --- exp1: the safety tax per method --------------------------------------------------------


def _exp1(per_seed: Mapping[str, dict]) -> dict[str, dict]:
    seeds = list(per_seed)
    names = [n for n in per_seed[seeds[0]]["safety_tax"]]
    out = {}
    for name in names:
        method, _, alpha = name.partition("@")
        merged = _rates([per_seed[s]["configurations"][name] for s in seeds])
        before = _rates([per_seed[s]["configurations"]["utility_only"] for s in seeds])
        s_only = _rates([per_seed[s]["configurations"]["safety_only"] for s in seeds])
        tax = safety_tax(before["refusal"]["value"], merged["refusal"]["value"],
                         before["utility"]["value"], merged["utility"]["value"])
        taxes = {s: per_seed[s]["safety_tax"][name] for s in seeds}
        entry_tax = {"absolute": tax.absolute, "relative": tax.relative, "reason": tax.reason}
        if len(seeds) == 1:  # paired-bootstrap intervals exist per seed only
            only = taxes[seeds[0]]
            entry_tax.update(absolute_ci=only["absolute_ci"], relative_ci=only["relative_ci"],
                             n_resamples=only["n_resamples"])
        out[method] = {"configuration": name, "alpha": float(alpha) if alpha else None, **merged,
                       "safety_tax": entry_tax, "before": before, "safety_only": s_only,
                       "per_seed": {s: {"safety_tax": taxes[s]} for s in seeds}}
    return out


# --- exp2: retention per number of experts, per method --------------------------------------


def _exp2(per_seed: Mapping[str, dict]) -> dict[str, dict]:
    seeds = list(per_seed)
    methods: list[str] = []
    for s in seeds:
        for block in per_seed[s]["results"].values():
            methods += [m for m in block["methods"] if m not in methods]
    out = {}
    for method in methods:
        entry: dict[str, Any] = {"n_experts": [], "retention_mean": {}, "retention_worst": {},
                                 "refusal": {}, "refusal_retained": {}, "over_refusal": {}, "per_seed": {}}
        n_values = sorted({n for s in seeds for n, b in per_seed[s]["results"].items()
                           if method in b["methods"]}, key=int)
        s_alone = _pooled([per_seed[s]["safety_alone"]["metrics"].get("refusal") for s in seeds])
        for n in n_values:
            rows = {s: per_seed[s]["results"][n]["methods"][method] for s in seeds
                    if method in per_seed[s]["results"].get(n, {}).get("methods", {})}
            means = [r["retention_mean"] for r in rows.values() if r["retention_mean"] is not None]
            worsts = [r["retention_worst"] for r in rows.values() if r["retention_worst"] is not None]
            refusal = _pooled([r["refusal"] for r in rows.values()])
            entry["n_experts"].append(int(n))
            entry["retention_mean"][n] = sum(means) / len(means) if means else None
            entry["retention_worst"][n] = min(worsts) if worsts else None
            entry["refusal"][n] = refusal
            entry["over_refusal"][n] = _pooled([r.get("over_refusal") for r in rows.values()])
            entry["refusal_retained"][n] = (refusal["value"] / s_alone["value"]
                                            if refusal and s_alone and s_alone["value"] > 0 else None)
            for s, r in rows.items():
                entry["per_seed"].setdefault(s, {})[n] = {
                    k: r[k] for k in ("retention_mean", "retention_worst", "retention_per_task",
                                      "refusal", "refusal_retained", "over_refusal")
                    if k in r}
        entry["safety_alone_refusal"] = s_alone
        out[method] = entry
    return out


# --- exp3: the method's best configuration, α-sweep front and hypervolume --------------------


def _exp3(per_seed: Mapping[str, dict]) -> dict[str, dict]:
    seeds = list(per_seed)
    single = len(seeds) == 1
    first = per_seed[seeds[0]]
    baselines = [per_seed[s].get("baseline") for s in seeds]
    if all(baselines):
        before = {"safety": _pooled([b["safety"] for b in baselines]),
                  "utility": _pooled([b["utility"] for b in baselines])}
    else:  # results written before exp3 recorded its baseline: U alone's evaluation
        u = _rates([per_seed[s]["utility_only"] for s in seeds])
        before = {"safety": u["refusal"], "utility": u["utility"]}
    pooled = MetricsReporter(None, "exp3 pooled over seeds")
    pooled.set_baseline(before["safety"], before["utility"], label="U alone (utility_only)")
    methods = list(dict.fromkeys(r["method"] for r in first["rows"]))
    seed_rows: dict[tuple, dict] = {}
    for method in methods:
        for r in (r for r in first["rows"] if r["method"] == method):
            key = (method, r["alpha"])
            mine = [row for s in seeds for row in per_seed[s]["rows"]
                    if row["method"] == method and row["alpha"] == r["alpha"]]
            if single:
                seed_rows[key] = mine[0]
            pooled.add(method, r["alpha"], safety=_pooled([x["safety"] for x in mine]),
                       utility=_pooled([x["utility"] for x in mine]),
                       over_refusal=_pooled([x.get("over_refusal") for x in mine]))
    summary = pooled.summary()
    out = {}
    for method in methods:
        rows = [r for r in pooled.rows if r["method"] == method]
        s = summary[method]
        best = _best(rows, "composite" if s["best_composite"] is not None else "composite_2d")
        best_2d = _best(rows, "composite_2d")
        if single:  # a seed's own fields: tax intervals, patch norm, teacher-forced NLL
            extra = seed_rows[(method, best["alpha"])]
            best.update({k: extra.get(k) for k in ("name", "tax_absolute_ci", "tax_relative_ci",
                                                   "patch_norm", "refusal_nll")})
        front = set(s["pareto_alphas"] or [])
        out[method] = {
            "best": best, "best_2d": best_2d,
            "hypervolume": s["hypervolume"], "hypervolume_2d": s["hypervolume_2d"],
            "pareto_alphas": s["pareto_alphas"], "pareto_alphas_2d": s["pareto_alphas_2d"],
            "sweep": [{"alpha": r["alpha"], **{k: r[_ROW_KEY[k]]["value"] if r[_ROW_KEY[k]] else None
                                                for k in RATES},
                       "composite": r["composite"], "composite_2d": r["composite_2d"],
                       "tax_absolute": r["tax_absolute"], "on_front": r["alpha"] in front}
                      for r in rows],
            "baseline": before,
            "per_seed": {sd: per_seed[sd]["summary"][method] for sd in seeds
                         if method in per_seed[sd].get("summary", {})},
        }
    return out


_ROW_KEY = {"refusal": "safety", "over_refusal": "over_refusal", "utility": "utility"}


def _best(rows: list[dict], key: str) -> dict:
    r = max(rows, key=lambda row: row[key])
    return {"alpha": r["alpha"], "refusal": r["safety"], "over_refusal": r["over_refusal"],
            "utility": r["utility"], "selective_safety": r["selective_safety"],
            "composite": r["composite"], "composite_2d": r["composite_2d"],
            "tax_absolute": r["tax_absolute"], "tax_relative": r["tax_relative"],
            "distance_to_ideal": r["distance_to_ideal"], "distance_to_ideal_2d": r["distance_to_ideal_2d"]}
