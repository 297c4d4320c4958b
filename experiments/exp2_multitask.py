"""exp2: multi-expert interference. N utility experts on distinct domains plus the safety
adapter, merged by every method; per-task retention = merged accuracy / the expert's own
accuracy on its domain (mean and worst over tasks), refusal retained = merged refusal /
S-alone refusal and over-refusal on the benign test prompts (`exp2.over_refusal`, default on),
for each N."""

from __future__ import annotations

import numpy as np

from experiments.workbench import Workbench


def run(wb: Workbench) -> dict:
    cfg = wb.cfg["exp2"]
    n_values = [int(n) for n in cfg["n_experts"]]
    over_refusal = bool(cfg.get("over_refusal", True))
    if max(n_values) > len(wb.splits.domains):
        raise SystemExit(f"exp2 asks for {max(n_values)} experts but only {len(wb.splits.domains)} "
                         "utility domains exist")
    safety = wb.safety_adapter()
    # The same evaluation as exp1's "safety_only" (served from its cache when exp1 ran).
    safety_alone = wb.evaluate_adapter("safety_only", safety, domains=[wb.splits.domains[0]])
    s_ref = safety_alone["metrics"]["refusal"]["value"]
    experts_alone = {}
    by_n = {}
    for n in n_values:
        domains = list(wb.splits.domains[:n])
        experts = [wb.expert(d) for d in domains]
        for d, e in zip(domains, experts):
            if d not in experts_alone:
                experts_alone[d] = wb.evaluate_adapter(f"expert:{d}", e, domains=[d], refusal=False,
                                                       over_refusal=False, nll=False, mc=False)
        methods = {}
        for method in cfg["methods"]:
            res = wb.evaluate_merge(method, experts, [1.0] * n, safety=safety, alpha=1.0,
                                    domains=domains, over_refusal=over_refusal, nll=False, mc=False)
            per_domain = res["metrics"]["utility_per_domain"]
            retention = {d: _ratio(per_domain[d]["value"], experts_alone[d]["metrics"]["utility"]["value"])
                         for d in domains}
            finite = [v for v in retention.values() if v is not None]
            methods[method] = {
                "evaluation": res,
                "retention_per_task": retention,
                "retention_mean": float(np.mean(finite)) if finite else None,
                "retention_worst": float(np.min(finite)) if finite else None,
                "refusal": res["metrics"]["refusal"],
                "refusal_retained": _ratio(res["metrics"]["refusal"]["value"], s_ref),
                "over_refusal": res["metrics"].get("over_refusal"),
            }
        by_n[str(n)] = {"domains": domains, "methods": methods}
    return {"n_experts": n_values, "safety_alone": safety_alone, "experts_alone": experts_alone,
            "results": by_n}


def _ratio(a: float, b: float) -> float | None:
    return None if b <= 0 else float(a / b)
