"""The LoRA trainer on the `tiny` preset: learning, resume, accumulation, early stopping, errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sst_jax.data.chat import collate, encode_chat, encode_prompt
from sst_jax.errors import AdapterMismatchError, DatasetError, SstJaxError
from sst_jax.lora.adapter import LoraFactors, init_lora
from sst_jax.lora.train import TrainConfig, micro_batch_indices, train_lora
from sst_jax.models import forward, generate, load_model
from sst_jax.models.loss import response_nll

TARGET = "I cannot help with that."
SUBJECTS = ["bread", "stars", "Paris", "forests", "yeast", "oceans", "code", "the weather",
            "chemistry", "law", "Rome", "Tokyo", "physics", "music", "dogs", "math"]
TRAIN = [(f"Tell me about {s}.", TARGET) for s in SUBJECTS[:12]]
HELD_OUT = [(f"Tell me about {s}.", TARGET) for s in SUBJECTS[12:]]
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", seed=0)


def fresh(model, seed=0):
    return init_lora(jax.random.key(seed), model.config, targets=TARGETS, r=8, alpha=16, base_model="tiny")


def small(model, seed=0):
    """A cheaper adapter (two modules) for tests of the training mechanics."""
    return init_lora(jax.random.key(seed), model.config, targets=["q_proj", "v_proj"], r=4, alpha=8,
                     base_model="tiny")


def held_out_loss(model, branches) -> float:
    enc = [encode_chat(model.tokenizer, p, r) for p, r in HELD_OUT]
    b = collate([e[0] for e in enc], model.config.pad_token_id, loss_masks=[e[1] for e in enc])
    logits = forward(model.config, model.params, b["input_ids"], b["attention_mask"], branches=branches)
    return float(response_nll(logits, b["input_ids"], b["loss_mask"]).mean())


def greedy(model, branches) -> list[str]:
    b = collate([encode_prompt(model.tokenizer, p) for p, _ in HELD_OUT], model.config.pad_token_id)
    out = generate(model, model.params, b["input_ids"], b["attention_mask"], max_new_tokens=10, branches=branches)
    return [model.tokenizer.decode(row, skip_special_tokens=True) for row in np.asarray(out)]


def test_training_lowers_held_out_loss_and_greedy_outputs_reach_the_target(tiny):
    cfg = TrainConfig(steps=30, lr=1e-2, warmup_steps=3, batch_size=4, eval_every=15, max_length=64)
    adapter, hist = train_lora(tiny, fresh(tiny), TRAIN, HELD_OUT, cfg, progress=False)
    before, after = held_out_loss(tiny, None), held_out_loss(tiny, adapter.to_branches())
    assert after < before - 0.3
    assert hist["eval_loss"][-1] == pytest.approx(after, abs=1e-4)
    assert not any(TARGET in s for s in greedy(tiny, None))
    assert sum(s.strip() == TARGET for s in greedy(tiny, adapter.to_branches())) >= 3


def test_interrupted_run_resumed_from_checkpoint_is_bit_identical(tiny, tmp_path):
    cfg = TrainConfig(steps=6, lr=5e-3, warmup_steps=2, batch_size=3, grad_accum=2, lora_dropout=0.1,
                      eval_every=2, checkpoint_every=2, max_length=64)
    full, full_hist = train_lora(tiny, small(tiny), TRAIN, HELD_OUT, cfg, progress=False)

    def interrupt(step, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_lora(tiny, small(tiny), TRAIN, HELD_OUT, cfg, checkpoint_dir=tmp_path, progress=False,
                   callback=interrupt)
    resumed, hist = train_lora(tiny, small(tiny), TRAIN, HELD_OUT, cfg, checkpoint_dir=tmp_path, progress=False)
    assert hist["train_loss"] == full_hist["train_loss"] and hist["eval_loss"] == full_hist["eval_loss"]
    for key in full.factors:
        np.testing.assert_array_equal(np.asarray(resumed.factors[key].a), np.asarray(full.factors[key].a))
        np.testing.assert_array_equal(np.asarray(resumed.factors[key].b), np.asarray(full.factors[key].b))


def test_resume_with_other_settings_is_refused(tiny, tmp_path):
    cfg = TrainConfig(steps=1, lr=1e-3, warmup_steps=0, batch_size=2, max_length=64)
    train_lora(tiny, small(tiny), TRAIN[:2], None, cfg, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(SstJaxError, match="belongs to a run with other settings"):
        train_lora(tiny, small(tiny), TRAIN[:2], None, TrainConfig(steps=2, lr=1e-3, warmup_steps=0,
                   batch_size=2, max_length=64), checkpoint_dir=tmp_path, progress=False)


def test_gradient_accumulation_equals_one_large_batch(tiny):
    """Two micro-batches of 2 averaged = one batch of 4 (same samples: the batch stream is shared)."""
    np.testing.assert_array_equal(np.concatenate([micro_batch_indices(12, 2, 0, m) for m in (0, 1)]),
                                  micro_batch_indices(12, 4, 0, 0))
    common = dict(steps=1, lr=1e-2, warmup_steps=0, max_length=64, max_grad_norm=None)
    big, _ = train_lora(tiny, small(tiny), TRAIN, None, TrainConfig(batch_size=4, **common), progress=False)
    acc, _ = train_lora(tiny, small(tiny), TRAIN, None, TrainConfig(batch_size=2, grad_accum=2, **common),
                        progress=False)
    for key in big.factors:
        np.testing.assert_allclose(np.asarray(acc.factors[key].b), np.asarray(big.factors[key].b), atol=1e-6)


def test_batch_order_is_a_seeded_permutation_per_epoch():
    stream = np.concatenate([micro_batch_indices(10, 5, 7, m) for m in range(4)])
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:])
    np.testing.assert_array_equal(micro_batch_indices(10, 5, 7, 3), stream[15:])


def test_early_stopping_returns_the_best_adapter(tiny, tmp_path):
    """Held-out responses contradict the training target, so the eval loss rises after a while."""
    contradicting = [(p, "Sure! Here is a short answer.") for p, _ in HELD_OUT]
    cfg = TrainConfig(steps=40, lr=2e-2, warmup_steps=0, batch_size=4, eval_every=2, patience=2, max_length=64)
    adapter, hist = train_lora(tiny, fresh(tiny), TRAIN, contradicting, cfg, checkpoint_dir=tmp_path,
                               progress=False)
    assert hist["stopped_early"] and hist["steps_run"] < 40
    # rerunning with the same checkpoint_dir restores the stopped run instead of training on
    again, hist2 = train_lora(tiny, fresh(tiny), TRAIN, contradicting, cfg, checkpoint_dir=tmp_path,
                              progress=False)
    assert hist2 == hist
    for key in adapter.factors:
        np.testing.assert_array_equal(np.asarray(again.factors[key].b), np.asarray(adapter.factors[key].b))
    best = int(np.argmin(hist["eval_loss"]))
    assert hist["best_step"] == hist["eval_step"][best]
    assert hist["eval_loss"][-1] > hist["eval_loss"][best]
    assert held_out_loss(tiny, adapter.to_branches()) != pytest.approx(held_out_loss(tiny, None))
    enc = [encode_chat(tiny.tokenizer, p, r) for p, r in contradicting]
    b = collate([e[0] for e in enc], tiny.config.pad_token_id, loss_masks=[e[1] for e in enc])
    logits = forward(tiny.config, tiny.params, b["input_ids"], b["attention_mask"], branches=adapter.to_branches())
    assert float(response_nll(logits, b["input_ids"], b["loss_mask"]).mean()) == pytest.approx(
        hist["best_eval_loss"], abs=1e-4)


@pytest.mark.slow
def test_bf16_compute_tracks_float32_losses(tiny):
    cfg = dict(steps=3, lr=1e-2, warmup_steps=0, batch_size=4, max_length=64)
    _, h32 = train_lora(tiny, fresh(tiny), TRAIN, None, TrainConfig(**cfg), progress=False)
    _, h16 = train_lora(tiny, fresh(tiny), TRAIN, None, TrainConfig(bf16=True, **cfg), progress=False)
    np.testing.assert_allclose(h16["train_loss"], h32["train_loss"], rtol=2e-2)


def test_bad_training_inputs_are_clear_errors(tiny):
    cfg = TrainConfig(steps=1, batch_size=2, max_length=64)
    with pytest.raises(DatasetError, match="train item 1 must be a \\(prompt, response\\) pair"):
        train_lora(tiny, fresh(tiny), [TRAIN[0], ("only a prompt",)], None, cfg, progress=False)
    other = dataclasses.replace(tiny, config=tiny.config.replace(d_model=32))
    with pytest.raises(AdapterMismatchError, match="has down_proj output size 32"):
        train_lora(other, fresh(tiny), TRAIN, None, cfg, progress=False)


def l2_of_b(adapter) -> jax.Array:
    return 10.0 * sum(jnp.sum(f.b ** 2) for f in adapter.factors.values())


def test_regularizer_is_added_to_the_training_objective(tiny):
    cfg = TrainConfig(steps=1, lr=1e-2, warmup_steps=0, batch_size=2, max_length=64, max_grad_norm=None)
    start = small(tiny)
    shifted = start.replace_factors({k: LoraFactors(a=f.a, b=f.b + 0.1) for k, f in start.factors.items()})
    _, h2 = train_lora(tiny, shifted, TRAIN, None, cfg, progress=False, regularizer=l2_of_b)
    _, h3 = train_lora(tiny, shifted, TRAIN, None, cfg, progress=False)
    assert h2["train_loss"][0] == pytest.approx(h3["train_loss"][0] + float(l2_of_b(shifted)), rel=1e-5)


def test_encoded_items_train_exactly_like_the_same_chat_pairs():
    """Pre-encoded (ids, mask) items are used as given: same batches, same losses."""
    from sst_jax.data.chat import encode_chat
    from sst_jax.lora.train import TrainConfig, encode_pairs
    from sst_jax.models import load_model

    model = load_model("tiny", seed=0)
    cfg = TrainConfig(steps=1, max_length=64)
    pairs = [("Tell me about cats.", "Cats are small."), ("Add 2 and 3.", "5")]
    from_text = encode_pairs(model.tokenizer, pairs, cfg, "train")
    pre = [encode_chat(model.tokenizer, p, r) for p, r in pairs]
    assert encode_pairs(model.tokenizer, pre, cfg, "train") == from_text


def test_adapters_that_differ_only_in_name_share_one_compiled_step(tiny):
    # The name is static pytree data: trained as is, each of N experts would recompile the step.
    from sst_jax.lora import train as train_mod

    cfg = TrainConfig(steps=2, lr=1e-3, batch_size=4, warmup_steps=0, max_length=64)
    pairs = TRAIN[:4]  # one length bucket
    first = dataclasses.replace(small(tiny, seed=1), meta=dataclasses.replace(small(tiny).meta, name="expert:a"))
    second = dataclasses.replace(small(tiny, seed=2), meta=dataclasses.replace(small(tiny).meta, name="expert:b"))
    a, _ = train_lora(tiny, first, pairs, None, cfg, progress=False)
    compiled = train_mod._train_step._cache_size()
    b, _ = train_lora(tiny, second, pairs, None, cfg, progress=False)
    assert train_mod._train_step._cache_size() == compiled
    assert (a.meta.name, b.meta.name) == ("expert:a", "expert:b")
    # Same settings and data from other initial factors: the trained factors differ (a real run each).
    key = sorted(a.factors)[0]
    assert not np.allclose(np.asarray(a.factors[key].a), np.asarray(b.factors[key].a))
