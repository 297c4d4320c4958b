"""`sst-merge` (= `python -m sst_jax`): merge your own PEFT adapters into one adapter.

  sst-merge --model smollm2-135m --utility ./math --safety ./safety --method sst --output ./merged
  sst-merge --config merge.yaml              # the same keys as the flags (YAML or JSON)
  sst-merge --list_methods                   # every method, its parameters and defaults
  sst-merge evaluate --model M --adapter DIR [--harmful F] [--benign F] [--utility F] --output DIR

Every input is checked before any compute; errors are one line (a traceback with
--verbosity=1 or SST_JAX_TRACEBACK=1) and leave no output folder.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml
from absl import flags, logging

from sst_jax import pipeline
from sst_jax.data import embedded
from sst_jax.errors import SstJaxError
from sst_jax.eval.scoring import score
from sst_jax.io_utils import atomic_write_json, atomic_write_text
from sst_jax.merge import get_method, list_methods
from sst_jax.models import load_model
from sst_jax.models.api import model_config
from sst_jax.models.memory import memory_plan
from sst_jax.models import distributed
from sst_jax.models.sharding import parse_mesh, place_model

HELP = {"-h", "--help", "-?", "--helpshort", "--helpfull"}


def _merge_flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    d = dict(flag_values=fv)
    flags.DEFINE_string("model", "smollm2-135m", "Base model: a preset (smollm2-135m [embedded, offline], tiny, "
                        "mistral-7b, llama-3.1-8b, qwen-2.5-14b), an HF checkpoint folder, a .gguf file or a hub id. "
                        "Must be the base the adapters were trained on (checked by architecture).", **d)
    flags.DEFINE_string("safety", None, "PEFT folder of the safety adapter S (added with weight --alpha).", **d)
    flags.DEFINE_multi_string("utility", [], "PEFT folder of a utility (task) adapter, optionally DIR:WEIGHT "
                              "(default weight 1). Repeat the flag or give a comma list.", **d)
    flags.DEFINE_multi_string("utility_data", [], "Data of each --utility adapter, in the same order (JSON/JSONL/"
                              "CSV/Parquet rows with 'prompt' and 'response'). Needed by fisher and sst_multi; "
                              "mixed into the benign Fisher F_b otherwise.", **d)
    flags.DEFINE_string("method", "sst", "Merge method (see --list_methods).", **d)
    flags.DEFINE_float("alpha", 1.0, "Weight of the safety adapter (for sst: of its projected part).", **d)
    flags.DEFINE_multi_string("set", [], "A method hyper-parameter as key=value (repeatable), e.g. --set k=32 "
                              "--set density=0.2; names and types are checked against the method's declaration. "
                              "chunk=N (data-aware methods): samples per vmapped Fisher gradient step, speed/memory "
                              "only (default: 4 on CPU, 16 on GPU/TPU).", **d)
    flags.DEFINE_string("harmful", None, "File of harmful prompts (field 'prompt', optional 'response' = the refusal "
                        "to reinforce; default: a refusal sentence). Default: the embedded HarmBench + Do-Not-Answer "
                        "training split.", **d)
    flags.DEFINE_string("benign", None, "File of benign prompts (field 'prompt', optional 'response'; default: the "
                        "base model's own answer). Default: the embedded benign look-alikes training split.", **d)
    flags.DEFINE_string("output", None, "Folder to write (must not exist unless --overwrite).", **d)
    flags.DEFINE_enum("format", "peft", ["peft", "hf"], "peft: a PEFT adapter folder (exact for low-rank methods, "
                      "SVD-truncated at --rank for dense ones); hf: the merged full model as HF safetensors.", **d)
    flags.DEFINE_integer("rank", None, "SVD truncation rank for methods whose result is dense (ties, dare_*, "
                         "fisher, magnitude_prune) when --format peft; the truncation error is reported.", **d)
    flags.DEFINE_string("config", None, "YAML or JSON file with the same keys as these flags (utility: a list of "
                        "DIR, DIR:WEIGHT or {path, weight, data}; set: a mapping). Flags given on the command line "
                        "override it.", **d)
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Compute dtype (default: float32 on CPU, "
                      "bfloat16 on GPU/TPU).", **d)
    flags.DEFINE_integer("seed", 0, "Seed for data order, DARE masks and sampled labels.", **d)
    flags.DEFINE_integer("fisher_samples", 64, "Harmful and benign samples for data-aware methods' Fishers.", **d)
    flags.DEFINE_string("cache_dir", None, "Cache statistics (Fishers, base answers) by content here, so an α "
                        "sweep or a rerun computes them once (default: none).", **d)
    flags.DEFINE_bool("list_methods", False, "List every merge method with its parameters and defaults, then exit.",
                      **d)
    flags.DEFINE_bool("evaluate", False, "After merging, score the result and each input adapter alone on held-out "
                      "prompts (the embedded test splits; utility NLL on the last 20%% of each --utility_data): "
                      "refusal, over-refusal, utility NLL; printed and saved in merge_report.json.", **d)
    flags.DEFINE_integer("eval_samples", 32, "Held-out harmful and benign prompts scored by --evaluate.", **d)
    flags.DEFINE_bool("overwrite", False, "Replace an existing --output folder (atomically).", **d)
    flags.DEFINE_bool("accept_base_mismatch", False, "Merge even when an adapter's recorded base model differs "
                      "from --model in architecture (at your own risk).", **d)
    flags.DEFINE_string("mesh", None, "Device mesh data=D,fsdp=F,tensor=T for the base weights (default: every "
                        "local device on data; FSDP/tensor split a model that does not fit one device).", **d)
    flags.DEFINE_bool("dry_run", False, "Print the per-device memory plan of this merge (weights, Fisher pass at "
                      "--set chunk=N, else 8 samples in this plan; base-answer generation) for --model and --mesh, "
                      "and exit.", **d)
    flags.DEFINE_integer("verbosity", 0, "0: one-line errors, INFO logs off; 1: tracebacks and INFO logs.", **d)
    distributed.define_flags(fv)  # --coordinator_address, --num_processes, --process_id
    return fv


def _evaluate_flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    d = dict(flag_values=fv)
    flags.DEFINE_string("model", "smollm2-135m", "Base model (as for the merge command).", **d)
    flags.DEFINE_string("adapter", None, "PEFT adapter folder to score (default: the base model alone).", **d)
    flags.DEFINE_string("harmful", None, "File of harmful prompts (default: the embedded test split).", **d)
    flags.DEFINE_string("benign", None, "File of benign prompts (default: the embedded test split).", **d)
    flags.DEFINE_string("utility", None, "File of (prompt, response) rows for utility NLL (optional).", **d)
    flags.DEFINE_integer("samples", 32, "Prompts per embedded set when no file is given.", **d)
    flags.DEFINE_integer("max_new_tokens", 32, "Tokens generated per response.", **d)
    flags.DEFINE_string("output", None, "Folder for scores.json (metrics + per-item records) and scores.md.", **d)
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Compute dtype.", **d)
    flags.DEFINE_integer("verbosity", 0, "0: one-line errors; 1: tracebacks and INFO logs.", **d)
    return fv


# ----------------------------------------------------------------------------- config


def _split_weight(entry: str) -> tuple[str, float]:
    path, sep, w = entry.rpartition(":")
    if sep:
        try:
            return path, float(w)
        except ValueError:
            pass
    return entry, 1.0


def merge_settings(fv: flags.FlagValues) -> dict:
    """One settings dict from --config (if any) and the flags; explicit flags win."""
    names = [n for n in fv if n not in ("config", "verbosity", "list_methods",  # multi-host flags: command line only
                                        "coordinator_address", "num_processes", "process_id")]
    settings = {n: fv[n].value for n in names}
    if fv.config:
        path = Path(fv.config)
        if not path.is_file():
            raise SstJaxError(f"--config {path}: no such file")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                cfg = yaml.safe_load(text) or {}
            else:
                cfg = json.loads(text)
        except Exception as e:  # noqa: BLE001 - yaml and json raise different types
            raise SstJaxError(f"--config {path}: cannot parse ({type(e).__name__}: {e})") from e
        if not isinstance(cfg, dict):
            raise SstJaxError(f"--config {path}: expected a mapping of flag names to values")
        unknown = sorted(set(cfg) - set(names) - {"hparams"})
        if unknown:
            raise SstJaxError(f"--config {path}: unknown keys {unknown}; valid keys are the flag names: {sorted(names)}")
        for key, value in cfg.items():
            key = "set" if key == "hparams" else key
            if not fv[key].present:
                settings[key] = _relative_to(path.parent, key, value)
    return settings


_INPUT_KEYS = ("model", "safety", "utility", "utility_data", "harmful", "benign")


def _relative_to(folder: Path, key: str, value: Any) -> Any:
    """Input paths in a config file are relative to the file's folder (where that path exists)."""
    if key not in _INPUT_KEYS or value is None:
        return value
    if isinstance(value, list):
        return [_relative_to(folder, key, v) for v in value]
    if isinstance(value, dict):
        return {k: (_relative_to(folder, key, v) if k in ("path", "data") else v) for k, v in value.items()}
    text = str(value)
    base, sep, weight = text.rpartition(":")
    candidate = base if sep and _is_number(weight) else text
    if not Path(candidate).is_absolute() and (folder / candidate).exists():
        return str(folder / candidate) + (f":{weight}" if candidate != text else "")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _utilities(settings: dict) -> tuple[list[str], list[float], list[str | None]]:
    entries = settings.get("utility") or []
    if isinstance(entries, str):
        entries = [entries]
    paths, weights, data = [], [], []
    for e in entries:
        if isinstance(e, dict):
            if "path" not in e:
                raise SstJaxError(f"utility entry {e} has no 'path'")
            paths.append(str(e["path"]))
            weights.append(float(e.get("weight", 1.0)))
            data.append(e.get("data"))
            continue
        for part in str(e).split(","):
            if part.strip():
                p, w = _split_weight(part.strip())
                paths.append(p)
                weights.append(w)
                data.append(None)
    extra = settings.get("utility_data") or []
    if isinstance(extra, str):
        extra = [extra]
    if extra:
        if len(extra) != len(paths):
            raise SstJaxError(f"--utility_data given {len(extra)} times for {len(paths)} --utility adapters "
                              "(one per adapter, in the same order)")
        data = list(extra)
    return paths, weights, data


def _hparams(value: Any) -> dict:
    if isinstance(value, dict):
        return dict(value)
    out = {}
    for item in value or []:
        key, sep, v = str(item).partition("=")
        if not sep or not key:
            raise SstJaxError(f"--set {item!r} is not key=value")
        out[key.strip()] = v.strip()
    return out


def list_methods_text() -> str:

    lines = []
    for name in list_methods():
        spec = get_method(name)
        kind = "exact factors" if spec.exact else "dense ΔW (needs --rank for PEFT)"
        data = f"; needs data: {', '.join(n for n in spec.needs if n != 'safety')}" if spec.data_aware else ""
        lines.append(f"{name}  [{kind}{data}]\n    {spec.summary}")
        for p in spec.params:
            lines.append(f"    --set {p.describe()}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- commands


def run_merge(argv: list[str]) -> int:
    fv = _merge_flags()
    fv(argv)
    _logging(fv.verbosity)
    distributed.initialize_from_flags(fv)  # before any JAX work; multi-host runs only
    if fv.list_methods:
        print(list_methods_text())
        return 0

    settings = merge_settings(fv)
    paths, weights, data = _utilities(settings)
    if not paths:
        raise SstJaxError("no utility adapter: pass --utility DIR (repeatable) or list them under 'utility' in --config")
    method = str(settings["method"])
    spec = get_method(method)
    hparams = spec.parse_hparams(_hparams(settings.get("set")))
    output = settings.get("output")
    if not output:
        raise SstJaxError("--output DIR is required (the merged adapter's folder)")
    if Path(output).exists() and not settings.get("overwrite"):
        raise SstJaxError(f"--output {output} exists; pass --overwrite to replace it")
    fmt, rank = settings.get("format", "peft"), settings.get("rank")
    if fmt == "peft" and not spec.exact and rank is None:
        raise SstJaxError(f"method {method!r} produces a dense ΔW: pass --rank N (SVD truncation, error reported) "
                          "or --format hf")
    if rank is not None and int(rank) <= 0:
        raise SstJaxError(f"--rank must be positive, got {rank}")
    mesh = parse_mesh(settings.get("mesh"))
    if fv.dry_run:
        plan = merge_plan(str(settings["model"]), mesh, hparams, settings)
        print(plan.format())
        return 0 if plan.fits else 3
    utility_data = None if not any(d is not None for d in data) else data
    evaluate = bool(settings.get("evaluate"))
    held_out = None
    if evaluate and utility_data is not None:
        utility_data, held_out = _split_held_out(utility_data)

    # Everything that can be checked without the model, before loading it (minutes at 7B).
    request = pipeline.check_request(utility=paths, safety=settings.get("safety"), method=method, weights=weights,
                                     harmful=settings.get("harmful"), benign=settings.get("benign"),
                                     utility_data=utility_data, hparams=hparams,
                                     fisher_samples=int(settings["fisher_samples"]))
    model = place_model(load_model(str(settings["model"]), dtype=settings.get("dtype") or pipeline.default_dtype()),
                        mesh)
    result = pipeline.merge_adapters(
        model, request=request, alpha=float(settings["alpha"]), seed=int(settings["seed"]),
        cache_dir=settings.get("cache_dir"), accept_base_mismatch=bool(settings.get("accept_base_mismatch")))
    extra = {"command": shlex.join(["sst-merge", *argv[1:]])}
    if evaluate:
        extra["evaluation"] = evaluate_against_inputs(model, result, request.utilities, request.safety, held_out,
                                                      n=int(settings.get("eval_samples") or 32),
                                                      seed=int(settings["seed"]))
        print(evaluation_table(extra["evaluation"]))
    out = pipeline.write_merge(result, output, format=fmt, rank=None if rank is None else int(rank), model=model,
                               overwrite=bool(settings.get("overwrite")), extra_report=extra)
    print(f"wrote {out} ({fmt}; {result.method}; {len(result.keys)} modules)")
    return 0


def merge_plan(model_name: str, mesh: dict, hparams: dict, settings: dict):
    """Memory plan of a merge: the Fisher pass (LoRA-sized core gradients; no optimizer) and the
    base-answer generation, on this mesh."""

    config = model_config(model_name)
    chunk = int(hparams.get("chunk", 8))
    return memory_plan(config, mesh_shape=mesh, dtype=settings.get("dtype") or pipeline.default_dtype(),
                       batch_size=chunk, seq_len=512, fisher_chunk=chunk, gen_batch=8,
                       max_new_tokens=pipeline.BENIGN_ANSWER_TOKENS, name=model_name)


def _split_held_out(datasets: list) -> tuple[list, list]:

    fit, held = [], []
    for i, d in enumerate(datasets):
        exs = pipeline.read_examples(d, f"utility data [{i}]", need_response=True)
        if len(exs) < pipeline.MIN_ROWS + 1:
            raise SstJaxError(f"--evaluate holds out the last 20% of each --utility_data; {d} has {len(exs)} rows, "
                              f"at least {pipeline.MIN_ROWS + 1} are needed")
        cut = max(1, len(exs) // 5)
        fit.append(exs[:-cut])
        held.append(exs[-cut:])
    return fit, held


def evaluate_against_inputs(model, result, utilities, safety, held_out, *, n: int, seed: int) -> dict:
    """Scores of the merge and of each input adapter alone (loaded adapters; and the base) on
    held-out prompts."""
    harmful = [p.text for p in embedded.harmful_prompts("test")][:n]
    benign = [p.text for p in embedded.benign_prompts("test")][:n]
    utility = [(e.prompt, e.response) for group in (held_out or []) for e in group]
    rows = {"base": None}
    for i, adapter in enumerate(utilities):
        rows[f"utility[{i}] alone"] = adapter
    if safety is not None:
        rows["safety alone"] = safety
    rows[f"merged ({result.method})"] = result.to_dense()
    out = {"n_harmful": len(harmful), "n_benign": len(benign), "n_utility": len(utility),
           "prompts": "embedded held-out test splits", "rows": {}}
    for label, deltas in rows.items():
        metrics, records = score(model, deltas, harmful=harmful, benign=benign, utility=utility, seed=seed, label=label)
        out["rows"][label] = {"metrics": metrics, "records": records}
    return out


def evaluation_table(ev: dict) -> str:
    lines = [f"held-out check (n = {ev['n_harmful']} harmful, {ev['n_benign']} benign, {ev['n_utility']} utility; "
             f"{ev['prompts']})", "", "| configuration | refusal % | over-refusal % | utility NLL |", "|---|---|---|---|"]
    for label, row in ev["rows"].items():
        m = row["metrics"]
        pct = lambda k: f"{100 * m[k]['value']:.1f} [{100 * m[k]['low']:.0f}, {100 * m[k]['high']:.0f}]" if k in m else ""  # noqa: E731
        nll = f"{m['utility_nll']:.3f}" if "utility_nll" in m else "n/a (no --utility_data)"
        lines.append(f"| {label} | {pct('refusal')} | {pct('over_refusal')} | {nll} |")
    return "\n".join(lines)


def run_evaluate(argv: list[str]) -> int:
    fv = _evaluate_flags()
    fv(argv)
    _logging(fv.verbosity)

    if not fv.output:
        raise SstJaxError("--output DIR is required (scores.json and scores.md are written there)")
    harmful = pipeline.read_examples(fv.harmful, "harmful")
    benign = pipeline.read_examples(fv.benign, "benign")
    utility = pipeline.read_examples(fv.utility, "utility", need_response=True) if fv.utility else None
    adapter = pipeline.load_adapter(fv.adapter, "adapter") if fv.adapter else None
    model = load_model(fv.model, dtype=fv.dtype or pipeline.default_dtype())
    h = [e.prompt for e in harmful] if harmful else [p.text for p in embedded.harmful_prompts("test")][:fv.samples]
    b = [e.prompt for e in benign] if benign else [p.text for p in embedded.benign_prompts("test")][:fv.samples]
    u = [(e.prompt, e.response) for e in utility] if utility else []
    metrics, records = score(model, adapter, harmful=h, benign=b, utility=u, max_new_tokens=fv.max_new_tokens,
                             label=fv.adapter or "base")
    ev = {"n_harmful": len(h), "n_benign": len(b), "n_utility": len(u),
          "prompts": "user files" if (harmful or benign) else "embedded held-out test splits",
          "rows": {fv.adapter or "base": {"metrics": metrics, "records": records}}}
    out = Path(fv.output)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "scores.json", {"model": fv.model, "adapter": fv.adapter, **ev})
    table = evaluation_table(ev)
    atomic_write_text(out / "scores.md", table + "\n")
    print(table)
    return 0


def _logging(verbosity: int) -> None:
    logging.set_verbosity(logging.INFO if verbosity >= 1 else logging.WARNING)
    for name in ("orbax", "jax", "transformers"):
        std_logging.getLogger(name).setLevel(std_logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    sub = argv[1] if len(argv) > 1 else None
    command = run_evaluate if sub == "evaluate" else run_merge
    args = [argv[0]] + (argv[2:] if sub == "evaluate" else argv[1:])
    if HELP & set(args[1:]):
        fv = _evaluate_flags() if sub == "evaluate" else _merge_flags()
        print(__doc__)
        print(fv.module_help(__name__))
        return 0
    verbose = os.environ.get("SST_JAX_TRACEBACK") == "1" or any(a.startswith("--verbosity=") and a != "--verbosity=0"
                                                                  for a in args)
    try:
        return command(args)
    except (SstJaxError, flags.Error, ValueError) as err:  # ours say what to do; ValueError: bad values
        if verbose:
            raise
        print(f"sst-merge: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


def run() -> None:
    """Console-script entry point."""
    try:
        sys.exit(main())
    except BrokenPipeError:  # `sst-merge --list_methods | head`
        sys.exit(0)
