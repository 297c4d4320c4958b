"""Dataset loaders: BeaverTails and MMLU from hub ids (via `datasets`) or local files.

Local files (JSON list, JSONL, or Parquet) must use the hub schema exactly:
  BeaverTails: prompt (str), response (str), category (dict[str, bool]), is_safe (bool)
  MMLU:        question (str), subject (str), choices (list of 4 str), answer (int 0-3)
A local directory is searched for a file named after the split (`30k_test.jsonl`, ...).

Offline (HF_DATASETS_OFFLINE=1 or HF_HUB_OFFLINE=1) a hub id that is not in the local cache
fails at once with a DatasetError, instead of `datasets` spending ~47 s on retries.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from absl import logging

from sst_jax.errors import DatasetError

BEAVERTAILS_HUB_ID = "PKU-Alignment/BeaverTails"
MMLU_HUB_ID = "cais/mmlu"
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclasses.dataclass(frozen=True)
class MCQuestion:
    """A 4-way multiple-choice question in MMLU schema."""

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str
    source: str


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A user prompt; kind is "harmful" or "benign"; category is free text from the source."""

    text: str
    kind: str
    category: str
    source: str


@dataclasses.dataclass(frozen=True)
class GenExample:
    """A (prompt, response) pair for training or teacher-forced evaluation."""

    prompt: str
    response: str
    domain: str
    source: str


# ---------------------------------------------------------------------------------------------
# Reading rows


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a local JSON (list of objects, or {"data": [...]}), JSONL or Parquet file."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if suffix == ".json":
            obj = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(obj, dict) and isinstance(obj.get("data"), list):
                obj = obj["data"]
            if not isinstance(obj, list):
                raise DatasetError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
            return obj
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except (OSError, json.JSONDecodeError, ValueError) as err:
        raise DatasetError(f"cannot read {path}: {err}") from err
    raise DatasetError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl or .parquet")


def _local_file(path: Path, split: str) -> Path:
    if path.is_file():
        return path
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    for suffix in _LOCAL_SUFFIXES:
        candidate = path / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    raise DatasetError(f"directory {path} has no file for split {split!r} "
                       f"(looked for {split}.jsonl/.json/.parquet)")


def _offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    return any(os.environ.get(k, "").strip().lower() in truthy
               for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _in_hf_cache(hub_id: str) -> bool:
    """Whether `datasets` or the hub cache holds anything for hub_id (offline loads need it).

    `datasets` names its cache folder owner___name with the name snake-cased
    (PKU-Alignment___beaver_tails), so names are compared without '-' and '_'.
    """
    def norm(name: str) -> str:
        return name.lower().replace("-", "").replace("_", "")

    want = norm(hub_id.replace("/", "___"))
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    ds_cache = Path(os.environ.get("HF_DATASETS_CACHE", hf_home / "datasets"))
    hub_cache = Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub"))
    if ds_cache.is_dir() and any(norm(p.name) == want for p in ds_cache.iterdir()):
        return True
    return (hub_cache / f"datasets--{hub_id.replace('/', '--')}").is_dir()


def _hub_rows(hub_id: str, config: str | None, split: str, flag_hint: str) -> list[dict[str, Any]]:
    if _offline() and not _in_hf_cache(hub_id):
        raise DatasetError(
            f"dataset {hub_id!r} is not a local file and the hub is offline "
            f"(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE set, nothing in the HF cache). Pass a local "
            f".json/.jsonl/.parquet file in the same schema ({flag_hint}), or go online.")
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, config, split=split)
    except Exception as err:  # datasets raises many types; name the dataset in every case
        raise DatasetError(f"cannot load {hub_id!r} (config={config!r}, split={split!r}) "
                           f"from the hub: {err}") from err
    return [dict(r) for r in ds]


def _is_local(path_or_hub_id: str | os.PathLike) -> bool:
    p = Path(path_or_hub_id)
    return p.exists() or p.suffix.lower() in _LOCAL_SUFFIXES


def _require(rows: Sequence[dict], fields: Iterable[str], where: str) -> None:
    for i, row in enumerate(rows):
        missing = [f for f in fields if f not in row]
        if missing:
            raise DatasetError(f"{where}: record {i} lacks field(s) {missing}; "
                               f"has {sorted(row)}")


def _subsample(items: list, limit: int | None, seed: int) -> list:
    if limit is None or limit >= len(items):
        return items
    order = np.random.default_rng(seed).permutation(len(items))[:limit]
    return [items[i] for i in sorted(order)]


# ---------------------------------------------------------------------------------------------
# BeaverTails


def load_beavertails(path_or_hub_id: str | os.PathLike = BEAVERTAILS_HUB_ID, *,
                     split: str = "30k_test", harmful_only: bool = True,
                     categories: Sequence[str] | None = None, limit: int | None = None,
                     seed: int = 0) -> list[Prompt]:
    """BeaverTails prompts, deduplicated by text (the dataset has several responses each).

    harmful_only keeps rows with is_safe == False (kind "harmful"); otherwise safe rows are
    kept as kind "benign" (a prompt is harmful if any of its rows is unsafe). categories keeps
    rows flagged True in at least one of them. limit takes a seeded random subset, in
    dataset order.
    """
    if _is_local(path_or_hub_id):
        file = _local_file(Path(path_or_hub_id), split)
        rows, source = read_rows(file), f"beavertails:{file}"
    else:
        rows = _hub_rows(str(path_or_hub_id), None, split, "--beavertails_path")
        source = f"beavertails:{path_or_hub_id}:{split}"
    _require(rows, ("prompt", "response", "category", "is_safe"), source)
    wanted = None if categories is None else set(categories)
    by_prompt: dict[str, dict[str, Any]] = {}
    for row in rows:
        flags = row["category"] or {}
        if not isinstance(flags, dict):
            raise DatasetError(f"{source}: 'category' must be a dict of booleans, got "
                               f"{type(flags).__name__}")
        active = sorted(k for k, v in flags.items() if v)
        if wanted is not None and not wanted.intersection(active):
            continue
        entry = by_prompt.setdefault(row["prompt"], {"unsafe": False, "cats": set()})
        entry["unsafe"] |= not bool(row["is_safe"])
        entry["cats"].update(active)
    prompts = []
    for text, entry in by_prompt.items():
        if harmful_only and not entry["unsafe"]:
            continue
        kind = "harmful" if entry["unsafe"] else "benign"
        prompts.append(Prompt(text=text, kind=kind, category=",".join(sorted(entry["cats"])),
                              source=source))
    if not prompts:
        raise DatasetError(f"{source}: no prompts left after filtering "
                           f"(harmful_only={harmful_only}, categories={categories})")
    out = _subsample(prompts, limit, seed)
    logging.info("BeaverTails %s: %d prompts (of %d rows)", source, len(out), len(rows))
    return out


# ---------------------------------------------------------------------------------------------
# MMLU


def load_mmlu(path_or_hub_id: str | os.PathLike = MMLU_HUB_ID, *,
              subjects: str | Sequence[str] = "all", split: str = "test",
              limit: int | None = None, seed: int = 0) -> list[MCQuestion]:
    """MMLU questions of the given subjects ("all" or a list) and split (test/dev/validation)."""
    subject_list = None if subjects == "all" else ([subjects] if isinstance(subjects, str)
                                                   else list(subjects))
    if _is_local(path_or_hub_id):
        file = _local_file(Path(path_or_hub_id), split)
        rows, source = read_rows(file), f"mmlu:{file}"
    else:
        rows, source = [], f"mmlu:{path_or_hub_id}:{split}"
        for config in (subject_list or ["all"]):
            rows.extend(_hub_rows(str(path_or_hub_id), config, split, "--mmlu_path"))
    _require(rows, ("question", "subject", "choices", "answer"), source)
    questions = []
    for i, row in enumerate(rows):
        if subject_list is not None and row["subject"] not in subject_list:
            continue
        choices = tuple(str(c) for c in row["choices"])
        answer = int(row["answer"])
        if len(choices) != 4 or not 0 <= answer < 4:
            raise DatasetError(f"{source}: record {i} needs 4 choices and answer in 0..3, got "
                               f"{len(choices)} choices and answer {row['answer']!r}")
        questions.append(MCQuestion(question=str(row["question"]), choices=choices,
                                    answer=answer, subject=str(row["subject"]), source=source))
    if not questions:
        raise DatasetError(f"{source}: no questions for subjects={subjects!r}")
    out = _subsample(questions, limit, seed)
    logging.info("MMLU %s: %d questions", source, len(out))
    return out
