"""Training and Fisher examples: what a user hands in, normalized, encoded and batched.

An example is `Example(prompt, response, fmt)`: fmt "chat" applies the model's chat template
(the loss is on the response turn), "plain" is lm-eval-style raw text (a multiple-choice
prompt and its " B" answer). Users give lists of (prompt, response) pairs, plain prompts
(the response is filled in by a rule: a refusal for harmful prompts, the base model's own
answer for benign ones), or files (`sst_jax.data.sources.read_prompt_rows`).

    encoded = encode_examples(tokenizer, examples)        # [(ids, loss_mask)]
    batches = to_batches(encoded, pad_id, batch_size=8)   # collated, bucketed lengths
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterable, Sequence

import numpy as np

from sst_jax.data.chat import collate, encode_chat, encode_plain
from sst_jax.errors import DatasetError


@dataclasses.dataclass(frozen=True)
class Example:
    """One (prompt, response) pair; response None until a rule fills it in."""

    prompt: str
    response: str | None = None
    fmt: str = "chat"

    def __post_init__(self):
        if self.fmt not in ("chat", "plain"):
            raise DatasetError(f"example format must be 'chat' or 'plain', got {self.fmt!r}")


def as_examples(items: Iterable, what: str) -> list[Example]:
    """Examples from Example objects, (prompt, response) pairs, (fmt, prompt, response)
    triples, {"prompt", "response"} dicts or plain prompt strings."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Example):
            out.append(item)
        elif isinstance(item, str):
            out.append(Example(item))
        elif isinstance(item, dict):
            if "prompt" not in item:
                raise DatasetError(f"{what}, item {i}: no 'prompt' field (fields: {sorted(item)})")
            out.append(Example(str(item["prompt"]), None if item.get("response") is None else str(item["response"]),
                               str(item.get("format", "chat"))))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            out.append(Example(str(item[0]), None if item[1] is None else str(item[1])))
        elif isinstance(item, (tuple, list)) and len(item) == 3 and item[0] in ("chat", "plain"):
            out.append(Example(str(item[1]), str(item[2]), str(item[0])))
        else:
            raise DatasetError(f"{what}, item {i}: expected a prompt, a (prompt, response) pair or a dict "
                               f"with 'prompt', got {type(item).__name__}")
        if not out[-1].prompt.strip():
            raise DatasetError(f"{what}, item {i}: empty prompt")
    return out


def interleave(*groups: Sequence) -> list:
    """Round-robin over groups (any prefix covers all of them); longer groups finish last."""
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def encode_examples(tokenizer, examples: Sequence[Example]) -> list[tuple[list[int], list[int]]]:
    """(ids, loss_mask) per example; every response must be set."""
    out = []
    for i, ex in enumerate(examples):
        if ex.response is None:
            raise DatasetError(f"example {i} ({ex.prompt[:40]!r}) has no response to score")
        if ex.fmt == "chat":
            out.append(encode_chat(tokenizer, ex.prompt, ex.response))
        else:
            out.append(encode_plain(tokenizer, ex.prompt, ex.response))
    return out


def to_batches(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int, *, batch_size: int = 8) -> list[dict]:
    """Collated {input_ids, attention_mask, loss_mask} batches of `batch_size` examples."""
    if batch_size <= 0:
        raise DatasetError(f"batch size must be positive, got {batch_size}")
    return [collate([e[0] for e in encoded[i:i + batch_size]], pad_id,
                    loss_masks=[e[1] for e in encoded[i:i + batch_size]])
            for i in range(0, len(encoded), batch_size)]


def batches_digest(batches: Sequence[dict]) -> str:
    """Content hash of collated batches (cache keys name data by content, never by path)."""
    h = hashlib.sha256()
    for b in batches:
        for k in ("input_ids", "attention_mask", "loss_mask"):
            h.update(np.ascontiguousarray(b[k]).tobytes())
    return h.hexdigest()[:16]
