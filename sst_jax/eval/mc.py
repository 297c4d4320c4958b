"""Multiple-choice utility: summed log-likelihood of " A".." D" (lm-eval-harness convention).

Prompt, exactly lm-eval-harness's MMLU format (0-shot):

    "{question}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:"

scored on plain text (no chat template, as lm-eval does for log-likelihood tasks), tokenized
by `sst_jax.data.chat.encode_plain` (prefix and continuation encoded separately, BOS only if
the tokenizer adds one), so the utility training and this evaluation see identical tokens.
The prediction is the argmax of the four summed continuation log-likelihoods.

Efficiency: when each " X" is a single token (true for every tokenizer we ship), the four
continuations share the prompt, so one forward of the prompt scores all four from the
last position's log-softmax. Otherwise each (prompt, continuation) pair is scored by a full
forward with a response mask. Shapes are bucketed (length: power of two; batch: fixed, last
batch padded by repetition), so a whole run compiles a handful of times.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sst_jax.data.chat import collate, encode_plain
from sst_jax.data.sources import MCQuestion
from sst_jax.eval.metrics import Estimate, proportion
from sst_jax.models import forward, last_token_logits, response_log_likelihood
from sst_jax.models.sharding import model_mesh, padded_rows, put_batch, to_host

LETTERS = ("A", "B", "C", "D")


def mc_prompt(question: str, choices: Sequence[str]) -> str:
    """The lm-eval-harness MMLU prompt (0-shot), ending in "Answer:" without a space."""
    if len(choices) != 4:
        raise ValueError(f"expected 4 choices, got {len(choices)}")
    lines = [question.strip()] + [f"{l}. {c}" for l, c in zip(LETTERS, choices)]
    return "\n".join(lines) + "\nAnswer:"


def mc_continuations() -> tuple[str, ...]:
    return tuple(f" {l}" for l in LETTERS)


def mmlu_description(subject: str) -> str:
    """lm-eval-harness's MMLU task description line (used with `description=True`)."""
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def mc_context(question: MCQuestion, *, shots: Sequence[MCQuestion] = (),
               description: bool = False) -> str:
    """k-shot context: solved examples ("...Answer: B"), blank-line separated, then the
    question's prompt; optionally preceded by the lm-eval MMLU description. 0-shot without a
    description is exactly `mc_prompt`."""
    parts = [f"{mc_prompt(s.question, s.choices)} {LETTERS[s.answer]}" for s in shots]
    parts.append(mc_prompt(question.question, question.choices))
    return (mmlu_description(question.subject) if description else "") + "\n\n".join(parts)


@dataclasses.dataclass(frozen=True)
class MCRecord:
    """One scored question."""

    question: str
    subject: str
    answer: int
    loglik: tuple[float, float, float, float]
    prediction: int
    correct: bool


@dataclasses.dataclass(frozen=True)
class MCResult:
    records: tuple[MCRecord, ...]
    accuracy: Estimate
    scoring: str  # "single-token" or "per-continuation"
    seconds: float

    def by_subject(self) -> dict[str, Estimate]:
        subjects = sorted({r.subject for r in self.records})
        return {s: proportion([r.correct for r in self.records if r.subject == s]) for s in subjects}


@functools.partial(jax.jit, static_argnames=("config",))
def _choice_logprobs(config, params, input_ids, attention_mask, branches, choice_ids):
    """log p(choice token | prompt) at the last (left-padded) position: (B, n_choices)."""
    # Last position only: forward(...)[:, -1] would materialize all B·T·V logits.
    logits = last_token_logits(config, params, input_ids, attention_mask, branches=branches)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return logp[:, choice_ids]


@functools.partial(jax.jit, static_argnames=("config",))
def _sequence_loglik(config, params, input_ids, attention_mask, loss_mask, branches):
    logits = forward(config, params, input_ids, attention_mask, branches=branches)
    return response_log_likelihood(logits, input_ids, loss_mask)


def _pad_rows(rows: list, size: int) -> list:
    return rows + [rows[-1]] * (size - len(rows))


def single_token_choice_ids(tokenizer) -> list[int] | None:
    """Token ids of " A".." D" if each is one token, else None."""
    ids = [tokenizer.encode(c, add_special_tokens=False) for c in mc_continuations()]
    return [int(t[0]) for t in ids] if all(len(t) == 1 for t in ids) else None


def evaluate_mc(model, params, questions: Sequence[MCQuestion], *, branches=None,
                batch_size: int = 8, max_length: int | None = None,
                single_token: bool | None = None, fewshot: Sequence[MCQuestion] = (),
                n_shots: int = 0, description: bool = False, progress: bool = True,
                desc: str = "MC") -> MCResult:
    """Score 4-way MC questions; `model` is a LoadedModel (config + tokenizer), `params` its
    weights (usually model.params). single_token=None picks the fast path when it applies.

    n_shots > 0 prepends, per question, the first n_shots questions of `fewshot` (e.g. MMLU
    `dev`) with the same subject, as lm-eval-harness does; 0-shot is the default.
    """
    if not questions:
        raise ValueError("no questions to score")
    tok, config = model.tokenizer, model.config
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else config.pad_token_id)
    choice_ids = single_token_choice_ids(tok)
    fast = choice_ids is not None if single_token is None else single_token
    if fast and choice_ids is None:
        raise ValueError("single_token=True but ' A'..' D' are not single tokens for this tokenizer")
    shots_by_subject: dict[str, list[MCQuestion]] = {}
    for shot in fewshot:
        shots_by_subject.setdefault(shot.subject, []).append(shot)
    for q in questions if n_shots else ():
        if len(shots_by_subject.get(q.subject, ())) < n_shots:
            raise ValueError(f"{n_shots}-shot scoring needs {n_shots} few-shot examples of subject "
                             f"{q.subject!r}; got {len(shots_by_subject.get(q.subject, ()))}")
    prompts = [mc_context(q, shots=shots_by_subject.get(q.subject, [])[:n_shots],
                          description=description) for q in questions]
    encoded = [[encode_plain(tok, p, c, max_length=max_length) for c in mc_continuations()]
               for p in prompts]
    order = sorted(range(len(questions)), key=lambda i: len(encoded[i][0][0]))
    scores = np.zeros((len(questions), 4), np.float64)
    start = time.perf_counter()
    bar = tqdm(total=len(questions), desc=desc, unit="q", disable=not progress, leave=False)
    q_per_batch = batch_size if fast else max(1, batch_size // 4)
    mesh = model_mesh(model)  # batches split over its batch axes; the extra rows are dropped
    for lo in range(0, len(order), q_per_batch):
        idx = order[lo: lo + q_per_batch]
        if fast:
            seqs = _pad_rows([encoded[i][0][0][:-1] for i in idx], padded_rows(q_per_batch, mesh))
            batch = put_batch(mesh, collate(seqs, pad))
            out = _choice_logprobs(config, params, batch["input_ids"], batch["attention_mask"], branches,
                                   jnp.asarray(choice_ids, jnp.int32))
            scores[idx] = to_host(out)[: len(idx)]
        else:
            pairs = _pad_rows([encoded[i][c] for i in idx for c in range(4)], padded_rows(4 * q_per_batch, mesh))
            batch = put_batch(mesh, collate([p[0] for p in pairs], pad, loss_masks=[p[1] for p in pairs]))
            out = _sequence_loglik(config, params, batch["input_ids"], batch["attention_mask"],
                                   batch["loss_mask"], branches)
            scores[idx] = to_host(out)[: 4 * len(idx)].reshape(len(idx), 4)
        bar.update(len(idx))
    bar.close()
    seconds = time.perf_counter() - start
    records = []
    for q, s in zip(questions, scores):
        pred = int(np.argmax(s))
        records.append(MCRecord(question=q.question, subject=q.subject, answer=q.answer,
                                loglik=tuple(float(x) for x in s), prediction=pred,
                                correct=pred == q.answer))
    return MCResult(records=tuple(records), accuracy=proportion([r.correct for r in records]),
                    scoring="single-token" if fast else "per-continuation", seconds=seconds)
