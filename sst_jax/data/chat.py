"""Chat formatting and batching: the one place prompts become token ids and loss masks.

Training, Fisher passes and evaluation all use these functions, so the chat template is
applied identically everywhere (the original computed its Fisher on prompt tokens only).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sst_jax.errors import DatasetError


def _messages(prompt: str, response: str | None, system: str | None) -> list[dict]:
    msgs = [] if system is None else [{"role": "system", "content": system}]
    msgs.append({"role": "user", "content": prompt})
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return msgs


def _template_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> list[int]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DatasetError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
            "sst-jax formats every prompt with the model's chat template")
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        tokenize=True, return_dict=False)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(t) for t in out]


def encode_prompt(tokenizer, prompt: str, *, system: str | None = None) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the assistant turn's header."""
    return _template_ids(tokenizer, _messages(prompt, None, system), add_generation_prompt=True)


def encode_chat(tokenizer, prompt: str, response: str, *, system: str | None = None,
                max_length: int | None = None) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of prompt + response; loss_mask is 1 on the response tokens only.

    The response span is everything the full conversation adds after the generation prompt
    (so the template's end-of-turn token is a target too: the model learns to stop).
    Truncation (max_length) cuts the response, never the prompt.
    """
    prefix = encode_prompt(tokenizer, prompt, system=system)
    full = _template_ids(tokenizer, _messages(prompt, response, system), add_generation_prompt=False)
    if full[: len(prefix)] != prefix:
        # Some templates render the assistant header differently mid-conversation; fall back
        # to appending the response tokens (plus EOS) to the generation prompt.
        resp = tokenizer.encode(response, add_special_tokens=False)
        eos = tokenizer.eos_token_id
        full = prefix + list(resp) + ([int(eos)] if eos is not None else [])
    mask = [0] * len(prefix) + [1] * (len(full) - len(prefix))
    if max_length is not None and len(full) > max_length:
        if len(prefix) >= max_length:
            raise DatasetError(f"prompt of {len(prefix)} tokens does not fit max_length={max_length}")
        full, mask = full[:max_length], mask[:max_length]
    return full, mask


def bucket_length(n: int, *, minimum: int = 16) -> int:
    """Next power of two ≥ n (≥ minimum): few distinct shapes, so few recompiles."""
    size = minimum
    while size < n:
        size *= 2
    return size


def collate(sequences: Sequence[Sequence[int]], pad_id: int, *,
            loss_masks: Sequence[Sequence[int]] | None = None,
            length: int | None = None) -> dict[str, np.ndarray]:
    """Left-padded int32 batch {input_ids, attention_mask, loss_mask} of bucketed length.

    Left padding keeps every sequence's last token at the end, which generation and
    last-token scoring need; the decoder derives positions from attention_mask.
    """
    if not sequences:
        raise DatasetError("cannot collate an empty batch")
    longest = max(len(s) for s in sequences)
    length = bucket_length(longest) if length is None else length
    if longest > length:
        raise DatasetError(f"sequence of {longest} tokens longer than batch length {length}")
    batch = len(sequences)
    ids = np.full((batch, length), pad_id, np.int32)
    attn = np.zeros((batch, length), np.int32)
    lmask = np.zeros((batch, length), np.int32)
    for i, seq in enumerate(sequences):
        n = len(seq)
        if n == 0:
            raise DatasetError(f"sequence {i} of the batch is empty")
        ids[i, length - n:] = seq
        attn[i, length - n:] = 1
        if loss_masks is not None:
            lmask[i, length - n:] = loss_masks[i]
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": lmask}


def encode_plain(tokenizer, prefix: str, continuation: str, *,
                 max_length: int | None = None) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of raw text prefix + continuation, no chat template (lm-eval style).

    Used for multiple-choice items, which lm-eval-harness scores on plain text: training a
    utility adapter on this format teaches exactly what the MC evaluation measures.
    """
    bos = [int(tokenizer.bos_token_id)] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
    pre = bos + list(tokenizer.encode(prefix, add_special_tokens=False))
    cont = list(tokenizer.encode(continuation, add_special_tokens=False))
    if not cont:
        raise DatasetError(f"continuation {continuation!r} encodes to no tokens")
    ids, mask = pre + cont, [0] * len(pre) + [1] * len(cont)
    if max_length is not None and len(ids) > max_length:
        ids, mask = ids[-max_length:], mask[-max_length:]
    return ids, mask
