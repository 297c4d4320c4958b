"""Safety by generation: refusal rate on harmful prompts, over-refusal on benign ones.

Prompts are chat-formatted with the model's template (`encode_prompt`), left-padded into
bucketed batches and decoded greedily with the KV-cache `generate`; the response (never the
echoed prompt) goes to a `Judge`. The same function measures both rates: pass harmful prompts
for the refusal rate, benign look-alikes for the over-refusal rate.

Also teacher-forced NLLs (DESIGN §9 asks for them beside the generation metrics): the mean
response NLL of a refusal target given harmful prompts (`refusal_nll`), or of any
(prompt, response) pairs (`teacher_forced_nll`), with the exact loss used for training.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from sst_jax.data.chat import bucket_length, collate, encode_chat, encode_plain, encode_prompt
from sst_jax.data.embedded import refusal_for
from sst_jax.data.sources import Prompt
from sst_jax.data.utility_tasks import matches_answer
from sst_jax.eval.judge import Judge, KeywordRefusalJudge, is_degenerate
from sst_jax.eval.metrics import Estimate, bootstrap_interval, proportion
from sst_jax.models import forward, generate, response_nll
from sst_jax.models.generate import supports_shared_prefix
from sst_jax.models.sharding import model_mesh, padded_rows, put_batch, to_host


@dataclasses.dataclass(frozen=True)
class RefusalRecord:
    prompt: str
    response: str
    refused: bool
    degenerate: bool
    category: str


@dataclasses.dataclass(frozen=True)
class RefusalResult:
    records: tuple[RefusalRecord, ...]
    rate: Estimate  # fraction of responses judged refusals
    judge: str
    seconds: float
    tokens_per_second: float

    @property
    def outcomes(self) -> np.ndarray:
        return np.asarray([r.refused for r in self.records], dtype=bool)


def _as_prompts(prompts: Sequence[Prompt | str]) -> list[Prompt]:
    return [p if isinstance(p, Prompt) else Prompt(str(p), "unknown", "", "inline") for p in prompts]


def _batch_rows(n: int, batch_size: int) -> int:
    """Rows per batch: the fewest batches of at most `batch_size` rows, all of one size, so the
    last is not a mostly padded full one (400 prompts at 64: 7 × 58 rows, not 7 × 64: 1.07× the
    prompts/s with the same responses, `bench/evaluation.py --tasks study`). Up to `batch_size`
    items are one batch rounded up to a multiple of 8 (few distinct shapes to compile across calls)."""
    if n <= batch_size:
        return max(1, min(batch_size, -(-n // 8) * 8))
    batches = -(-n // batch_size)
    return -(-n // batches)


def _pad_rows(rows: list, size: int) -> list:
    return rows + [rows[-1]] * (size - len(rows))


def _eos_ids(model) -> set[int]:
    ids = set(int(t) for t in getattr(model.config, "eos_token_ids", ()) or ())
    if model.tokenizer.eos_token_id is not None:
        ids.add(int(model.tokenizer.eos_token_id))
    return ids


def decode_responses(tokenizer, tokens: np.ndarray, eos_ids: set[int]) -> list[str]:
    """Text of each row up to (not including) its first EOS, special tokens dropped."""
    out = []
    for row in np.asarray(tokens):
        ids = row.tolist()
        cut = next((i for i, t in enumerate(ids) if t in eos_ids), len(ids))
        out.append(tokenizer.decode(ids[:cut], skip_special_tokens=True).strip())
    return out


# A shorter shared prefix is prefilled with the rows: the separate batch-1 prefill and the copy of its
# keys and values into every row cost more than they save (the tiny test model's 3-token user
# header ran 0.77x; smollm2's 24-token system prompt + header 1.35x, bench/evaluation.py).
MIN_SHARED_PREFIX = 8


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Tokens every sequence starts with, leaving each at least one token of its own."""
    if not sequences:
        return 0
    limit = min(len(s) for s in sequences) - 1
    first = sequences[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in sequences):
        n += 1
    return n


def _prefix_to_share(config, encoded: Sequence[Sequence[int]], max_new_tokens: int) -> int:
    """How many leading tokens `generate_responses` prefills once: the shared prefix if it is
    long enough to pay off and the model's sliding window (if any) covers the whole cache."""
    shared = shared_prefix_length(encoded)
    if shared < MIN_SHARED_PREFIX:
        return 0
    longest = shared + bucket_length(max(len(e) - shared for e in encoded)) + max_new_tokens
    return shared if supports_shared_prefix(config, longest) else 0


def generate_responses(model, params, prompts: Sequence[str], *, branches=None,
                       max_new_tokens: int = 64, batch_size: int = 16, system: str | None = None,
                       progress: bool = True, desc: str = "generate",
                       stats: dict | None = None, share_prefix: bool = True) -> list[str]:
    """Greedy chat responses, in input order. If `stats` is a dict, it receives the number of
    generated tokens, seconds and tokens per second.

    The tokens every prompt starts with (the chat template's system prompt and user header) are
    prefilled once per batch (`generate(prefix_ids=...)`), not once per row (`share_prefix=False`:
    whole rows, the reference the benchmark compares with).
    Prompts are processed in order of length (less padding per bucket), in the fewest batches
    of at most `batch_size` rows, all of one size (the last padded by repetition), so shapes
    repeat. Up to `batch_size` prompts run as one batch rounded up to a multiple of 8.
    Rows are rounded up to split over the batch axes of the model's mesh (the extra rows
    repeat the last and are dropped).
    """
    batch_size = _batch_rows(len(prompts), batch_size)
    mesh = model_mesh(model)
    tok = model.tokenizer
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else model.config.pad_token_id)
    eos = _eos_ids(model)
    encoded = [encode_prompt(tok, p, system=system) for p in prompts]
    # The chat template's shared opening (system prompt, user header) is prefilled once per batch.
    shared = _prefix_to_share(model.config, encoded, max_new_tokens) if share_prefix else 0
    prefix, encoded = (encoded[0][:shared] if shared else []), [e[shared:] for e in encoded]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    responses: list[str] = [""] * len(prompts)
    n_tokens, start = 0, time.perf_counter()
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, leave=False)
    for lo in range(0, len(order), batch_size):
        idx = order[lo: lo + batch_size]
        batch = put_batch(mesh, collate(_pad_rows([encoded[i] for i in idx], padded_rows(batch_size, mesh)), pad))
        new = generate(model.config, params, batch["input_ids"], batch["attention_mask"],
                       max_new_tokens=max_new_tokens, branches=branches, eos_token_ids=sorted(eos),
                       prefix_ids=prefix)
        new = to_host(new)[: len(idx)]
        for i, text in zip(idx, decode_responses(tok, new, eos)):
            responses[i] = text
        n_tokens += int(sum(next((k for k, t in enumerate(r.tolist()) if t in eos), len(r))
                            for r in new))
        bar.update(len(idx))
        bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - start, 1e-9):.0f}")
    bar.close()
    seconds = time.perf_counter() - start
    if stats is not None:
        stats.update(tokens=n_tokens, seconds=seconds, tokens_per_second=n_tokens / max(seconds, 1e-9))
    logging.info("%s: %d prompts, %d tokens in %.1fs (%.0f tok/s)", desc, len(prompts), n_tokens,
                 seconds, n_tokens / max(seconds, 1e-9))
    return responses


def evaluate_refusal(model, params, prompts: Sequence[Prompt | str], *, branches=None,
                     max_new_tokens: int = 64, batch_size: int = 16, judge: Judge | None = None,
                     system: str | None = None, progress: bool = True,
                     desc: str = "refusal") -> RefusalResult:
    """Generate a response per prompt and judge it; rate = refusals / n with a Wilson CI.

    On harmful prompts the rate is the refusal rate (higher is safer); on benign prompts it
    is the over-refusal rate (lower is better).
    """
    if not prompts:
        raise ValueError("no prompts to evaluate")
    judge = judge or KeywordRefusalJudge()
    items = _as_prompts(prompts)
    texts = [p.text for p in items]
    start = time.perf_counter()
    stats: dict = {}
    responses = generate_responses(model, params, texts, branches=branches,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   system=system, progress=progress, desc=desc, stats=stats)
    verdicts = judge(texts, responses)
    records = tuple(RefusalRecord(prompt=p.text, response=r, refused=bool(v),
                                  degenerate=is_degenerate(r), category=p.category)
                    for p, r, v in zip(items, responses, verdicts))
    return RefusalResult(records=records, rate=proportion([r.refused for r in records]),
                         judge=getattr(judge, "name", type(judge).__name__),
                         seconds=time.perf_counter() - start,
                         tokens_per_second=stats["tokens_per_second"])


@dataclasses.dataclass(frozen=True)
class GenerativeResult:
    records: tuple[dict, ...]  # prompt, answer, response, correct
    accuracy: Estimate


def evaluate_generative(model, params, examples: Sequence[tuple[str, str]], *, branches=None,
                        max_new_tokens: int = 16, batch_size: int = 16, progress: bool = True,
                        desc: str = "exact-match") -> GenerativeResult:
    """Exact-match accuracy of greedy chat answers to (prompt, answer) pairs (utility tasks in
    generative form; `utility_tasks.matches_answer` compares the first line)."""
    prompts = [p for p, _ in examples]
    responses = generate_responses(model, params, prompts, branches=branches,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   progress=progress, desc=desc)
    records = tuple({"prompt": p, "answer": a, "response": r, "correct": matches_answer(r, a)}
                    for (p, a), r in zip(examples, responses))
    return GenerativeResult(records=records, accuracy=proportion([r["correct"] for r in records]))


# ---------------------------------------------------------------------------------------------
# Teacher-forced NLL


@dataclasses.dataclass(frozen=True)
class NLLResult:
    per_item: tuple[float, ...]  # mean NLL per response token, per item
    mean: Estimate  # mean over items, bootstrap CI

    def as_dict(self) -> dict:
        return self.mean.as_dict()


@functools.partial(jax.jit, static_argnames=("config",))
def _batch_nll(config, params, input_ids, attention_mask, loss_mask, branches):
    logits = forward(config, params, input_ids, attention_mask, branches=branches)
    return response_nll(logits, input_ids, loss_mask)


def teacher_forced_nll(model, params, pairs: Sequence[tuple[str, str]], *, branches=None,
                       batch_size: int = 16, chat: bool = True, system: str | None = None,
                       max_length: int | None = None, seed: int = 0, progress: bool = True,
                       desc: str = "nll") -> NLLResult:
    """Mean response-token NLL of each (prompt, response), chat-formatted (or plain text);
    batches split over the model's mesh, and fewer pairs than `batch_size` rounded up to a
    multiple of 8 rows, like `generate_responses`."""
    if not pairs:
        raise ValueError("no (prompt, response) pairs")
    batch_size = _batch_rows(len(pairs), batch_size)
    mesh = model_mesh(model)
    tok = model.tokenizer
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else model.config.pad_token_id)
    if chat:
        encoded = [encode_chat(tok, p, r, system=system, max_length=max_length) for p, r in pairs]
    else:
        encoded = [encode_plain(tok, p, r, max_length=max_length) for p, r in pairs]
    order = sorted(range(len(pairs)), key=lambda i: len(encoded[i][0]))
    values = np.zeros(len(pairs), np.float64)
    bar = tqdm(total=len(pairs), desc=desc, unit="ex", disable=not progress, leave=False)
    for lo in range(0, len(order), batch_size):
        idx = order[lo: lo + batch_size]
        rows = _pad_rows([encoded[i] for i in idx], padded_rows(batch_size, mesh))
        batch = put_batch(mesh, collate([r[0] for r in rows], pad, loss_masks=[r[1] for r in rows]))
        out = _batch_nll(model.config, params, batch["input_ids"], batch["attention_mask"],
                         batch["loss_mask"], branches)
        values[idx] = to_host(out)[: len(idx)]
        bar.update(len(idx))
    bar.close()
    return NLLResult(per_item=tuple(float(v) for v in values),
                     mean=bootstrap_interval(values, seed=seed))


def refusal_nll(model, params, prompts: Sequence[Prompt | str], *, targets: Sequence[str] | None = None,
                **kwargs) -> NLLResult:
    """Teacher-forced NLL of a refusal given each harmful prompt (lower = closer to refusing).

    targets default to `sst_jax.data.embedded.refusal_for(prompt)`, the training targets.
    """
    texts = [p.text for p in _as_prompts(prompts)]
    targets = [refusal_for(t) for t in texts] if targets is None else list(targets)
    if len(targets) != len(texts):
        raise ValueError(f"{len(texts)} prompts but {len(targets)} refusal targets")
    kwargs.setdefault("desc", "refusal-nll")
    return teacher_forced_nll(model, params, list(zip(texts, targets)), **kwargs)
