"""Score any ΔW (a merge, an input adapter, or none = the base) on any prompt sets.

    metrics, records = score(model, deltas, harmful=[...], benign=[...], utility=[(p, r), ...])

refusal: rate of judged refusals on harmful prompts; over_refusal: the same on benign prompts
(both Wilson 95% intervals); utility_nll: mean teacher-forced response NLL of the utility pairs
(bootstrap 95% interval). Greedy generation with the chat template; the judge sees the response
only. The records keep every prompt, response and verdict, so paired tests can use them.

    metrics, records = rescore(ev, judge)   # a stored evaluation re-judged, no generation
"""

from __future__ import annotations

from typing import Any, Sequence

from sst_jax.eval.judge import KeywordRefusalJudge
from sst_jax.eval.metrics import proportion
from sst_jax.eval.safety import generate_responses, teacher_forced_nll
from sst_jax.lora.algebra import fold


def score(model, deltas: Any = None, *, harmful: Sequence[str] = (), benign: Sequence[str] = (),
          utility: Sequence[tuple[str, str]] = (), judge=None, max_new_tokens: int = 32, batch_size: int = 8,
          seed: int = 0, label: str = "", progress: bool = True, params: Any = None) -> tuple[dict, dict]:
    """(metrics, records) of the model with `deltas` ({key: ΔW}, an adapter, or None) folded in
    (or of `params`, already folded)."""
    judge = judge or KeywordRefusalJudge()
    if params is None:
        params = model.params if deltas is None else fold(model.params, deltas, model.config)
    metrics: dict[str, Any] = {}
    records: dict[str, Any] = {}
    prompts = list(harmful) + list(benign)
    if prompts:
        responses = generate_responses(model, params, prompts, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, progress=progress, desc=f"generate {label}".strip())
        verdicts = [bool(v) for v in judge(prompts, responses)]
        n_h = len(harmful)
        for name, part, lo, hi in (("refusal", "harmful", 0, n_h), ("over_refusal", "benign", n_h, len(prompts))):
            if hi > lo:
                metrics[name] = proportion(verdicts[lo:hi]).as_dict()
                records[part] = [{"prompt": p, "response": r, "refused": v}
                                 for p, r, v in zip(prompts[lo:hi], responses[lo:hi], verdicts[lo:hi])]
    if utility:
        nll = teacher_forced_nll(model, params, list(utility), batch_size=batch_size, seed=seed,
                                 progress=progress, desc=f"utility NLL {label}".strip())
        metrics["utility_nll"] = nll.mean.value
        metrics["utility_nll_ci"] = [nll.mean.low, nll.mean.high]
        records["utility"] = [{"prompt": p, "response": r, "nll": v} for (p, r), v in zip(utility, nll.per_item)]
    return metrics, records


def rescore(evaluation: dict, judge) -> tuple[dict, dict]:
    """(metrics, records) of a stored evaluation re-judged by `judge`, without generating again.

    `evaluation` is any object with records {"harmful": [...], "benign": [...]} of
    {"prompt", "response", ...} rows, as `score` and the experiments' result JSON write them
    (one configuration's `ev`). Returns refusal / over_refusal (Wilson 95%) by the new judge and
    copies of the records with "refused" replaced by its verdicts; other fields are kept.
    """
    metrics: dict[str, Any] = {}
    records: dict[str, Any] = {}
    for name, part in (("refusal", "harmful"), ("over_refusal", "benign")):
        rows = (evaluation.get("records") or {}).get(part) or []
        if not rows:
            continue
        verdicts = [bool(v) for v in judge([r["prompt"] for r in rows], [r["response"] for r in rows])]
        metrics[name] = proportion(verdicts).as_dict()
        records[part] = [{**r, "refused": v} for r, v in zip(rows, verdicts)]
    return metrics, records
