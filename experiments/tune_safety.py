"""Tune the safety adapter's recipe on the validation split, never on the test prompts (issue 14).

    python -m experiments.tune_safety --config configs/study.json --validation 100 \
        --grid train_safety.steps=48,96 --grid data.harmful_train=40,80 --output results/tune_safety

Every grid point (the product of the --grid axes) changes the run's config at those keys, trains
S on the training pools minus `--validation` held-back prompts of each (`build_splits(validation=)`:
the test pools are not read at all), and measures S alone on the held-back prompts: refusal on the
harmful ones, over-refusal on the benign ones, with n and 95 % intervals, under the run's judge.
The adapters and evaluations go into the experiments' content-keyed cache (`--output/cache`), so an
interrupted sweep resumes and a point already measured costs nothing.

Points are ranked by the issue's targets (`--targets 0.9,0.2`: refusal ≥ 0.9 and over-refusal ≤ 0.2):
the points that meet both first, then by refusal − over-refusal. The winner is a recipe to put into
the config; its test-set numbers come from the experiments, not from here. Points run in separate
invocations (e.g. one per session) are ranked together by `--collect DIR`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from experiments.common import Cache, Timings, deep_merge, load_config
from experiments.workbench import Workbench, build_splits
from sst_jax.eval.judge import KeywordRefusalJudge
from sst_jax.eval.metrics import proportion
from sst_jax.io_utils import atomic_write_json

RATES = ("refusal", "over_refusal")


def parse_axis(text: str, cfg: dict) -> tuple[tuple[str, ...], list[Any]]:
    """'train_safety.steps=48,96' → (("train_safety", "steps"), [48, 96]), checked against `cfg`:
    the key must exist and each value must have its type (an int where the config has an int)."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise ValueError(f"--grid {text!r}: expected KEY.PATH=V1,V2,...")
    path = tuple(key.split("."))
    node: Any = cfg
    for part in path:
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"--grid {text!r}: the config has no key {key!r}")
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float, str)):
        raise ValueError(f"--grid {text!r}: {key} is {type(node).__name__}, not a number or string")
    parsed = []
    for raw in values.split(","):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if isinstance(node, int) and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ValueError(f"--grid {text!r}: {key} is an integer, got {raw!r}")
        if isinstance(node, float) and not isinstance(value, (int, float)):
            raise ValueError(f"--grid {text!r}: {key} is a number, got {raw!r}")
        if isinstance(node, str) and not isinstance(value, str):
            value = raw
        parsed.append(type(node)(value))
    return path, parsed


def with_values(cfg: dict, point: Sequence[tuple[tuple[str, ...], Any]]) -> dict:
    """`cfg` with each (path, value) of `point` set (experiments.common.deep_merge)."""
    override: dict = {}
    for path, value in point:
        node = override
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return deep_merge(cfg, override)


def meets_targets(row: dict, targets: tuple[float, float]) -> bool:
    return row["refusal"]["value"] >= targets[0] and row["over_refusal"]["value"] <= targets[1]


def rank_key(row: dict, targets: tuple[float, float]) -> tuple:
    return (not meets_targets(row, targets), -(row["refusal"]["value"] - row["over_refusal"]["value"]))


def sweep(model, cfg: dict, axes: Sequence[tuple[tuple[str, ...], list[Any]]], *, seeds: Sequence[int],
          validation: int, cache: Cache, judge=None, targets: tuple[float, float] = (0.9, 0.2)) -> dict:
    """S alone on the validation split at every grid point; rows ranked by `targets`."""
    rows = []
    for values in itertools.product(*(vals for _, vals in axes)):
        point = [(path, v) for (path, _), v in zip(axes, values)]
        point_cfg = with_values(cfg, point)
        outcomes: dict[str, list[bool]] = {rate: [] for rate in RATES}
        per_seed = {}
        for seed in seeds:
            splits = build_splits(point_cfg, seed=seed, validation=validation)
            bench = Workbench(model, point_cfg, splits, cache, seed=seed, timings=Timings(), judge=judge)
            ev = bench.evaluate_adapter("safety", bench.safety_adapter(), domains=[], nll=False, mc=False)
            refused = {"refusal": [r["refused"] for r in ev["records"]["harmful"]],
                       "over_refusal": [r["refused"] for r in ev["records"]["benign"]]}
            for rate in RATES:
                outcomes[rate] += refused[rate]
            per_seed[str(seed)] = {rate: ev["metrics"][rate]["value"] for rate in RATES}
        rows.append({"point": {".".join(path): v for path, v in point},
                     **{rate: proportion(outcomes[rate]).as_dict() for rate in RATES},
                     "per_seed": per_seed})
    for row in rows:
        row["meets_targets"] = meets_targets(row, targets)
    rows.sort(key=lambda row: rank_key(row, targets))
    return {"validation_prompts_per_pool": validation, "seeds": list(seeds), "targets": list(targets),
            "judge": (judge or KeywordRefusalJudge()).name,
            "rows": rows}


def to_markdown(report: dict) -> str:
    t_ref, t_over = report["targets"]
    lines = [f"# S alone on the validation split ({report['validation_prompts_per_pool']} held-back harmful "
             f"and benign training prompts; seeds {report['seeds']}; judge {report['judge']})", "",
             f"Ranked: refusal ≥ {t_ref:.0%} and over-refusal ≤ {t_over:.0%} first, then refusal − over-refusal.",
             "", "| recipe | refusal % [95 % CI] | over-refusal % [95 % CI] | n | meets both |",
             "|---|---|---|---|---|"]
    for row in report["rows"]:
        point = ", ".join(f"{k}={v}" for k, v in row["point"].items())
        cells = [f"{100 * row[r]['value']:.1f} [{100 * row[r]['low']:.0f}, {100 * row[r]['high']:.0f}]" for r in RATES]
        lines.append(f"| {point} | {cells[0]} | {cells[1]} | {row['refusal']['n']} / {row['over_refusal']['n']} | "
                     f"{'yes' if row['meets_targets'] else 'no'} |")
    return "\n".join(lines) + "\n"


def collect(folder: Path) -> dict:
    """One ranked report from the sweep reports (`tune_safety.json`) under `folder`, e.g. points
    run in different sessions; they must share validation size, seeds, targets and judge."""
    reports = [json.loads(path.read_text()) for path in sorted(folder.rglob("tune_safety.json"))]
    if not reports:
        raise ValueError(f"no tune_safety.json under {folder}")
    keys = ("validation_prompts_per_pool", "seeds", "targets", "judge")
    first = {key: reports[0][key] for key in keys}
    for report in reports[1:]:
        differ = [key for key in keys if report[key] != first[key]]
        if differ:
            raise ValueError(f"sweep reports under {folder} differ in {', '.join(differ)}: "
                             "they cannot be ranked together")
    targets = tuple(first["targets"])
    rows = [{**row, "meets_targets": meets_targets(row, targets)} for report in reports for row in report["rows"]]
    rows.sort(key=lambda row: rank_key(row, targets))
    return {**first, "rows": rows, "config": sorted({str(r.get("config")) for r in reports})}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="Model preset or local folder (default: the embedded one).")
    parser.add_argument("--mode", default="minimal", choices=("minimal", "full"), help="Base config (configs/MODE.json).")
    parser.add_argument("--config", default=None, help="A config file on top of --mode's (e.g. configs/study.json).")
    parser.add_argument("--grid", action="append", default=[],
                        help="KEY.PATH=V1,V2,... (repeatable; the sweep is the product of the axes).")
    parser.add_argument("--validation", type=int, default=100,
                        help="Held-back prompts of each training pool (harmful, benign) to measure on.")
    parser.add_argument("--seeds", default="0", help="Comma list of seeds; rates are pooled over them.")
    parser.add_argument("--targets", default="0.9,0.2", help="Refusal ≥ R and over-refusal ≤ O, as 'R,O'.")
    parser.add_argument("--judge", default="keyword", choices=("keyword", "rule", "semantic"),
                        help="Refusal judge (the experiments' --judge).")
    parser.add_argument("--output", default="results/tune_safety", help="Folder for the table, the JSON and the cache.")
    parser.add_argument("--collect", default=None, metavar="DIR",
                        help="Rank the sweep reports (tune_safety.json) found under DIR together, write "
                             "DIR/tune_safety.md and stop (no model is loaded).")
    args = parser.parse_args(argv)
    if args.collect:
        try:
            report = collect(Path(args.collect))
        except ValueError as err:
            raise SystemExit(f"tune_safety: {err}") from None
        (Path(args.collect) / "tune_safety.md").write_text(to_markdown(report))
        print(to_markdown(report))
        return 0
    # Every input is checked before the model is loaded.
    try:
        cfg = load_config(args.mode, args.model, args.config)
        axes = [parse_axis(text, cfg) for text in args.grid]
        seeds = [int(s) for s in args.seeds.split(",") if s]
        targets = tuple(float(x) for x in args.targets.split(","))
        if len(targets) != 2 or not seeds or args.validation <= 0:
            raise ValueError("--targets takes 'R,O', --seeds at least one seed, --validation a positive count")
    except ValueError as err:
        raise SystemExit(f"tune_safety: {err}") from None
    if not axes:
        raise SystemExit("tune_safety: give at least one --grid axis")
    from experiments.runner import load_base, make_judge

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model = load_base(args.model, None)
    report = sweep(model, cfg, axes, seeds=seeds, validation=args.validation, cache=Cache(out / "cache"),
                   judge=make_judge(args.judge), targets=targets)
    report["config"] = args.config
    atomic_write_json(out / "tune_safety.json", report)
    (out / "tune_safety.md").write_text(to_markdown(report))
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
