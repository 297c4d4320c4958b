"""Per-experiment reports (Markdown, CSV, PNG via sst_jax.eval.report) and the stdout summary.

exp3's per-seed report is `MetricsReporter`'s own (rebuilt from the result rows, nothing
recomputed): one implementation of the rankings, in sst_jax/eval/report.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sst_jax.eval import report as eval_report


def _fmt(est: dict | None) -> str:
    if not est:
        return "-"
    return f"{100 * est['value']:.1f} [{100 * est['low']:.0f},{100 * est['high']:.0f}] n={est['n']}"


def format_number(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, str) and x in ("inf", "-inf", "nan"):
        x = float(x)
    if isinstance(x, float):
        return "∞" if x == float("inf") else f"{x:.{digits}g}"
    return str(x)


def summary_rows(exp: str, payload: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the experiment's headline table (one block per seed)."""
    rows: list[list[str]] = []
    if exp == "exp1":
        header = ["seed", "configuration", "refusal % [95% CI]", "over-refusal %", "utility %",
                  "MC utility %", "refusal NLL", "abs. tax", "rel. tax"]
        for seed, res in payload["results"].items():
            for name, ev in res["configurations"].items():
                m = ev["metrics"]
                tax = res["safety_tax"].get(name, {})
                rows.append([seed, name, _fmt(m.get("refusal")), _fmt(m.get("over_refusal")),
                             _fmt(m.get("utility")), _fmt(m.get("utility_mc")), format_number(m.get("refusal_nll")),
                             format_number(tax.get("absolute")), format_number(tax.get("relative"))])
    elif exp == "exp2":
        header = ["seed", "N", "method", "retention mean", "retention worst", "refusal %",
                  "refusal retained", "over-refusal %"]
        for seed, res in payload["results"].items():
            for n, block in res["results"].items():
                for method, r in block["methods"].items():
                    rows.append([seed, n, method, format_number(r["retention_mean"]), format_number(r["retention_worst"]),
                                 _fmt(r["refusal"]), format_number(r["refusal_retained"]),
                                 _fmt(r.get("over_refusal"))])
    else:
        header = ["seed", "method", "α", "refusal % [95% CI]", "over-refusal % [95% CI]",
                  "utility % [95% CI]", "abs. tax", "composite", "composite 2-D", "patch ‖ΔW‖"]
        for seed, res in payload["results"].items():
            for r in res["rows"]:
                rows.append([seed, r["method"], format_number(r["alpha"]), _fmt(r["safety"]),
                             _fmt(r["over_refusal"]), _fmt(r["utility"]), format_number(r["tax_absolute"]),
                             format_number(r["composite"]), format_number(r["composite_2d"]), format_number(r["patch_norm"])])
    return header, rows


def exp3_reporter(res: dict, name: str, *, meta: dict | None = None) -> eval_report.MetricsReporter:
    """The MetricsReporter behind one seed of exp3, rebuilt from its result object."""
    comparisons = [{"metric": key.removesuffix("_vs_ta"), "a": config, "b": f"task_arithmetic@{config.split('@')[1]}",
                    **cmp} for config, tests in res.get("paired_vs_task_arithmetic", {}).items()
                   for key, cmp in tests.items()]
    return eval_report.MetricsReporter.from_rows(None, name, res["rows"], baseline=res.get("baseline"),
                                                 comparisons=comparisons, meta=meta)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def print_summary(exp: str, payload: dict) -> None:
    header, rows = summary_rows(exp, payload)
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    print(f"\n== {exp} · {payload['model']} · {payload['mode']} · seeds {payload['seeds']} "
          f"· {payload['timings_s'].get('total', 0):.0f}s ==")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def write_reports(exp: str, payload: dict, directory: Path) -> None:
    """Markdown + CSV tables and the plots people would rather look at than read."""
    header, rows = summary_rows(exp, payload)
    stem = f"{exp}_{payload['model'].replace('/', '_')}_{payload['mode']}"
    eval_report.write_table(directory / f"{stem}.csv", header, rows)
    md = [f"# {exp} — {payload['model']} ({payload['mode']}, seeds {payload['seeds']})", "",
          markdown_table(header, rows), ""]
    if exp == "exp3":
        for seed, res in payload["results"].items():
            reporter = exp3_reporter(res, f"{stem}_seed{seed}", meta={"model": payload["model"],
                                     "mode": payload["mode"], "seed": seed})
            reporter.write(directory)  # {stem}_seed{seed}.md/.csv/.json and the PNG plots
            md += [f"## seed {seed}", "", f"Per-configuration table, fronts and paired tests: "
                   f"`{stem}_seed{seed}.md`.", "",
                   markdown_table(["method", "best composite (α)", "Pareto α", "hypervolume",
                                   "best composite 2-D (α)", "Pareto α 2-D", "hypervolume 2-D"],
                                  [[m, f"{format_number(s['best_composite'])} ({format_number(s['best_alpha'])})",
                                    ", ".join(format_number(a) for a in s["pareto_alphas"] or []),
                                    format_number(s["hypervolume"]),
                                    f"{format_number(s['best_composite_2d'])} ({format_number(s['best_alpha_2d'])})",
                                    ", ".join(format_number(a) for a in s["pareto_alphas_2d"]),
                                    format_number(s["hypervolume_2d"])]
                                   for m, s in res["summary"].items()]), "",
                   f"Global Pareto front (refusal, 1 − over-refusal, utility): "
                   f"{', '.join(res['pareto_front'])}", "",
                   f"Global Pareto front 2-D (refusal, utility): {', '.join(res['pareto_front_2d'])}", ""]
    if exp == "exp2":
        for seed, res in payload["results"].items():
            curves = {}
            for n, block in res["results"].items():
                for method, r in block["methods"].items():
                    curves.setdefault(method, []).append((int(n), r["retention_mean"], r["retention_worst"]))
            eval_report.plot_retention(directory / f"{stem}_seed{seed}_retention.png", curves)
    eval_report.write_text(directory / f"{stem}.md", "\n".join(md))
