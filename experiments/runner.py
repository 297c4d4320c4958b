"""Turns parsed flags into experiment runs: one Workbench per (model, seed), then exp1-exp3,
result files, and a summary table on stdout."""

from __future__ import annotations

import dataclasses
import logging as std_logging
import time
from pathlib import Path

import jax
from absl import logging

from experiments import exp1_safety_tax, exp2_multitask, exp3_baseline, report
from experiments.common import Cache, Timings, load_config, provenance, result_path, timestamp, write_result
from experiments.headlines import headline_entries
from experiments.workbench import Workbench, build_splits
from sst_jax.errors import CheckpointError, SstJaxError
from sst_jax.eval.judge import KeywordRefusalJudge, RefusalRuleJudge
from sst_jax.eval.semantic_judge import SemanticRefusalJudge
from sst_jax.fisher import default_chunk
from sst_jax.merge import get_method
from sst_jax.models import load_model
from sst_jax.pipeline import default_dtype, package_versions
from sst_jax.models.api import HUB_PRESETS, model_config
from sst_jax.models.memory import memory_plan
from sst_jax.models.distributed import is_primary, primary_only
from sst_jax.models.sharding import parse_mesh, place_model

EXPERIMENTS = {"exp1": exp1_safety_tax, "exp2": exp2_multitask, "exp3": exp3_baseline}
MODEL_GROUPS = {"all": ("mistral-7b", "llama-3.1-8b", "qwen-2.5-14b")}


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Everything a run needs from the command line, parsed and checked once."""

    models: tuple[str, ...]
    experiments: tuple[str, ...]
    mode: str
    config_path: str | None
    output_dir: str
    seed: int
    use_saved_adapters: bool
    dtype: str | None
    beavertails_path: str | None
    mmlu_path: str | None
    benign_path: str | None
    judge: str
    external_adapters: tuple[tuple[str, str], ...]
    export_adapters: bool
    log_file: str | None
    mesh: tuple[tuple[str, int], ...] = (("data", 1), ("fsdp", 1), ("tensor", 1))
    dry_run: bool = False
    device_gb: float | None = None
    seeds: tuple[int, ...] = ()  # --seeds: exactly these seeds instead of the config's (+ --seed)

    @classmethod
    def from_flags(cls, flags) -> "RunSettings":
        for name in ("config", "beavertails_path", "mmlu_path", "benign_path"):
            value = getattr(flags, name)
            if value and not Path(value).exists() and not (name != "config" and _looks_like_hub_id(value)):
                raise SstJaxError(f"--{name} {value}: no such file")
        return cls(models=MODEL_GROUPS.get(flags.model, (flags.model,)),
                   experiments=tuple(EXPERIMENTS) if flags.experiment == "all" else (flags.experiment,),
                   mode=flags.mode, config_path=flags.config, output_dir=flags.output_dir, seed=flags.seed,
                   use_saved_adapters=flags.use_saved_adapters, dtype=flags.dtype,
                   beavertails_path=flags.beavertails_path, mmlu_path=flags.mmlu_path, benign_path=flags.benign_path,
                   judge=flags.judge, external_adapters=tuple(parse_adapter_flags(flags.safety_adapter,
                                                                                  flags.utility_adapters).items()),
                   export_adapters=flags.export_adapters, log_file=flags.log_file,
                   # A dry run plans for the mesh it is given, not for this host's devices.
                   mesh=tuple(parse_mesh(flags.mesh, n_devices=(1 << 30) if flags.dry_run and flags.mesh else None).items()),
                   dry_run=flags.dry_run, device_gb=flags.device_gb,
                   seeds=parse_seeds(flags.seeds))


def parse_seeds(values) -> tuple[int, ...]:
    """--seeds 0,1,2 → (0, 1, 2); one-line error for anything that is not a distinct integer."""
    out = []
    for v in values or ():
        try:
            out.append(int(v))
        except ValueError:
            raise SstJaxError(f"--seeds: {v!r} is not an integer (expected e.g. --seeds 0,1,2)") from None
    if len(set(out)) != len(out):
        raise SstJaxError(f"--seeds: repeated seed in {','.join(map(str, out))}")
    return tuple(out)


def _looks_like_hub_id(value: str) -> bool:
    return value.count("/") == 1 and not value.startswith((".", "/"))


def run_from_flags(flags) -> int:
    settings = RunSettings.from_flags(flags)
    if settings.dry_run:
        for model_name in settings.models:
            print(dry_run_plan(model_name, settings).format())
        return 0
    log_path = attach_log_file(settings)
    written = []
    for model_name in settings.models:
        written += run_model(model_name, settings)
    print("\nresult files:")
    for path in written:
        print(f"  {path}")
    if log_path is not None:
        print(f"log: {log_path}")
    return 0


def attach_log_file(settings: RunSettings) -> Path | None:
    """Mirror the run's log into <output_dir>/logs/run-<time>.log (or --log_file); '' disables.
    In a multi-host run only process 0 writes it."""
    if settings.log_file == "" or not is_primary():
        return None
    path = Path(settings.log_file) if settings.log_file else Path(settings.output_dir) / "logs" / f"run-{timestamp()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = std_logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(std_logging.INFO)
    for flt in logging.get_absl_handler().filters:  # the same third-party filter as the console
        handler.addFilter(flt)
    std_logging.getLogger().addHandler(handler)
    logging.get_absl_logger().addHandler(handler)
    return path


def parse_adapter_flags(safety: str | None, utility: list[str]) -> dict[str, str]:
    """{'safety': dir, 'expert:<domain>': dir} from --safety_adapter / --utility_adapters."""
    out = {}
    if safety:
        out["safety"] = safety
    for entry in utility:
        domain, sep, path = entry.partition("=")
        if not sep or not domain or not path:
            raise SstJaxError(f"--utility_adapters entry {entry!r} is not DOMAIN=DIR")
        out[f"expert:{domain}"] = path
    for name, path in out.items():
        if not Path(path).is_dir():
            raise SstJaxError(f"adapter {name}: {path} is not a directory (expected a PEFT adapter folder)")
    return out


def make_judge(name: str):
    if name == "keyword":
        return KeywordRefusalJudge()
    if name == "rule":
        return RefusalRuleJudge()
    if name == "semantic":  # the shipped weights; loads its own float32 feature model
        return SemanticRefusalJudge.load()
    raise SstJaxError(f"unknown judge {name!r}")


def run_model(model_name: str, settings: RunSettings) -> list[Path]:
    cfg = load_config(settings.mode, model_name, settings.config_path)
    check_methods(cfg)
    external_adapters = dict(settings.external_adapters)
    given_domains = [k.split(":", 1)[1] for k in external_adapters if k.startswith("expert:")]
    if given_domains:  # user-supplied experts come first (exp1/exp3's U is the first)
        cfg["utility_domains"] = given_domains + [d for d in cfg.get("utility_domains", []) if d not in given_domains]
    seeds = list(settings.seeds) or [settings.seed + s for s in cfg.get("seeds", [0])]
    out = Path(settings.output_dir)
    cache = Cache(out / "cache")
    judge = make_judge(settings.judge)
    # Data and splits first (cheap, and a bad data file must fail before the model loads).
    splits_by_seed = {s: build_splits(cfg, seed=s, beavertails_path=settings.beavertails_path,
                                      mmlu_path=settings.mmlu_path, benign_path=settings.benign_path)
                      for s in seeds}
    t0 = time.perf_counter()
    model = place_model(load_base(model_name, settings.dtype), dict(settings.mesh))
    logging.info("loaded %s in %.1fs", model_name, time.perf_counter() - t0)
    benches = {}
    for s in seeds:
        wb = Workbench(model, cfg, splits_by_seed[s], cache, seed=s, timings=Timings(),
                       use_saved_adapters=settings.use_saved_adapters, judge=judge,
                       external_adapters=external_adapters,
                       export_dir=(out / "adapters" / model_name.replace("/", "_")) if settings.export_adapters else None)
        wb.check_external_adapters()  # every user adapter checked before any training or generation
        benches[s] = wb
    written = []
    for exp in settings.experiments:
        per_seed = {}
        timings = Timings()
        start = time.perf_counter()
        for s, wb in benches.items():
            wb.timings = timings
            logging.info("%s: seed %d", exp, s)
            per_seed[str(s)] = EXPERIMENTS[exp].run(wb)
        timings.seconds["total"] = round(time.perf_counter() - start, 3)
        payload = {
            "experiment": exp, "model": model_name, "model_source": str(model.source), "mode": settings.mode,
            "seeds": seeds, "config": cfg, "sample_counts": splits_by_seed[seeds[-1]].describe(),
            "judge": settings.judge, "timings_s": timings.seconds, "versions": package_versions() | provenance(),
            "results": per_seed,
        }
        payload.update(headline_entries(exp, payload))
        path = write_result(result_path(out, exp, model_name, settings.mode), payload)
        primary_only(report.write_reports, exp, payload, path.parent, name=f"reports in {path.parent}")
        report.print_summary(exp, payload)
        written.append(path)
    return written


def dry_run_plan(model_name: str, settings: RunSettings):
    """The memory plan of this run's heaviest phases for one model, without loading weights."""
    cfg = load_config(settings.mode, model_name, settings.config_path)
    config = model_config(model_name)
    lcfg, tcfg, gcfg, fcfg = cfg["lora"], cfg["train_safety"], cfg["generation"], cfg["fisher"]
    top = lcfg.get("layers_from_top")
    layers = None if not top or top >= config.n_layers else range(config.n_layers - int(top), config.n_layers)
    dtype = settings.dtype or default_dtype()
    device_bytes = int(settings.device_gb * 1e9) if settings.device_gb else device_memory_bytes()
    # Fisher chunk: the config's, else default_chunk() of this backend, or of an accelerator when
    # --device_gb plans for a device other than this machine's.
    return memory_plan(config, mesh_shape=dict(settings.mesh), dtype=dtype, lora_r=int(lcfg["r"]),
                       lora_targets=tuple(lcfg["targets"]), lora_layers=None if layers is None else list(layers),
                       batch_size=int(tcfg["batch_size"]), seq_len=int(tcfg.get("max_length", 512)),
                       fisher_chunk=int(fcfg.get("chunk") or default_chunk("gpu" if settings.device_gb else None)),
                       gen_batch=int(gcfg["batch_size"]),
                       max_new_tokens=int(gcfg["max_new_tokens"]), device_bytes=device_bytes, name=model_name)


def device_memory_bytes() -> int:
    """The first device's memory (80 GB when the backend does not say, e.g. on CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("bytes_limit", 80e9))


def check_methods(cfg: dict) -> None:
    """Every configured method and hyper-parameter exists and has the right type (before any work)."""
    for exp in EXPERIMENTS:
        for method in cfg.get(exp, {}).get("methods", []):
            get_method(method)
    for method, hp in cfg.get("hparams", {}).items():
        get_method(method).parse_hparams(hp)
    if cfg.get("safety_adapter", "selective") not in ("selective", "refusal_only"):
        raise SstJaxError(f"config safety_adapter must be 'selective' or 'refusal_only', got {cfg['safety_adapter']!r}")


def load_base(model_name: str, dtype: str | None):
    """The base model; a hub preset that cannot be fetched here says what to do in one line."""
    try:
        return load_model(model_name, dtype=dtype or default_dtype())
    except CheckpointError as err:
        if model_name in HUB_PRESETS:
            raise CheckpointError(f"--model {model_name} ({HUB_PRESETS[model_name]}) needs the Hugging Face hub "
                                  "(network; for Llama an accepted licence and `huggingface-cli login`) or a local "
                                  "copy (pass its folder as --model). Offline, run the embedded default: "
                                  "--model smollm2-135m") from err
        raise
