"""What every experiment shares: configs, content-keyed caches, timers, result files."""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from absl import logging

from sst_jax.eval.report import json_safe
from sst_jax.io_utils import atomic_write_json, stable_hash
from sst_jax.models.distributed import agree, primary_only

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "configs"
EXPERIMENT_DIRS = {"exp1": "exp1_safety_utility", "exp2": "exp2_multitask", "exp3": "exp3_baseline"}
SCHEMA_VERSION = 2  # 2: headline entries per method at the top level; 3-D ranking (SCHEMA.md)


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(mode: str, model: str, override_path: str | None = None) -> dict:
    """configs/<mode>.json, then its per-model section, then --config FILE on top."""
    path = CONFIG_DIR / f"{mode}.json"
    config = json.loads(path.read_text())
    config = deep_merge(config, config.pop("models", {}).get(model, {}))
    if override_path:
        try:
            override = json.loads(Path(override_path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"--config {override_path}: cannot read JSON ({err})") from err
        config = deep_merge(config, override.pop("models", {}).get(model, {}) | override)
    config["mode"] = mode
    return config


def provenance() -> dict[str, Any]:
    """What a result file needs beyond package versions to say where its numbers came from: the
    source commit ("+dirty" when tracked files differ from it; "unknown" outside a git checkout)
    and the CPU, since XLA's CPU kernels differ between CPU models (BUILD_NOTES, reproducibility)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        # The first processor's block: "AMD EPYC" alone names several generations (AVX2 or AVX-512).
        block = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "model name" in fields:
            flags = set(fields.get("flags", "").split())
            isa = next((f for f in ("avx512f", "avx2", "avx") if f in flags), None)
            details = [f"family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields else None, isa]
            cpu = fields["model name"] + "".join(f", {d}" for d in details if d)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"git_commit": commit or "unknown", "cpu": cpu, "cpus": cpus}


class Cache:
    """Content-keyed cache: an entry's key is a hash of the recipe that produced it.

    Entries are written atomically, so an interrupted run leaves either a whole entry or
    none; re-running the same command finds the finished ones and continues. In a multi-host
    run process 0 writes them and every process reads them (`sst_jax.models.distributed`).
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def key(self, kind: str, recipe: Any) -> str:
        return f"{kind}-{stable_hash(recipe)}"

    def json_path(self, kind: str, recipe: Any) -> Path:
        return self.root / kind / f"{self.key(kind, recipe)}.json"

    def dir_path(self, kind: str, recipe: Any) -> Path:
        return self.root / kind / self.key(kind, recipe)

    def get_or_compute(self, kind: str, recipe: Any, compute: Callable[[], Any]) -> Any:
        path = self.json_path(kind, recipe)
        if agree(path.exists(), str(path)):
            try:
                return json.loads(path.read_text())["value"]
            except (json.JSONDecodeError, KeyError):
                logging.warning("cache entry %s is unreadable; recomputing", path)
        value = compute()
        primary_only(atomic_write_json, path, {"recipe": recipe, "value": value}, name=str(path))
        return value


class Timings:
    """Named wall-clock totals for the result JSON."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def result_path(output_dir: str | Path, experiment: str, model: str, mode: str) -> Path:
    safe_model = model.replace("/", "_")
    name = f"{experiment}_results_{safe_model}_{mode}_{timestamp()}.json"
    return Path(output_dir) / EXPERIMENT_DIRS[experiment] / name


def write_result(path: Path, payload: dict) -> Path:
    payload = json_safe({"schema_version": SCHEMA_VERSION, **payload})  # strict JSON: ∞ as "inf"
    primary_only(atomic_write_json, path, payload, name=f"result in {path.parent}")  # names carry each host's clock
    logging.info("wrote %s", path)
    return path
