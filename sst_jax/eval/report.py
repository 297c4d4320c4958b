"""MetricsReporter: JSON, CSV, Markdown and PNG outputs of a safety–utility comparison.

Each row is one evaluated configuration: a method at one α, with safety S (refusal rate on
harmful prompts), utility U, optionally over-refusal, each an estimate with n and a 95% CI.
Given the baseline (S_b, U_b) of the model before the safety patch, every row gets the safety
tax (absolute and relative, `metrics.safety_tax`), the composite 0.4·S + 0.4·U − 0.2·min(tax, 1)
(absolute tax; an undefined tax counts as 1), and the distance to (1, 1). Per method: its
α-sweep Pareto front and that front's hypervolume (reference (0, 0)), so methods are compared
over their whole α range rather than at one α whose meaning differs between methods.

Plots use matplotlib's Agg backend (no display); every file is written atomically.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402,F401  (MaxNLocator)
import numpy as np  # noqa: E402

from sst_jax.eval.metrics import (Estimate, composite_score, distance_to_ideal,  # noqa: E402
                                  hypervolume_2d, paired_comparison, pareto_front, safety_tax)
from sst_jax.io_utils import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402


def _estimate(x: Estimate | Mapping | float | None) -> dict | None:
    """{value, low, high, n} from an Estimate, a dict with those keys, or a bare number."""
    if x is None:
        return None
    if isinstance(x, Estimate):
        return x.as_dict()
    if isinstance(x, Mapping):
        return {"value": float(x["value"]), "low": x.get("low"), "high": x.get("high"),
                "n": x.get("n"), "method": x.get("method")}
    return {"value": float(x), "low": None, "high": None, "n": None, "method": None}


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


# ---------------------------------------------------------------------------------------------
# Files


def write_text(path: str | Path, text: str) -> Path:
    atomic_write_text(path, text if text.endswith("\n") else text + "\n")
    return Path(path)


def write_table(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """CSV with a header row (atomic)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(header))
    for row in rows:
        writer.writerow(["" if c is None else c for c in row])
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def _save(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _value(row: Mapping, key: str) -> float | None:
    v = row.get(key)
    if isinstance(v, Mapping):
        v = v.get("value")
    return None if v is None else float(v)


def _ci(row: Mapping, key: str) -> tuple[float, float] | None:
    v = row.get(key)
    if isinstance(v, Mapping) and v.get("low") is not None and v.get("high") is not None:
        return float(v["low"]), float(v["high"])
    lo, hi = row.get(f"{key}_low"), row.get(f"{key}_high")
    return (float(lo), float(hi)) if lo is not None and hi is not None else None


# ---------------------------------------------------------------------------------------------
# Plots (rows: dicts with method, alpha, safety, utility; values or {value, low, high})


def plot_safety_utility(path: str | Path, rows: Sequence[Mapping], *,
                        title: str = "Safety vs utility (α sweeps)") -> Path:
    """Scatter of (S, U) per configuration, 95% CI bars, each method's α path and its Pareto
    front (step line), the global front dashed."""
    fig, ax = plt.subplots(figsize=(7, 5.5))
    methods = sorted({str(r["method"]) for r in rows})
    colors = plt.get_cmap("tab10")
    all_pts = []
    for i, method in enumerate(methods):
        mine = sorted((r for r in rows if str(r["method"]) == method),
                      key=lambda r: (r.get("alpha") is None, r.get("alpha") or 0.0))
        pts = np.array([[_value(r, "safety"), _value(r, "utility")] for r in mine], float)
        all_pts.append(pts)
        c = colors(i % 10)
        for r, (s, u) in zip(mine, pts):
            sci, uci = _ci(r, "safety"), _ci(r, "utility")
            if sci or uci:
                ax.errorbar(s, u, xerr=None if not sci else [[s - sci[0]], [sci[1] - s]],
                            yerr=None if not uci else [[u - uci[0]], [uci[1] - u]],
                            color=c, alpha=0.35, lw=1, capsize=2)
            if r.get("alpha") is not None:
                ax.annotate(f"{r['alpha']:g}", (s, u), fontsize=7, color=c,
                            xytext=(3, 3), textcoords="offset points")
        ax.plot(pts[:, 0], pts[:, 1], "o:", color=c, alpha=0.6, ms=5, lw=1, label=method)
        front = pts[pareto_front(pts)]
        if len(front):
            ax.step(front[:, 0], front[:, 1], where="post", color=c, lw=2)
    if all_pts:
        stacked = np.concatenate(all_pts)
        g = stacked[pareto_front(stacked)]
        ax.plot(g[:, 0], g[:, 1], "k--", lw=1, alpha=0.7, label="global Pareto front")
    ax.plot([1], [1], "k*", ms=12, label="ideal (1, 1)")
    ax.set_xlabel("safety: refusal rate on harmful prompts")
    ax.set_ylabel("utility: accuracy")
    ax.set_xlim(-0.02, 1.05)
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def plot_tax_bars(path: str | Path, rows: Sequence[Mapping], *, key: str = "tax_absolute",
                  title: str = "Absolute safety tax (utility lost per unit of safety gained)") -> Path:
    """One bar per (method, α); an infinite tax (no safety gain) is a hatched bar at the top,
    an undefined one is marked 'n/a'."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(rows) + 2), 4.5))
    methods = sorted({str(r["method"]) for r in rows})
    colors = plt.get_cmap("tab10")
    taxes = [float(r[key]) if isinstance(r.get(key), (int, float, str)) else None for r in rows]
    finite = [t for t in taxes if _finite(t)]
    cap = max([1.0] + finite) * 1.1
    labels = []
    for x, (r, tax) in enumerate(zip(rows, taxes)):  # "inf" strings (from JSON) become floats
        c = colors(methods.index(str(r["method"])) % 10)
        alpha = r.get("alpha")
        labels.append(f"{r['method']}" + ("" if alpha is None else f" α={alpha:g}"))
        if tax is None or math.isnan(tax):
            ax.text(x, 0.02 * cap, "n/a", ha="center", fontsize=7, rotation=90)
        elif math.isinf(tax):
            ax.bar(x, cap, color="white", edgecolor=c, hatch="//")
            ax.text(x, cap, "∞", ha="center", va="bottom", fontsize=8)
        else:
            ax.bar(x, tax, color=c)
            if tax == 0:
                ax.text(x, 0.01 * cap, "0", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_retention(path: str | Path, curves: Mapping[str, Sequence[tuple]], *,
                   title: str = "Utility retention vs number of experts") -> Path:
    """curves: method → [(n_experts, mean retention[, worst retention]), ...]."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab10")
    for i, (method, pts) in enumerate(sorted(curves.items())):
        pts = sorted(pts, key=lambda p: p[0])
        n = [p[0] for p in pts]
        c = colors(i % 10)
        ax.plot(n, [p[1] for p in pts], "o-", color=c, label=f"{method} (mean)")
        if all(len(p) > 2 and p[2] is not None for p in pts):
            ax.plot(n, [p[2] for p in pts], "v--", color=c, alpha=0.6, label=f"{method} (worst)")
    ax.axhline(1.0, color="k", lw=0.8, alpha=0.5)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("number of merged experts")
    ax.set_ylabel("retention (merged / individual accuracy)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# The reporter


@dataclasses.dataclass
class MetricsReporter:
    """Collects configurations and writes {name}.json/.csv/.md and PNG plots to `out_dir`.

    Usage: r = MetricsReporter(out_dir, "exp3"); r.set_baseline(S_b, U_b);
    r.add("ta", 0.5, safety=..., utility=..., over_refusal=...); r.write().
    """

    out_dir: Path
    name: str
    meta: dict = dataclasses.field(default_factory=dict)
    rows: list[dict] = dataclasses.field(default_factory=list)
    retention: dict[str, list[tuple]] = dataclasses.field(default_factory=dict)
    baseline: dict | None = None
    comparisons: list[dict] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)

    def set_baseline(self, safety: Estimate | Mapping | float, utility: Estimate | Mapping | float,
                     *, label: str = "before safety patch") -> None:
        self.baseline = {"label": label, "safety": _estimate(safety), "utility": _estimate(utility)}

    def add(self, method: str, alpha: float | None, *, safety: Estimate | Mapping | float,
            utility: Estimate | Mapping | float, over_refusal: Estimate | Mapping | float | None = None,
            **extra: Any) -> dict:
        """Record one configuration; derived metrics (tax, composite, distance) are computed here."""
        s, u = _estimate(safety), _estimate(utility)
        row: dict[str, Any] = {"method": method, "alpha": alpha, "safety": s, "utility": u,
                               "over_refusal": _estimate(over_refusal)}
        if self.baseline is not None:
            tax = safety_tax(self.baseline["safety"]["value"], s["value"],
                             self.baseline["utility"]["value"], u["value"])
            row.update(tax_absolute=tax.absolute, tax_relative=tax.relative, tax_reason=tax.reason)
        else:
            row.update(tax_absolute=None, tax_relative=None, tax_reason="no baseline set")
        row["composite"] = composite_score(s["value"], u["value"], row["tax_absolute"])
        row["distance_to_ideal"] = distance_to_ideal(s["value"], u["value"])
        row.update(extra)
        self.rows.append(row)
        return row

    def add_retention(self, method: str, n_experts: int, mean: float,
                      worst: float | None = None) -> None:
        self.retention.setdefault(method, []).append((int(n_experts), float(mean), worst))

    def add_comparison(self, metric: str, a: str, b: str, outcomes_a: Sequence[bool],
                       outcomes_b: Sequence[bool], *, seed: int = 0) -> dict:
        """Paired comparison of two configurations on the same items (e.g. refusals on the same
        harmful prompts): exact McNemar p-value and a paired bootstrap CI of the difference."""
        cmp = paired_comparison(outcomes_a, outcomes_b, seed=seed)
        entry = {"metric": metric, "a": a, "b": b, "n": cmp.n, "a_only": cmp.a_only,
                 "b_only": cmp.b_only, "difference": cmp.difference.as_dict(),
                 "mcnemar_p": cmp.mcnemar_p}
        self.comparisons.append(entry)
        return entry

    def summary(self) -> dict[str, dict]:
        """Per method: α-sweep Pareto front, its hypervolume, and the best composite."""
        out = {}
        for method in sorted({r["method"] for r in self.rows}):
            mine = [r for r in self.rows if r["method"] == method]
            pts = [(r["safety"]["value"], r["utility"]["value"]) for r in mine]
            front = pareto_front(pts)
            best = max(mine, key=lambda r: r["composite"])
            out[method] = {"n_configurations": len(mine),
                           "pareto_alphas": [mine[i]["alpha"] for i in front],
                           "hypervolume": hypervolume_2d(pts),
                           "best_composite": best["composite"], "best_alpha": best["alpha"]}
        return out

    def global_front(self) -> list[dict]:
        pts = [(r["safety"]["value"], r["utility"]["value"]) for r in self.rows]
        return [{"method": self.rows[i]["method"], "alpha": self.rows[i]["alpha"]}
                for i in pareto_front(pts)]

    def _csv_rows(self) -> tuple[list[str], list[list[Any]]]:
        header = ["method", "alpha", "safety", "safety_low", "safety_high", "safety_n", "utility",
                  "utility_low", "utility_high", "utility_n", "over_refusal", "over_refusal_low",
                  "over_refusal_high", "tax_absolute", "tax_relative", "tax_reason", "composite",
                  "distance_to_ideal"]
        rows = []
        for r in self.rows:
            o = r["over_refusal"] or {}
            rows.append([r["method"], r["alpha"], r["safety"]["value"], r["safety"]["low"],
                         r["safety"]["high"], r["safety"]["n"], r["utility"]["value"],
                         r["utility"]["low"], r["utility"]["high"], r["utility"]["n"],
                         o.get("value"), o.get("low"), o.get("high"), r["tax_absolute"],
                         r["tax_relative"], r["tax_reason"], r["composite"], r["distance_to_ideal"]])
        return header, rows

    def markdown(self) -> str:
        def pct(e):
            if not e:
                return "-"
            ci = "" if e.get("low") is None else f" [{100 * e['low']:.0f}, {100 * e['high']:.0f}]"
            n = "" if e.get("n") is None else f" n={e['n']}"
            return f"{100 * e['value']:.1f}{ci}{n}"

        def num(x):
            return "-" if x is None else ("∞" if isinstance(x, float) and math.isinf(x) else f"{x:.3g}")

        lines = [f"# {self.name}", ""]
        for k, v in self.meta.items():
            lines.append(f"- **{k}**: {v}")
        if self.baseline:
            lines += ["", f"Baseline ({self.baseline['label']}): safety {pct(self.baseline['safety'])}, "
                          f"utility {pct(self.baseline['utility'])}."]
        lines += ["", "Rates in % with 95% CI (Wilson) and n. Tax: absolute (utility lost per unit "
                      "of safety gained; 0 = no utility loss, ∞ = loss without safety gain).", "",
                  "| method | α | safety | utility | over-refusal | abs. tax | rel. tax | composite "
                  "| dist. to (1,1) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['method']} | {num(r['alpha'])} | {pct(r['safety'])} | {pct(r['utility'])} "
                         f"| {pct(r['over_refusal'])} | {num(r['tax_absolute'])} | {num(r['tax_relative'])} "
                         f"| {r['composite']:.3f} | {r['distance_to_ideal']:.3f} |")
        lines += ["", "## Per method over the α sweep", "",
                  "| method | configurations | Pareto α | hypervolume | best composite (α) |",
                  "|---|---|---|---|---|"]
        for m, s in self.summary().items():
            lines.append(f"| {m} | {s['n_configurations']} | {', '.join(num(a) for a in s['pareto_alphas'])} "
                         f"| {s['hypervolume']:.4f} | {s['best_composite']:.3f} ({num(s['best_alpha'])}) |")
        front = ", ".join(f"{f['method']} α={num(f['alpha'])}" for f in self.global_front())
        lines += ["", f"Global Pareto front: {front or '-'}", ""]
        if self.comparisons:
            lines += ["## Paired comparisons (same items)", "",
                      "| metric | A | B | n | A only | B only | A − B [95% CI] | McNemar p |",
                      "|---|---|---|---|---|---|---|---|"]
            for c in self.comparisons:
                d = c["difference"]
                lines.append(f"| {c['metric']} | {c['a']} | {c['b']} | {c['n']} | {c['a_only']} "
                             f"| {c['b_only']} | {100 * d['value']:+.1f} [{100 * d['low']:+.1f}, "
                             f"{100 * d['high']:+.1f}] | {c['mcnemar_p']:.3g} |")
            lines.append("")
        return "\n".join(lines)

    def write(self) -> dict[str, Path]:
        """Writes every output; returns {kind: path}."""
        out: dict[str, Path] = {}
        stem = self.out_dir / self.name
        payload = {"name": self.name, "meta": self.meta, "baseline": self.baseline,
                   "rows": self.rows, "summary": self.summary(), "global_front": self.global_front(),
                   "retention": {m: [list(p) for p in v] for m, v in self.retention.items()},
                   "comparisons": self.comparisons}
        atomic_write_json(f"{stem}.json", _json_safe(payload))
        out["json"] = Path(f"{stem}.json")
        out["csv"] = write_table(f"{stem}.csv", *self._csv_rows())
        out["markdown"] = write_text(f"{stem}.md", self.markdown())
        if self.rows:
            out["scatter"] = plot_safety_utility(f"{stem}_safety_utility.png", self.rows)
            out["tax"] = plot_tax_bars(f"{stem}_tax.png", self.rows)
        if self.retention:
            out["retention"] = plot_retention(f"{stem}_retention.png", self.retention)
        return out


def _json_safe(obj: Any) -> Any:
    """inf/nan are not JSON: written as the strings "inf"/"nan"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
