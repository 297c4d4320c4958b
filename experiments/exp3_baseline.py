"""exp3: method comparison. The same utility adapter U and safety adapter S merged by every
method over an α sweep; each configuration's safety (refusal on held-out harmful prompts),
over-refusal, utility and tax. Rows, rankings and paired tests come from
`sst_jax.eval.report.MetricsReporter` (one implementation of the 3-D front over
(refusal, 1 − over-refusal, utility), its hypervolume and composite, with the 2-D ones beside
them); this file only evaluates and records."""

from __future__ import annotations

from experiments.exp1_safety_tax import tax_with_interval
from experiments.workbench import Workbench
from sst_jax.eval.report import MetricsReporter

REFERENCE = "task_arithmetic"  # paired tests are against TA at the same α
PAIRED = {"refusal_vs_ta": ("harmful", "refused"), "over_refusal_vs_ta": ("benign", "refused"),
          "utility_vs_ta": ("utility", "correct")}


def run(wb: Workbench) -> dict:
    cfg = wb.cfg["exp3"]
    domain = wb.splits.domains[0]
    utility = wb.expert(domain)
    safety = wb.safety_adapter()
    before = wb.evaluate_adapter("utility_only", utility, domains=[domain])
    reporter = MetricsReporter(None, "exp3")
    reporter.set_baseline(before["metrics"]["refusal"], before["metrics"]["utility"],
                          label="U alone (utility_only)")
    evaluations = {}
    for method in cfg["methods"]:
        for alpha in cfg["alphas"]:
            name = f"{method}@{float(alpha):g}"
            res = wb.evaluate_merge(method, [utility], [1.0], safety=safety, alpha=float(alpha),
                                    domains=[domain], mc=False)
            evaluations[name] = res
            m = res["metrics"]
            tax = tax_with_interval(before, res, seed=wb.seed)  # point tax = the reporter's
            reporter.add(method, float(alpha), safety=m["refusal"], utility=m["utility"],
                         over_refusal=m["over_refusal"], name=name,
                         tax_absolute_ci=tax["absolute_ci"], tax_relative_ci=tax["relative_ci"],
                         refusal_nll=m.get("refusal_nll"),
                         patch_norm=res.get("merge_report", {}).get("safety_patch_norm"))
    paired: dict[str, dict] = {}
    for name, res in evaluations.items():
        method, alpha = name.split("@")
        ref = evaluations.get(f"{REFERENCE}@{alpha}")
        if ref is None or method == REFERENCE:
            continue
        for key, (records, field) in PAIRED.items():
            entry = reporter.add_comparison(key.removesuffix("_vs_ta"), name, f"{REFERENCE}@{alpha}",
                                            [r[field] for r in res["records"][records]],
                                            [r[field] for r in ref["records"][records]], seed=wb.seed)
            paired.setdefault(name, {})[key] = {k: entry[k] for k in
                                                ("n", "a_only", "b_only", "difference", "mcnemar_p")}
    names = lambda front: [f"{f['method']}@{f['alpha']:g}" for f in front]  # noqa: E731
    ablation = fisher_ablation(wb, cfg.get("fisher_ablation"), utility, safety, domain)
    return {"utility_domain": domain, "alphas": cfg["alphas"], "baseline": reporter.baseline,
            "rows": reporter.rows, "summary": reporter.summary(),
            "pareto_front": names(reporter.global_front()),
            "pareto_front_2d": names(reporter.global_front_2d()),
            "paired_vs_task_arithmetic": paired, "utility_only": before,
            "configurations": evaluations, **({"fisher_ablation": ablation} if ablation else {})}


def fisher_ablation(wb: Workbench, acfg: dict | None, utility, safety, domain: str) -> list[dict]:
    """One method at one α with the Fishers estimated from each of `samples` harmful and benign
    samples (config "exp3.fisher_ablation": {"method", "alpha", "samples": [n or [n_h, n_b], ...]}): does the
    result hinge on the count? Rows carry the rates and the per-item records' labels."""
    if not acfg:
        return []
    method, alpha = acfg.get("method", "sst"), float(acfg.get("alpha", 1.0))
    rows = []
    for n in acfg["samples"]:  # n or [harmful, benign]
        n_h, n_b = (int(n), int(n)) if isinstance(n, (int, float)) else (int(n[0]), int(n[1]))
        res = wb.evaluate_merge(method, [utility], [1.0], safety=safety, alpha=alpha, domains=[domain],
                                mc=False, fisher_samples=(n_h, n_b))
        m, report = res["metrics"], res.get("merge_report", {})
        rows.append({"method": method, "alpha": alpha, "fisher_samples": [n_h, n_b], "label": res["label"],
                     "refusal": m["refusal"], "over_refusal": m["over_refusal"], "utility": m["utility"],
                     "samples_used": report.get("data", {}).get("samples"),
                     "patch_norm": report.get("safety_patch_norm"),
                     "records": res["records"]})
    return rows
