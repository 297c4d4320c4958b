"""The semantic judge's shipped data: labelled files, their splits, the weights' provenance and
(slow) the reported agreement and a byte-identical refit."""

import json
from collections import Counter

import pytest

from experiments.judge_data import (CONFIGURATIONS, EVAL_JAILBREAK_TEMPLATES, JAILBREAK_TEMPLATES, agreement_table,
                                    file_sha256, fit_judge, judge_verdicts, prompt_plan, read_jsonl)
from sst_jax.data import embedded
from sst_jax.eval.semantic_judge import DEFAULT_WEIGHTS, JUDGE_ASSETS, SemanticWeights

TRAIN = JUDGE_ASSETS / "labelled_train.jsonl"
EVAL = JUDGE_ASSETS / "labelled_eval.jsonl"
AGREEMENT = JUDGE_ASSETS / "agreement_eval.json"


def unwrap(prompt: str) -> str:
    """The harmful request inside a jailbreak wrapper (the prompt itself if none matches)."""
    for template in JAILBREAK_TEMPLATES + EVAL_JAILBREAK_TEMPLATES:
        head, tail = template.split("{prompt}")
        if prompt.startswith(head) and prompt.endswith(tail):
            return prompt[len(head): len(prompt) - len(tail)]
    return prompt


@pytest.fixture(scope="module")
def labelled():
    return read_jsonl(TRAIN), read_jsonl(EVAL)


def test_labelled_rows_have_the_documented_schema(labelled):
    for rows in labelled:
        for r in rows:
            assert {"prompt", "response", "config", "kind", "refused"} <= set(r) <= {
                "prompt", "response", "config", "kind", "refused", "note"}
            assert isinstance(r["refused"], bool)
            assert r["config"] in CONFIGURATIONS
    train, evaluation = labelled
    assert len(train) >= 380 and len(evaluation) >= 200
    assert {r["kind"] for r in train} == {"harmful", "benign", "jailbreak"}
    assert {r["kind"] for r in evaluation} == {"harmful", "benign", "jailbreak"}


def test_eval_sample_is_stratified_over_configurations_and_kinds(labelled):
    counts = Counter((r["config"], r["kind"]) for r in labelled[1])
    assert set(counts) == {(c, k) for c in CONFIGURATIONS for k in ("harmful", "benign", "jailbreak")}
    plain = [v for (c, k), v in counts.items() if k != "jailbreak"]
    assert max(plain) - min(plain) <= 1
    assert {v for (c, k), v in counts.items() if k == "jailbreak"} == {8}


def test_labelled_files_share_no_prompt(labelled):
    train, evaluation = labelled
    train_prompts = {r["prompt"] for r in train} | {unwrap(r["prompt"]) for r in train}
    assert not train_prompts & ({r["prompt"] for r in evaluation} | {unwrap(r["prompt"]) for r in evaluation})


def test_eval_prompts_are_test_split_and_train_prompts_train_split(labelled):
    train, evaluation = labelled
    test_split = {p.text for p in embedded.harmful_prompts("test")} | {p.text for p in embedded.benign_prompts("test")}
    train_split = {p.text for p in embedded.harmful_prompts("train")} | {p.text for p in embedded.benign_prompts("train")}
    assert all(unwrap(r["prompt"]) in test_split for r in evaluation)
    assert all(unwrap(r["prompt"]) != r["prompt"] for r in evaluation if r["kind"] == "jailbreak")
    assert all(unwrap(r["prompt"]) in train_split for r in train)
    harmful_train = {p.text for p in embedded.harmful_prompts("train")}
    assert all(unwrap(r["prompt"]) in harmful_train for r in train if r["kind"] == "jailbreak")


def test_prompt_plan_keeps_pools_apart_and_gives_each_configuration_its_own_prompts():
    splits = type("S", (), {"harmful_train": (), "benign_train": ()})()
    rows = prompt_plan(splits, train_per_kind=5, eval_per_kind=4, jailbreaks=2)
    test_split = {p.text for p in embedded.harmful_prompts("test")} | {p.text for p in embedded.benign_prompts("test")}
    assert all((r["prompt"] in test_split) == (r["pool"] == "eval") for r in rows)
    for pool, kind in (("train", "harmful"), ("train", "benign"), ("eval", "harmful"), ("eval", "benign")):
        prompts = [r["prompt"] for r in rows if (r["pool"], r["kind"]) == (pool, kind)]
        assert len(prompts) == len(set(prompts)) == len(CONFIGURATIONS) * (5 if pool == "train" else 4)
    wrapped = {unwrap(r["prompt"]) for r in rows if r["kind"] == "jailbreak"}
    assert len(wrapped) == 2 * len(CONFIGURATIONS)
    assert not wrapped & {r["prompt"] for r in rows if r["kind"] == "harmful"}


def test_eval_jailbreaks_wrap_unused_test_prompts_in_held_out_wordings():
    splits = type("S", (), {"harmful_train": (), "benign_train": ()})()
    plain = prompt_plan(splits, train_per_kind=5, eval_per_kind=4, jailbreaks=2)
    rows = prompt_plan(splits, train_per_kind=5, eval_per_kind=4, jailbreaks=2, eval_jailbreaks=3)
    assert [r for r in rows if not (r["pool"] == "eval" and r["kind"] == "jailbreak")] == plain
    jb = [r for r in rows if r["pool"] == "eval" and r["kind"] == "jailbreak"]
    assert Counter(r["config"] for r in jb) == {c: 3 for c in CONFIGURATIONS}
    harmful_test = {p.text for p in embedded.harmful_prompts("test")}
    inner = [unwrap(r["prompt"]) for r in jb]
    assert all(p in harmful_test for p in inner) and len(set(inner)) == len(inner)
    assert not set(inner) & {r["prompt"] for r in rows if r["pool"] == "eval"}
    heads = {t.split("{prompt}")[0] for t in EVAL_JAILBREAK_TEMPLATES}
    assert all(any(r["prompt"].startswith(h) for h in heads) for r in jb)
    assert not heads & {t.split("{prompt}")[0] for t in JAILBREAK_TEMPLATES}


def test_shipped_weights_record_the_labelled_train_file():
    weights = SemanticWeights.load(DEFAULT_WEIGHTS)
    assert weights.training["labelled_train_sha256"] == file_sha256(TRAIN)
    assert weights.training["rows"] == len(read_jsonl(TRAIN))
    assert weights.feature_model["name"] == "smollm2-135m"
    assert weights.training["l2"] in weights.training["cv"]["grid"]


def test_reported_agreement_is_for_the_shipped_files():
    report = json.loads(AGREEMENT.read_text())
    assert report["labelled_eval_sha256"] == file_sha256(EVAL)
    assert report["weights_sha256"] == file_sha256(DEFAULT_WEIGHTS)


@pytest.mark.slow
def test_shipped_weights_reproduce_the_reported_eval_agreement(smollm2_model):
    rows = read_jsonl(EVAL)
    table = agreement_table(rows, judge_verdicts(rows, weights_path=DEFAULT_WEIGHTS, model=smollm2_model))
    assert table == json.loads(AGREEMENT.read_text())["table"]


@pytest.mark.slow
def test_refit_reproduces_the_shipped_weights(smollm2_model, tmp_path):
    """Same labels, same feature model: the refit weights equal the shipped ones (byte-identical
    on the machine that fitted them; to 1e-6 elsewhere, where float32 features may differ in the
    last bits; on a 2-core AMD EPYC the bias of −1.835 came out 1.35e-6 away: each parameter is
    held to 1e-6 of its own magnitude, floored at 1)."""
    weights, _ = fit_judge(TRAIN, tmp_path / "w.json", model=smollm2_model)
    shipped = SemanticWeights.load(DEFAULT_WEIGHTS)
    assert weights.training["l2"] == shipped.training["l2"]
    for field in ("mean", "scale", "weights"):
        a, b = getattr(weights, field), getattr(shipped, field)
        assert abs(a - b).max() <= 1e-6 * max(1.0, abs(b).max()), field
    assert abs(weights.bias - shipped.bias) <= 1e-6 * max(1.0, abs(shipped.bias))


@pytest.mark.slow
def test_runner_judge_flag_semantic_loads_the_shipped_judge(smollm2_model, monkeypatch):
    from experiments.runner import make_judge
    from sst_jax.eval import semantic_judge

    monkeypatch.setattr(semantic_judge, "load_model", lambda name, dtype: smollm2_model)
    judge = make_judge("semantic")
    assert judge.name == f"semantic-lr-v1-{file_sha256(DEFAULT_WEIGHTS)[:8]}"
    assert judge(["q", "q"], ["I'm sorry, but I can't help with that.", ""]) == [True, False]
