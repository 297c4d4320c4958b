"""Workbench pieces that need no full run: splits, user-supplied adapters, flag parsing."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.common import Cache, Timings, load_config
from experiments.runner import parse_adapter_flags
from experiments.workbench import Workbench, build_splits
from sst_jax.errors import AdapterMismatchError, DatasetError, SstJaxError
from sst_jax.lora.adapter import init_lora
from sst_jax.lora.peft_io import save_peft

SMOKE = str(Path(__file__).resolve().parents[2] / "configs" / "smoke.json")


@pytest.fixture(scope="module")
def cfg():
    return load_config("minimal", "tiny", SMOKE)


def test_held_out_prompts_never_reach_training_or_fisher_data(cfg):
    splits = build_splits(cfg, seed=3)
    assert not set(splits.harmful_train) & set(splits.harmful_test)
    assert not set(splits.benign_train) & set(splits.benign_test)
    for d in splits.domains:
        assert not {q.question for q in splits.mc_train[d]} & {q.question for q in splits.mc_test[d]}
        assert not {p for p, _ in splits.gen_train[d]} & {p for p, _ in splits.gen_test[d]}


def test_test_prompts_do_not_depend_on_the_seed(cfg):
    a, b = build_splits(cfg, seed=0), build_splits(cfg, seed=1)
    assert a.harmful_test == b.harmful_test and a.benign_test == b.benign_test


def test_a_user_supplied_safety_adapter_is_used_not_retrained(cfg, tiny_model, tmp_path):
    given = init_lora(jax.random.key(7), tiny_model.config, targets=("q_proj", "v_proj"), r=2, alpha=4,
                      base_model="tiny", name="mine")
    given = given.replace_factors({k: type(f)(a=f.a, b=jnp.full(f.b.shape, 0.5))
                                   for k, f in given.factors.items()})
    save_peft(given, tmp_path / "safety")
    wb = Workbench(tiny_model, cfg, build_splits(cfg, seed=0), Cache(tmp_path / "cache"), seed=0,
                   timings=Timings(), external_adapters={"safety": str(tmp_path / "safety")})
    used = wb.safety_adapter()
    assert set(used.factors) == set(given.factors)
    for k in given.factors:
        np.testing.assert_array_equal(np.asarray(used.factors[k].b), np.asarray(given.factors[k].b))
    assert "train_safety" not in wb.timings.seconds


def test_a_user_adapter_for_another_model_is_refused(cfg, tiny_model, tmp_path):
    bigger = tiny_model.config.replace(d_model=tiny_model.config.d_model * 2)
    other = init_lora(jax.random.key(0), bigger, targets=("q_proj",), r=2, alpha=4, base_model="tiny")
    save_peft(other, tmp_path / "other")
    wb = Workbench(tiny_model, cfg, build_splits(cfg, seed=0), Cache(tmp_path / "cache"), seed=0,
                   timings=Timings(), external_adapters={"safety": str(tmp_path / "other")})
    with pytest.raises(AdapterMismatchError, match="q_proj"):
        wb.safety_adapter()


def test_adapter_flags_are_parsed_and_checked(tmp_path):
    (tmp_path / "a").mkdir()
    assert parse_adapter_flags(str(tmp_path / "a"), [f"parity={tmp_path / 'a'}"]) == {
        "safety": str(tmp_path / "a"), "expert:parity": str(tmp_path / "a")}
    with pytest.raises(SstJaxError, match="DOMAIN=DIR"):
        parse_adapter_flags(None, ["no-equals-sign"])
    with pytest.raises(SstJaxError, match="not a directory"):
        parse_adapter_flags(str(tmp_path / "missing"), [])


@pytest.mark.parametrize("rows, needle", [([], "empty"), ([{"prompt": "a"}, {"prompt": "b"}], "2 prompts.*at least 3"),
                                          ([{"prompt": "a"}, {"text": "b"}, {"prompt": "c"}], "line 2.*'prompt'")])
def test_a_benign_file_too_small_or_without_prompts_fails_before_the_model_loads(cfg, tmp_path, rows, needle):
    path = tmp_path / "benign.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetError, match=needle):
        build_splits(cfg, seed=0, benign_path=str(path))


def test_user_adapters_are_checked_before_any_training(cfg, tiny_model, tmp_path):
    ok = init_lora(jax.random.key(1), tiny_model.config, targets=("q_proj",), r=2, alpha=4, base_model="tiny")
    save_peft(ok, tmp_path / "ok")
    splits = build_splits(cfg, seed=0)
    wb = Workbench(tiny_model, cfg, splits, Cache(tmp_path / "cache"), seed=0, timings=Timings(),
                   external_adapters={"expert:no_such_domain": str(tmp_path / "ok")})
    with pytest.raises(DatasetError, match="no_such_domain.*known: " + splits.domains[0]):
        wb.check_external_adapters()
    bigger = tiny_model.config.replace(d_model=tiny_model.config.d_model * 2)
    save_peft(init_lora(jax.random.key(0), bigger, targets=("q_proj",), r=2, alpha=4), tmp_path / "other")
    wb = Workbench(tiny_model, cfg, splits, Cache(tmp_path / "cache"), seed=0, timings=Timings(),
                   external_adapters={"expert:" + splits.domains[0]: str(tmp_path / "ok"),
                                      "safety": str(tmp_path / "other")})
    with pytest.raises(AdapterMismatchError, match="q_proj"):
        wb.check_external_adapters()
    assert wb.timings.seconds == {}  # nothing was trained or generated
