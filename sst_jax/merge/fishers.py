"""Datasets for the merge methods' Fisher passes.

The passes themselves live in `sst_jax.fisher` (core spaces, core-space Fishers, diagonal
Fishers of dense weights); what is merge-specific is the datasets they are given: collated
batches {input_ids, attention_mask, loss_mask} (`sst_jax.data.chat.collate`), one dict or an
iterable of them, checked here so that a missing or empty dataset is named.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from sst_jax.errors import DatasetError

Batch = Mapping[str, Any]


def as_batches(data: Batch | Iterable[Batch], name: str) -> list[dict]:
    """The dataset `name` as a list of collated numpy batches (labels: the dataset's own)."""
    if data is None:
        raise DatasetError(f"the Fisher pass needs the {name!r} dataset (collated batches)")
    blocks = [data] if isinstance(data, Mapping) else list(data)
    out = []
    for blk in blocks:
        missing = {"input_ids", "attention_mask", "loss_mask"} - set(blk)
        if missing:
            raise DatasetError(f"{name} batch lacks {sorted(missing)} (use sst_jax.data.chat.collate)")
        out.append({k: np.asarray(blk[k]) for k in ("input_ids", "attention_mask", "loss_mask")})
    if not out or sum(len(b["input_ids"]) for b in out) == 0:
        raise DatasetError(f"the {name!r} dataset is empty")
    return out


def n_samples(batches: list[dict]) -> int:
    return sum(len(b["input_ids"]) for b in batches)
