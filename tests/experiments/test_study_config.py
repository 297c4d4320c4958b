"""configs/study.json, merged over minimal as `--mode minimal --config configs/study.json`
does, asks for what the study needs (counts, seeds, methods), and the splits it builds hold."""

from pathlib import Path

import pytest

from experiments.common import load_config
from experiments.runner import check_methods
from experiments.workbench import build_splits
from sst_jax.data import embedded

STUDY = str(Path(__file__).resolve().parents[2] / "configs" / "study.json")
ALL_METHODS = {"task_arithmetic", "ties", "dare_ties", "agl", "fisher", "sst", "sst_guard"}


@pytest.fixture(scope="module")
def study():
    return load_config("minimal", "smollm2-135m", STUDY)


@pytest.fixture(scope="module")
def minimal():
    return load_config("minimal", "smollm2-135m")


def test_study_has_three_seeds(study):
    assert len(set(study["seeds"])) == 3


def test_study_asks_for_at_least_200_held_out_prompts_of_each_kind(study):
    assert study["data"]["harmful_test"] >= 200 and study["data"]["benign_test"] >= 200


def test_study_splits_use_every_embedded_test_prompt_when_fewer_than_asked(study):
    splits = build_splits(study, seed=0)
    assert len(splits.harmful_test) == min(study["data"]["harmful_test"], len(embedded.harmful_prompts("test")))
    assert len(splits.harmful_test) >= 200
    assert len(splits.benign_test) == min(study["data"]["benign_test"],
                                          len(set(p.text for p in embedded.benign_prompts("test"))))


def test_study_has_100_utility_items_per_domain(study):
    assert study["data"]["utility_test_per_domain"] >= 100
    splits = build_splits(study, seed=0)
    assert all(len(v) >= 100 for v in splits.gen_test.values())


def test_study_sweeps_at_least_five_alphas(study):
    assert len(set(study["exp3"]["alphas"])) >= 5


def test_study_runs_every_method(study):
    assert ALL_METHODS <= set(study["exp1"]["methods"])
    assert ALL_METHODS | {"sst_multi"} <= set(study["exp2"]["methods"])
    assert ALL_METHODS <= set(study["exp3"]["methods"])
    check_methods(study)  # every name and hyper-parameter resolves in the registry


def test_study_fishers_use_more_samples_than_minimal(study, minimal):
    for key in ("harmful_samples", "benign_samples"):
        assert study["fisher"][key] > minimal["fisher"][key]


def test_study_states_its_measured_wall_time(study):
    import re
    assert "measured wall time" in study["description"].lower()
    assert re.search(r"\d+(\.\d+)? h per seed", study["description"])


def test_study_keeps_the_selective_safety_adapter(study):
    assert study.get("safety_adapter", "selective") == "selective"


# The validation split the default S recipe was tuned on (build_splits(validation=n)).

def test_validation_prompts_come_from_the_training_pools_and_are_not_trained_on(minimal):
    val = build_splits(minimal, seed=0, validation=32)
    test = build_splits(minimal, seed=0)
    assert len(val.harmful_test) == len(val.benign_test) == 32
    assert not set(val.harmful_test) & set(val.harmful_train)
    assert not set(val.benign_test) & set(val.benign_train)
    harmful_pool = {p.text for p in embedded.harmful_prompts("train")}
    benign_pool = {p.text for p in embedded.benign_prompts("train")}
    assert set(val.harmful_test) <= harmful_pool and set(val.benign_test) <= benign_pool
    assert not set(val.harmful_test) & set(test.harmful_test)


def test_validation_run_trains_on_the_real_runs_training_prompts(minimal):
    val = build_splits(minimal, seed=0, validation=32)
    test = build_splits(minimal, seed=0)
    assert val.harmful_train == test.harmful_train and val.benign_train == test.benign_train


def test_study_ablates_the_fisher_count_around_the_main_setting(study):
    ablation = study["exp3"]["fisher_ablation"]
    counts = [tuple(n) for n in ablation["samples"]]
    main = (study["fisher"]["harmful_samples"], study["fisher"]["benign_samples"])
    assert main in counts and len(counts) >= 3 and counts == sorted(counts)
    assert counts[0] < main < counts[-1]  # both sides of the main count: does the result hinge on it?
    assert ablation["method"] in study["exp3"]["methods"] and ablation["alpha"] in study["exp3"]["alphas"]
    # the Fisher pool is the training split: every count must be available there
    splits = build_splits(study, seed=0)
    assert max(h for h, _ in counts) <= len(splits.harmful_train)
    assert max(b for _, b in counts) <= len(splits.benign_train)


def test_seeds_flag_replaces_the_config_seeds():
    from experiments.runner import parse_seeds
    from sst_jax.errors import SstJaxError
    assert parse_seeds(["2"]) == (2,) and parse_seeds([]) == ()
    with pytest.raises(SstJaxError, match="not an integer"):
        parse_seeds(["x"])
    with pytest.raises(SstJaxError, match="repeated"):
        parse_seeds(["1", "1"])


# The recipes the study's seeds are run with (docs/study/results): the study inherits all but S's
# steps and data from minimal.json, so a change to minimal's recipes would silently change later
# seeds. Changing them means rerunning every seed (or pinning the old values in study.json).
STUDY_RECIPES = {
    "lora": {"r": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"], "layers_from_top": 10},
    "train_safety": {"steps": 144, "batch_size": 8, "lr": 0.002, "warmup_steps": 4, "max_length": 128},
    "train_utility": {"steps": 20, "batch_size": 8, "lr": 0.001, "warmup_steps": 3, "max_length": 128},
    "hparams": {"ties": {"density": 0.5}, "dare_ties": {"density": 0.5}, "agl": {"beta": 1.0, "k": 8},
                "sst": {"k": 32, "projector": "topk", "damping": 0.1}, "sst_multi": {"k": 32, "damping": 0.1}},
    "safety_adapter": "selective",
}


def test_study_recipes_are_the_ones_its_seeds_were_run_with(study):
    assert {k: study.get(k) for k in STUDY_RECIPES} == STUDY_RECIPES
    assert {k: study["data"][k] for k in ("harmful_train", "benign_train", "utility_train_per_domain")} == {
        "harmful_train": 240, "benign_train": 440, "utility_train_per_domain": 96}
    assert study["utility_domains"][:4] == ["comparison", "parity", "max_of_list", "doubling"]
    assert (study["fisher"]["harmful_samples"], study["fisher"]["benign_samples"]) == (80, 160)


def test_study_trains_s_with_the_point_the_validation_sweep_chose(study):
    """S's recipe in the study is the grid point `experiments.tune_safety` measured as meeting
    both targets on the validation split (docs/study/tune_seeds01), not a value picked by hand."""
    import json
    from functools import reduce
    report = json.loads((Path(STUDY).parents[1] / "docs" / "study" / "tune_seeds01" / "s144_h240_b440"
                         / "tune_safety.json").read_text())
    (row,) = report["rows"]
    assert row["meets_targets"] and len(report["seeds"]) >= 2
    assert {key: reduce(dict.__getitem__, key.split("."), study) for key in row["point"]} == row["point"]
