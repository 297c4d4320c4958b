"""Dataset loaders: BeaverTails and MMLU from hub ids (via `datasets`) or local files.

Local files (JSON list, JSONL, CSV or Parquet) use the hub schema:
  BeaverTails: prompt (str), response (str), category (dict[str, bool]), is_safe (bool)
  MMLU:        question (str), subject (str), choices (list of 4 str), answer (int 0-3)
Booleans are parsed strictly (true/false, 1/0, yes/no; "false" is false); answers may be
letters ("B", "(b)"); in CSV, choices / category are JSON text (or MMLU columns A, B, C, D).
Every error names the file and line (JSONL), record (JSON) or row (CSV, Parquet).
A local directory is searched for a file named after the split (`30k_test.jsonl`, ...).
`load_prompts` reads a plain prompt list (prompt, optional response) in any of these formats.

Offline (HF_DATASETS_OFFLINE=1 or HF_HUB_OFFLINE=1) a hub id that is not in the local cache
fails at once with a DatasetError, instead of `datasets` spending ~47 s on retries.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from absl import logging

from sst_jax.errors import DatasetError

BEAVERTAILS_HUB_ID = "PKU-Alignment/BeaverTails"
MMLU_HUB_ID = "cais/mmlu"
_LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


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

# A row and where it came from: "FILE, line N" (JSONL), "FILE, record N" (JSON list, 1-based),
# "FILE, row N" (CSV data rows after the header, Parquet), "HUB_ID:SPLIT, row N".
Located = tuple[str, dict[str, Any]]


def read_located_rows(path: str | os.PathLike) -> list[Located]:
    """(where, row) pairs of a local JSON (list of objects, or {"data": [...]}), JSONL, CSV or
    Parquet file. Every row is a JSON object / table row; anything else is a DatasetError
    naming the file and line (or record / row number)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _LOCAL_SUFFIXES:
        raise DatasetError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl, .csv or .parquet")
    try:
        with open(path, "rb") as f:
            head = f.read(1)
    except PermissionError as err:
        raise DatasetError(f"cannot read {path}: permission denied. Give this user read access "
                           f"(chmod u+r '{path}') or copy the file somewhere readable") from err
    except IsADirectoryError as err:
        raise DatasetError(f"{path} is a folder, not a {suffix} file") from err
    except OSError as err:
        raise DatasetError(f"cannot read {path}: {err}") from err
    if not head:
        raise DatasetError(f"{path} is empty (0 bytes); it needs at least one record")
    try:
        if suffix == ".jsonl":
            return _jsonl_rows(path)
        if suffix == ".json":
            return _json_rows(path)
        if suffix == ".csv":
            return _csv_rows(path)
        return _parquet_rows(path)
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from err
    except PermissionError as err:
        raise DatasetError(f"cannot read {path}: permission denied") from err
    except OSError as err:
        raise DatasetError(f"cannot read {path}: {err}") from err


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a local JSON (list of objects, or {"data": [...]}), JSONL, CSV or Parquet file."""
    return [row for _, row in read_located_rows(path)]


def _object_or_error(obj: Any, where: str, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object {{\"field\": value, ...}}, got "
                           f"{type(obj).__name__} {_short(obj)}; {what}")
    return obj


def _jsonl_rows(path: Path) -> list[Located]:
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); each line of a "
                                   ".jsonl file must be one JSON object (a truncated last line?)") from err
            out.append((where, _object_or_error(obj, where, "each line of a .jsonl file must be one object")))
    return out


def _json_rows(path: Path) -> list[Located]:
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}, line {err.lineno}: not valid JSON ({err.msg} at column {err.colno}); "
                           "the file is truncated or not JSON (for one object per line, name it .jsonl)") from err
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        keys = f" with keys {sorted(obj)[:8]}" if isinstance(obj, dict) else ""
        raise DatasetError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}}), got "
                           f"{type(obj).__name__}{keys}")
    return [(f"{path}, record {i}", _object_or_error(r, f"{path}, record {i}", "the list must hold objects"))
            for i, r in enumerate(obj, 1)]


def _csv_rows(path: Path) -> list[Located]:
    import csv

    out = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames
            if not header or any(h is None or not h.strip() for h in header):
                raise DatasetError(f"{path}, line 1: a CSV file needs a header row naming every column, got "
                                   f"{header}")
            for i, row in enumerate(reader, 1):
                where = f"{path}, row {i} (line {reader.line_num})"
                if None in row:
                    raise DatasetError(f"{where}: {len(header) + len(row[None])} values for {len(header)} "
                                       f"columns {header}; quote values that contain commas")
                if any(v is None for v in row.values()):
                    missing = [k for k, v in row.items() if v is None]
                    raise DatasetError(f"{where}: no value for column(s) {missing} (a truncated line?)")
                out.append((where, dict(row)))
        except csv.Error as err:
            raise DatasetError(f"{path}, line {reader.line_num}: not valid CSV ({err})") from err
    return out


def _parquet_rows(path: Path) -> list[Located]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, ValueError) as err:
        raise DatasetError(f"{path}: not a readable Parquet file ({err}); the file is corrupt, truncated "
                           "or another format") from err
    return [(f"{path}, row {i}", r) for i, r in enumerate(table.to_pylist(), 1)]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


# ---------------------------------------------------------------------------------------------
# Field parsers: strict, and every error names where the row came from

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}
_LETTER_RE = re.compile(r"^\(?\s*([A-Da-d])\s*\)?[.:]?$")


def parse_bool(value: Any, where: str, field: str) -> bool:
    """true/false from a bool, the ints 0/1, or the strings true/false/1/0/yes/no (any case)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return bool(int(value))
    if isinstance(value, float) and value in (0.0, 1.0):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise DatasetError(f"{where}: {field!r} must be a boolean (true/false, 1/0, yes/no), got "
                       f"{type(value).__name__} {_short(value)}")


def parse_answer(value: Any, where: str, field: str = "answer") -> int:
    """An MMLU answer index 0-3 from an int, a digit string, or a letter A-D ("B", "b", "(B)", "B.")."""
    index = None
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        index = int(value)
    elif isinstance(value, float) and value.is_integer():
        index = int(value)
    elif isinstance(value, str):
        text = value.strip()
        m = _LETTER_RE.match(text)
        if m:
            index = "ABCD".index(m[1].upper())
        elif text.isdigit():
            index = int(text)
    if index is None or not 0 <= index < 4:
        raise DatasetError(f"{where}: {field!r} must be 0-3 or a letter A-D, got {type(value).__name__} "
                           f"{_short(value)}")
    return index


def text_field(row: dict[str, Any], field: str, where: str, *, optional: bool = False,
               allow_empty: bool = False) -> str | None:
    """row[field] as text; a missing field, a non-text value or (unless allowed) '' is a DatasetError."""
    if field not in row or row[field] is None:
        if optional:
            return None
        if field in row:
            raise DatasetError(f"{where}: field {field!r} is null; it must be text")
        raise DatasetError(f"{where}: missing field {field!r} (fields present: {', '.join(map(str, row)) or 'none'})")
    value = row[field]
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field {field!r} must be text, got {type(value).__name__} {_short(value)}")
    if not allow_empty and not value.strip():
        raise DatasetError(f"{where}: field {field!r} is empty")
    return value


def _structured(value: Any, where: str, field: str) -> Any:
    """A list/dict field, accepting its JSON text (how CSV files carry them)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{where}: field {field!r} is text that is not JSON ({err.msg}); give a "
                               "list/object (in CSV: its JSON text)") from err
    return value


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
                       f"(looked for {split}.jsonl/.json/.csv/.parquet)")


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


def _hub_rows(hub_id: str, config: str | None, split: str, flag_hint: str) -> list[Located]:
    if _offline() and not _in_hf_cache(hub_id):
        raise DatasetError(
            f"dataset {hub_id!r} is not a local file and the hub is offline "
            f"(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE set, nothing in the HF cache). Pass a local "
            f".json/.jsonl/.parquet file in the same schema ({flag_hint}; .csv works too), or go online.")
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, config, split=split)
    except Exception as err:  # datasets raises many types; name the dataset in every case
        raise DatasetError(f"cannot load {hub_id!r} (config={config!r}, split={split!r}) "
                           f"from the hub: {err}") from err
    return [(f"{hub_id}:{split}, row {i}", dict(r)) for i, r in enumerate(ds, 1)]


def _is_local(path_or_hub_id: str | os.PathLike) -> bool:
    p = Path(path_or_hub_id)
    return p.exists() or p.suffix.lower() in _LOCAL_SUFFIXES


def _require(rows: Sequence[Located], fields: Iterable[str], source: str) -> None:
    if not rows:
        raise DatasetError(f"{source}: no records; the file holds no rows")
    fields = tuple(fields)
    for where, row in rows:
        missing = [f for f in fields if f not in row]
        if missing:
            raise DatasetError(f"{where}: missing field{'s' * (len(missing) > 1)} "
                               f"{', '.join(repr(m) for m in missing)} (fields present: "
                               f"{', '.join(map(str, row)) or 'none'})")


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
        rows, source = read_located_rows(file), f"beavertails:{file}"
    else:
        rows = _hub_rows(str(path_or_hub_id), None, split, "--beavertails_path")
        source = f"beavertails:{path_or_hub_id}:{split}"
    _require(rows, ("prompt", "response", "category", "is_safe"), source)
    wanted = None if categories is None else set(categories)
    by_prompt: dict[str, dict[str, Any]] = {}
    for where, row in rows:
        prompt = text_field(row, "prompt", where)
        text_field(row, "response", where, allow_empty=True)
        flags = _structured(row["category"], where, "category") or {}
        if not isinstance(flags, dict):
            raise DatasetError(f"{where}: 'category' must be an object of booleans "
                               f"{{\"violence\": false, ...}}, got {type(flags).__name__} {_short(flags)}")
        active = sorted(str(k) for k, v in flags.items() if parse_bool(v, where, f"category.{k}"))
        unsafe = not parse_bool(row["is_safe"], where, "is_safe")
        if wanted is not None and not wanted.intersection(active):
            continue
        entry = by_prompt.setdefault(prompt, {"unsafe": False, "cats": set()})
        entry["unsafe"] |= unsafe
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
        rows, source = read_located_rows(file), f"mmlu:{file}"
    else:
        rows, source = [], f"mmlu:{path_or_hub_id}:{split}"
        for config in (subject_list or ["all"]):
            rows.extend(_hub_rows(str(path_or_hub_id), config, split, "--mmlu_path"))
    rows = [(where, _letter_columns(row)) for where, row in rows]
    _require(rows, ("question", "subject", "choices", "answer"), source)
    questions = []
    for where, row in rows:
        subject = text_field(row, "subject", where)
        question = text_field(row, "question", where)
        if subject_list is not None and subject not in subject_list:
            continue
        choices = _structured(row["choices"], where, "choices")
        if not isinstance(choices, (list, tuple)) or not all(
                isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in choices):
            raise DatasetError(f"{where}: 'choices' must be a list of 4 texts, got {type(choices).__name__} "
                               f"{_short(choices)}")
        if len(choices) != 4:
            raise DatasetError(f"{where}: needs 4 choices and answer in 0..3 (or A-D), got "
                               f"{len(choices)} choices")
        answer = parse_answer(row["answer"], where)
        questions.append(MCQuestion(question=question, choices=tuple(str(c) for c in choices),
                                    answer=answer, subject=subject, source=source))
    if not questions:
        raise DatasetError(f"{source}: no questions for subjects={subjects!r}")
    out = _subsample(questions, limit, seed)
    logging.info("MMLU %s: %d questions", source, len(out))
    return out


def _letter_columns(row: dict[str, Any]) -> dict[str, Any]:
    """MMLU rows with columns A, B, C, D (the original CSVs) get a `choices` list."""
    if "choices" not in row and all(k in row for k in "ABCD"):
        row = {**row, "choices": [row[k] for k in "ABCD"]}
    return row


# ---------------------------------------------------------------------------------------------
# Prompt lists (the front door's --harmful / --benign files)


def load_prompts(path: str | os.PathLike, *, field: str = "prompt", min_rows: int = 1,
                 response_field: str = "response") -> list[tuple[str, str | None]]:
    """(prompt, response or None) of every row of a JSON / JSONL / CSV / Parquet file.

    Each row needs a non-empty text `field`; `response_field` is optional (text or null). Empty
    files, fewer than `min_rows` rows, and rows that break the schema raise a DatasetError
    naming the file and line (or record / row).
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    if path.is_dir():
        raise DatasetError(f"{path} is a folder; pass a .json, .jsonl, .csv or .parquet file of prompts")
    rows = read_located_rows(path)
    out = []
    for where, row in rows:
        prompt = text_field(row, field, where)
        response = text_field(row, response_field, where, optional=True, allow_empty=True)
        out.append((prompt, response))
    if len(out) < min_rows:
        raise DatasetError(f"{path}: {len(out)} prompt{'s' * (len(out) != 1)} (field {field!r}); at least "
                           f"{min_rows} needed. Add rows, or pass a larger file")
    return out
