"""Turns parsed flags into experiment runs: one Workbench per (model, seed), then exp1-exp3,
result files, and a summary table on stdout."""

from __future__ import annotations

import time
from pathlib import Path

from absl import logging

from experiments import exp1_safety_tax, exp2_multitask, exp3_baseline, report
from experiments.common import (Cache, Timings, load_config, package_versions, result_path,
                                write_result)
from experiments.workbench import Workbench, build_splits

EXPERIMENTS = {"exp1": exp1_safety_tax, "exp2": exp2_multitask, "exp3": exp3_baseline}
MODEL_GROUPS = {"all": ("mistral-7b", "llama-3.1-8b", "qwen-2.5-14b")}


def run_from_flags(flags) -> int:
    models = MODEL_GROUPS.get(flags.model, (flags.model,))
    experiments = tuple(EXPERIMENTS) if flags.experiment == "all" else (flags.experiment,)
    written = []
    for model_name in models:
        written += run_model(model_name, experiments, mode=flags.mode, config_path=flags.config,
                             output_dir=flags.output_dir, seed=flags.seed,
                             use_saved_adapters=flags.use_saved_adapters, dtype=flags.dtype,
                             beavertails_path=flags.beavertails_path, mmlu_path=flags.mmlu_path,
                             benign_path=flags.benign_path, judge=flags.judge,
                             external_adapters=parse_adapter_flags(flags.safety_adapter,
                                                                   flags.utility_adapters))
    print("\nresult files:")
    for path in written:
        print(f"  {path}")
    return 0


def parse_adapter_flags(safety: str | None, utility: list[str]) -> dict[str, str]:
    """{'safety': dir, 'expert:<domain>': dir} from --safety_adapter / --utility_adapters."""
    out = {}
    if safety:
        out["safety"] = safety
    for entry in utility:
        domain, sep, path = entry.partition("=")
        if not sep or not domain or not path:
            raise SystemExit(f"--utility_adapters entry {entry!r} is not DOMAIN=DIR")
        out[f"expert:{domain}"] = path
    for name, path in out.items():
        if not Path(path).is_dir():
            raise SystemExit(f"adapter {name}: {path} is not a directory (expected a PEFT adapter folder)")
    return out


def default_dtype() -> str:
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def make_judge(name: str):
    from sst_jax.eval.judge import KeywordRefusalJudge

    if name == "keyword":
        return KeywordRefusalJudge()
    raise SystemExit(f"unknown judge {name!r}")


def run_model(model_name: str, experiments, *, mode: str, config_path: str | None, output_dir: str,
              seed: int, use_saved_adapters: bool = True, dtype: str | None = None,
              beavertails_path=None, mmlu_path=None, benign_path=None, judge: str = "keyword",
              external_adapters: dict[str, str] | None = None) -> list[Path]:
    from sst_jax.models import load_model

    cfg = load_config(mode, model_name, config_path)
    external_adapters = dict(external_adapters or {})
    given_domains = [k.split(":", 1)[1] for k in external_adapters if k.startswith("expert:")]
    if given_domains:  # user-supplied experts come first (exp1/exp3's U is the first)
        cfg["utility_domains"] = given_domains + [d for d in cfg.get("utility_domains", []) if d not in given_domains]
    seeds = [seed + s for s in cfg.get("seeds", [0])]
    out = Path(output_dir)
    cache = Cache(out / "cache")
    t0 = time.perf_counter()
    model = load_model(model_name, dtype=dtype or default_dtype())
    logging.info("loaded %s in %.1fs", model_name, time.perf_counter() - t0)
    written = []
    for exp in experiments:
        per_seed = {}
        timings = Timings()
        start = time.perf_counter()
        for s in seeds:
            splits = build_splits(cfg, seed=s, beavertails_path=beavertails_path, mmlu_path=mmlu_path,
                                  benign_path=benign_path)
            wb = Workbench(model, cfg, splits, cache, seed=s, timings=timings,
                           use_saved_adapters=use_saved_adapters, judge=make_judge(judge),
                           external_adapters=external_adapters)
            logging.info("%s: seed %d", exp, s)
            per_seed[str(s)] = EXPERIMENTS[exp].run(wb)
        timings.seconds["total"] = round(time.perf_counter() - start, 3)
        payload = {
            "experiment": exp, "model": model_name, "model_source": str(model.source), "mode": mode,
            "seeds": seeds, "config": cfg, "sample_counts": splits.describe(),
            "judge": judge, "timings_s": timings.seconds, "versions": package_versions(),
            "results": per_seed,
        }
        path = write_result(result_path(out, exp, model_name, mode), payload)
        report.write_reports(exp, payload, path.parent)
        report.print_summary(exp, payload)
        written.append(path)
    return written
