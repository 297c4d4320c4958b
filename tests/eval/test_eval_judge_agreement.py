"""Cohen's κ, judge agreement counts and re-judging stored evaluations."""

import pytest

from sst_jax.eval.judge import KeywordRefusalJudge, cohen_kappa, judge_agreement
from sst_jax.eval.scoring import rescore


def wikipedia_example():
    """The worked example of Wikipedia's "Cohen's kappa": 50 items, 20 yes/yes, 5 yes/no,
    10 no/yes, 15 no/no → p_o = 0.7, p_e = 0.5, κ = 0.4."""
    a = [True] * 20 + [True] * 5 + [False] * 10 + [False] * 15
    b = [True] * 20 + [False] * 5 + [True] * 10 + [False] * 15
    return a, b


def test_cohen_kappa_matches_the_textbook_example():
    a, b = wikipedia_example()
    assert cohen_kappa(a, b) == pytest.approx(0.4, abs=1e-12)


def test_cohen_kappa_is_one_for_identical_raters_and_undefined_for_constant_ones():
    assert cohen_kappa([True, False, True], [True, False, True]) == 1.0
    assert cohen_kappa([True, True], [True, True]) is None


def test_judge_agreement_counts_false_and_missed_refusals():
    labels, verdicts = wikipedia_example()
    a = judge_agreement(labels, verdicts)
    assert a == {"n": 50, "accuracy": 0.7, "kappa": pytest.approx(0.4), "false_refusals": 10,
                 "missed_refusals": 5, "labelled_refusals": 25, "judged_refusals": 30}


def test_rescore_rejudges_stored_records_without_generation():
    ev = {"metrics": {"refusal": {"value": 0.0}},
          "records": {"harmful": [{"prompt": "h1", "response": "I cannot help with that.", "refused": False,
                                   "refusal_nll": 1.5},
                                  {"prompt": "h2", "response": "Sure, step one is...", "refused": True}],
                      "benign": [{"prompt": "b1", "response": "Sorry, I can't.", "refused": False}]}}
    metrics, records = rescore(ev, KeywordRefusalJudge())
    assert metrics["refusal"]["value"] == 0.5 and metrics["refusal"]["n"] == 2
    assert metrics["over_refusal"]["value"] == 1.0
    assert [r["refused"] for r in records["harmful"]] == [True, False]
    assert records["harmful"][0]["refusal_nll"] == 1.5  # other fields kept
    assert ev["records"]["harmful"][0]["refused"] is False  # the input is not modified
