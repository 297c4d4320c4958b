"""exp3: method comparison. The same utility adapter U and safety adapter S merged by every
method over an α sweep; each configuration's safety (refusal on held-out harmful prompts),
over-refusal, utility (MC accuracy) and tax; per method the best composite, the Pareto front
and the hypervolume of its α-sweep front; paired tests against task arithmetic."""

from __future__ import annotations

from experiments.exp1_safety_tax import tax_with_interval
from experiments.workbench import Workbench
from sst_jax.eval.metrics import (composite_score, distance_to_ideal, hypervolume_2d,
                                  paired_comparison, pareto_front)


def run(wb: Workbench) -> dict:
    cfg = wb.cfg["exp3"]
    domain = wb.splits.domains[0]
    utility = wb.expert(domain)
    safety = wb.safety_adapter()
    before = wb.evaluate_adapter("utility_only", utility, domains=[domain])
    rows = []
    evaluations = {}
    for method in cfg["methods"]:
        for alpha in cfg["alphas"]:
            name = f"{method}@{float(alpha):g}"
            res = wb.evaluate_merge(method, [utility], [1.0], safety=safety, alpha=float(alpha),
                                    domains=[domain], mc=False)
            evaluations[name] = res
            m = res["metrics"]
            tax = tax_with_interval(before, res, seed=wb.seed)
            s, u = m["refusal"]["value"], m["utility"]["value"]
            rows.append({"method": method, "alpha": float(alpha), "safety": s, "utility": u,
                         "over_refusal": m["over_refusal"]["value"],
                         "safety_ci": [m["refusal"]["low"], m["refusal"]["high"]],
                         "utility_ci": [m["utility"]["low"], m["utility"]["high"]],
                         "refusal_nll": m.get("refusal_nll"),
                         "patch_norm": res.get("merge_report", {}).get("safety_patch_norm"),
                         "tax_relative": tax["relative"], "tax_absolute": tax["absolute"],
                         "composite": composite_score(s, u, tax["absolute"]),
                         "distance_to_ideal": distance_to_ideal(s, u)})
    summary = {}
    for method in cfg["methods"]:
        mine = [r for r in rows if r["method"] == method]
        points = [(r["safety"], r["utility"]) for r in mine]
        front = pareto_front(points)
        best = max(mine, key=lambda r: r["composite"])
        summary[method] = {"best_composite": best["composite"], "best_alpha": best["alpha"],
                           "pareto_alphas": [mine[i]["alpha"] for i in front],
                           "hypervolume": hypervolume_2d(points)}
    all_points = [(r["safety"], r["utility"]) for r in rows]
    global_front = [f"{rows[i]['method']}@{rows[i]['alpha']:g}" for i in pareto_front(all_points)]
    paired = {}
    for name, res in evaluations.items():
        method, alpha = name.split("@")
        ref = evaluations.get(f"task_arithmetic@{alpha}")
        if ref is None or method == "task_arithmetic":
            continue
        paired[name] = {
            "refusal_vs_ta": _paired(res, ref, "harmful", "refused", wb.seed),
            "utility_vs_ta": _paired(res, ref, "utility", "correct", wb.seed),
        }
    return {"utility_domain": domain, "alphas": cfg["alphas"], "rows": rows, "summary": summary,
            "pareto_front": global_front, "paired_vs_task_arithmetic": paired,
            "utility_only": before, "configurations": evaluations}


def _paired(a: dict, b: dict, records: str, field: str, seed: int) -> dict:
    xa = [r[field] for r in a["records"][records]]
    xb = [r[field] for r in b["records"][records]]
    cmp = paired_comparison(xa, xb, seed=seed)
    return {"n": cmp.n, "a_only": cmp.a_only, "b_only": cmp.b_only,
            "difference": cmp.difference.as_dict(), "mcnemar_p": cmp.mcnemar_p}
