"""Embedded offline data: harmful/benign prompts, refusal targets, utility domains."""

import pytest

from sst_jax.data.embedded import (DATA_SOURCES, benign_prompts, dataset_card, harmful_prompts,
                                   refusal_for, refusal_targets)
from sst_jax.data.utility_tasks import (UTILITY_DOMAINS, item_split, matches_answer, to_roman,
                                        utility_generative, utility_items, utility_mc)


def test_harmful_prompts_come_from_harmbench_and_donotanswer():
    hb = harmful_prompts(sources=("harmbench",))
    assert len(hb) >= 195  # 199/200 HarmBench standard behaviours, deduplicated
    dna = harmful_prompts(sources=("donotanswer",))
    assert len(dna) > 500
    assert {p.source for p in harmful_prompts()} == {"harmbench", "donotanswer"}


def test_harmful_train_test_disjoint_and_complete():
    train, test = harmful_prompts("train"), harmful_prompts("test")
    assert not {p.text for p in train} & {p.text for p in test}
    assert len(train) + len(test) == len(harmful_prompts())


def test_benign_prompts_split_disjoint_with_lookalikes_in_both():
    every = benign_prompts()
    assert len(every) >= 150
    train, test = benign_prompts("train"), benign_prompts("test")
    assert not {p.text for p in train} & {p.text for p in test}
    assert len(train) + len(test) == len(every)
    for part in (train, test):
        assert sum(p.category == "lookalike" for p in part) >= 10
    assert "How do I kill a Python process that is not responding?" in {p.text for p in every}


def test_benign_and_harmful_never_overlap():
    assert not {p.text.lower() for p in benign_prompts()} & {p.text.lower() for p in harmful_prompts()}


def test_refusal_targets_varied_and_stable():
    targets = refusal_targets()
    assert len(set(targets)) == len(targets) >= 8
    assert refusal_for("How do I make a bomb?") == refusal_for("How do I make a bomb?")
    assert len({refusal_for(p.text) for p in harmful_prompts(limit=50)}) >= 5


def test_every_dataset_has_source_and_license():
    card = dataset_card()
    for name, entry in DATA_SOURCES.items():
        assert entry["license"] and entry["origin"], name
        assert name in card
    assert card["harmbench"]["license"].startswith("MIT")


def test_at_least_20_utility_domains():
    assert len(UTILITY_DOMAINS) >= 20


@pytest.mark.parametrize("domain", UTILITY_DOMAINS)
def test_domain_train_test_disjoint_and_deterministic(domain):
    train = utility_items(domain, "train", 40, seed=0)
    test = utility_items(domain, "test", 10, seed=0)
    assert not {i.question for i in train} & {i.question for i in test}
    assert all(item_split(domain, i.question) == "test" for i in test)
    assert utility_items(domain, "train", 40, seed=0) == train
    other_seed = utility_items(domain, "train", 40, seed=1)
    assert other_seed != train
    assert not {i.question for i in other_seed} & {i.question for i in test}


@pytest.mark.parametrize("domain", UTILITY_DOMAINS)
def test_mc_form_in_mmlu_schema(domain):
    qs = utility_mc(domain, "test", 10, seed=0)
    items = utility_items(domain, "test", 10, seed=0)
    for q, item in zip(qs, items):
        assert len(q.choices) == 4 and len(set(q.choices)) == 4
        assert q.choices[q.answer] == item.answer and q.subject == domain


def test_mc_answer_positions_are_spread():
    answers = [q.answer for q in utility_mc("addition", "train", 200, seed=0)]
    assert all(answers.count(k) > 25 for k in range(4))


def test_generative_form_and_answers_are_correct():
    gen = utility_generative("addition", "train", 20, seed=0)
    for ex in gen:
        a, b = ex.prompt.removeprefix("What is ").removesuffix("?").split(" + ")
        assert int(ex.response) == int(a) + int(b)
    assert to_roman(94) == "XCIV" and to_roman(399) == "CCCXCIX"
    assert matches_answer("47.\nBecause 12+35", "47") and not matches_answer("48", "47")


def test_asking_for_more_items_than_a_domain_has_is_an_error():
    from sst_jax.errors import DatasetError

    with pytest.raises(DatasetError, match="capitals"):
        utility_items("capitals", "test", 500)
