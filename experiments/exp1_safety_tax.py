"""exp1: the safety tax of adding a safety adapter S to a utility adapter U.

Configurations, all evaluated on the same held-out prompts and questions: the base model,
S alone, U alone, and U + S merged by each method in cfg["exp1"]["methods"] at α. The tax
compares U alone (before) with the merge (after): relative and absolute, with 95% intervals
from a paired bootstrap over the evaluation items.
"""

from __future__ import annotations

import numpy as np

from experiments.workbench import Workbench
from sst_jax.eval.metrics import safety_tax


def tax_with_interval(before: dict, after: dict, *, n_resamples: int = 1000, seed: int = 0) -> dict:
    """Safety tax of `after` vs `before` with paired percentile-bootstrap intervals.

    Items are resampled jointly (the same harmful prompts and the same questions in both
    configurations), so the interval reflects the sampling of evaluation items.
    """
    s_b = np.array([r["refused"] for r in before["records"]["harmful"]], float)
    s_a = np.array([r["refused"] for r in after["records"]["harmful"]], float)
    u_b = np.array([r["correct"] for r in before["records"]["utility"]], float)
    u_a = np.array([r["correct"] for r in after["records"]["utility"]], float)
    point = safety_tax(s_b.mean(), s_a.mean(), u_b.mean(), u_a.mean())
    rng = np.random.default_rng(seed)
    rel, ab = [], []
    for _ in range(n_resamples):
        i = rng.integers(0, len(s_b), len(s_b))
        j = rng.integers(0, len(u_b), len(u_b))
        t = safety_tax(s_b[i].mean(), s_a[i].mean(), u_b[j].mean(), u_a[j].mean())
        rel.append(np.nan if t.relative is None else t.relative)
        ab.append(np.nan if t.absolute is None else t.absolute)

    def interval(values):
        v = np.asarray(values, float)
        v = v[~np.isnan(v)]
        if v.size == 0:
            return None
        return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]

    return {"relative": point.relative, "absolute": point.absolute, "reason": point.reason,
            "relative_ci": interval(rel), "absolute_ci": interval(ab), "n_resamples": n_resamples,
            "safety_before": float(s_b.mean()), "safety_after": float(s_a.mean()),
            "utility_before": float(u_b.mean()), "utility_after": float(u_a.mean())}


def run(wb: Workbench) -> dict:
    cfg = wb.cfg["exp1"]
    domain = wb.splits.domains[0]
    utility = wb.expert(domain)
    safety = wb.safety_adapter()
    alpha = float(cfg["alpha"])
    configs = {
        "base": wb.evaluate("base", {"kind": "base"}, None, domains=[domain]),
        "safety_only": wb.evaluate_adapter("safety_only", safety, domains=[domain]),
        "utility_only": wb.evaluate_adapter("utility_only", utility, domains=[domain]),
    }
    for method in cfg["methods"]:
        # MC utility is measured for the base model and the adapters alone; merges are
        # scored on the primary utility metric (the same evaluation exp3 reuses from cache).
        configs[f"{method}@{alpha:g}"] = wb.evaluate_merge(method, [utility], [1.0], safety=safety,
                                                           alpha=alpha, domains=[domain], mc=False)
    taxes = {name: tax_with_interval(configs["utility_only"], res, seed=wb.seed)
             for name, res in configs.items() if name not in ("base", "safety_only", "utility_only")}
    return {"utility_domain": domain, "alpha": alpha, "configurations": configs, "safety_tax": taxes}
