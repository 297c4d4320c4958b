"""The tiny preset, its tokenizer, and generation semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sst_jax.data.chat import collate, encode_prompt
from sst_jax.models import forward, generate, load_model


def test_tiny_is_seeded(tiny_model):
    again = load_model("tiny", seed=0)
    other = load_model("tiny", seed=1)
    w = tiny_model.params["layers"][0]["q_proj"]["weight"]
    np.testing.assert_array_equal(w, again.params["layers"][0]["q_proj"]["weight"])
    assert not np.allclose(w, other.params["layers"][0]["q_proj"]["weight"])


def test_tiny_tokenizer_chat_template_is_chatml(tiny_model):
    tok = tiny_model.tokenizer
    ids = encode_prompt(tok, "What is 2 + 3?")
    assert tok.decode(ids) == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok.encode("Any text, even ünïcödé!")) == "Any text, even ünïcödé!"
    assert tiny_model.config.eos_token_ids == (tok.convert_tokens_to_ids("<|im_end|>"),)
    assert tiny_model.config.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert tiny_model.config.vocab_size == len(tok)


def _greedy_by_full_forward(m, ids, mask, n):
    """Reference decoding without a cache: rerun the whole sequence every step. The buffer is
    right-padded to its final length (causal attention never looks at later slots), so one
    compiled forward serves every step."""
    b, t = ids.shape
    ids = np.concatenate([ids, np.zeros((b, n), ids.dtype)], axis=1)
    mask = np.concatenate([mask, np.zeros((b, n), mask.dtype)], axis=1)
    f = jax.jit(forward, static_argnums=0)
    for i in range(n):
        logits = f(m.config, m.params, ids, mask)
        ids[:, t + i] = np.asarray(jnp.argmax(logits[:, t + i - 1], axis=-1))
        mask[:, t + i] = 1
    return ids[:, t:]


def test_kv_cache_greedy_equals_full_recompute_with_left_padding(tiny_model):
    tok = tiny_model.tokenizer
    seqs = [encode_prompt(tok, p) for p in ("Hi", "The capital of France is a city called")]
    batch = collate(seqs, tiny_model.config.pad_token_id)
    assert batch["attention_mask"][0, 0] == 0  # the short prompt is left-padded
    got = generate(tiny_model, tiny_model.params, batch["input_ids"], batch["attention_mask"],
                   max_new_tokens=8, eos_token_ids=())
    want = _greedy_by_full_forward(tiny_model, batch["input_ids"], batch["attention_mask"], 8)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_generation_pads_after_eos(tiny_model):
    m = tiny_model
    batch = collate([encode_prompt(m.tokenizer, "Hello")], m.config.pad_token_id)
    free = np.asarray(generate(m, m.params, batch["input_ids"], batch["attention_mask"],
                               max_new_tokens=6, eos_token_ids=()))
    stop = int(free[0, 2])  # pretend the third generated token is EOS
    got = np.asarray(generate(m, m.params, batch["input_ids"], batch["attention_mask"],
                              max_new_tokens=6, eos_token_ids=(stop,)))
    first = int(np.argmax(free[0] == stop))
    np.testing.assert_array_equal(got[0, : first + 1], free[0, : first + 1])
    assert (got[0, first + 1:] == m.config.pad_token_id).all()


def test_sampling_is_keyed_and_top_p_tiny_is_greedy(tiny_model):
    m = tiny_model
    batch = collate([encode_prompt(m.tokenizer, "Tell me a story")] * 2, m.config.pad_token_id)
    run = lambda **kw: np.asarray(generate(m, m.params, batch["input_ids"], batch["attention_mask"],
                                           max_new_tokens=6, eos_token_ids=(), **kw))
    a = run(temperature=1.0, key=jax.random.key(1))
    np.testing.assert_array_equal(a, run(temperature=1.0, key=jax.random.key(1)))
    assert not np.array_equal(a, run(temperature=1.0, key=jax.random.key(2)))
    # A nucleus smaller than the top token's mass keeps only the argmax: greedy.
    np.testing.assert_array_equal(run(temperature=1.0, top_p=1e-6, key=jax.random.key(3)), run())


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2_model):
    m = smollm2_model
    batch = collate([encode_prompt(m.tokenizer, "What is the capital of France?")], m.config.pad_token_id)
    out = generate(m, m.params, batch["input_ids"], batch["attention_mask"], max_new_tokens=16)
    assert "Paris" in m.tokenizer.decode(np.asarray(out[0]), skip_special_tokens=True)


def test_top_p_and_temperature_sample_the_renormalized_nucleus():
    from sst_jax.models.generate import _choose

    p = np.array([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = jnp.asarray(np.log(p), jnp.float32)[None].repeat(20000, axis=0)
    draw = lambda t, top: np.bincount(np.asarray(_choose(logits, jax.random.key(7), t, top, True)), minlength=5) / 20000
    # top_p = 0.85: the mass before token 2 is 0.8 < 0.85, so tokens {0, 1, 2} are kept.
    np.testing.assert_allclose(draw(1.0, 0.85), [0.5 / 0.9, 0.3 / 0.9, 0.1 / 0.9, 0, 0], atol=0.012)
    # temperature 2: p^(1/2), renormalized; top_p = 1 keeps everything.
    q = np.sqrt(p) / np.sqrt(p).sum()
    np.testing.assert_allclose(draw(2.0, 1.0), q, atol=0.012)


def test_shared_prefix_generation_equals_whole_rows_and_the_full_recompute(tiny_model):
    """Rows [prefix][padding][suffix] decode as the unpadded prefix + suffix sequences would."""
    m, tok = tiny_model, tiny_model.tokenizer
    seqs = [encode_prompt(tok, p, system="You are terse.") for p in ("Hi", "The capital of France is a city called",
                                                                     "Name a colour")]
    p = 9
    assert all(s[:p] == seqs[0][:p] for s in seqs)
    whole = collate(seqs, m.config.pad_token_id)
    suffix = collate([s[p:] for s in seqs], m.config.pad_token_id)
    assert suffix["attention_mask"][0, 0] == 0  # padding sits between prefix and suffix
    got = np.asarray(generate(m, m.params, suffix["input_ids"], suffix["attention_mask"], max_new_tokens=8,
                              eos_token_ids=(), prefix_ids=seqs[0][:p]))
    np.testing.assert_array_equal(got, _greedy_by_full_forward(m, whole["input_ids"], whole["attention_mask"], 8))
    np.testing.assert_array_equal(got, np.asarray(generate(m, m.params, whole["input_ids"], whole["attention_mask"],
                                                           max_new_tokens=8, eos_token_ids=())))


def test_shared_prefix_generation_with_lora_branches_equals_whole_rows(tiny_model):
    """The prefix's own forward runs with the adapter's branches too."""
    from sst_jax.lora.adapter import init_lora
    m, tok = tiny_model, tiny_model.tokenizer
    lora = init_lora(jax.random.key(3), m.config, targets=("q_proj", "v_proj", "down_proj"), r=2, alpha=4,
                     base_model="tiny")
    lora = lora.replace_factors({k: type(f)(a=f.a, b=jax.random.normal(jax.random.key(4), f.b.shape) * 0.5)
                                 for k, f in lora.factors.items()})
    branches = lora.to_branches()
    seqs = [encode_prompt(tok, p, system="You are terse.") for p in ("Hi", "Name a colour of the sea")]
    p = 9
    whole = collate(seqs, m.config.pad_token_id)
    suffix = collate([s[p:] for s in seqs], m.config.pad_token_id)
    run = lambda b, **kw: np.asarray(generate(m, m.params, b["input_ids"], b["attention_mask"], max_new_tokens=8,  # noqa: E731
                                              eos_token_ids=(), branches=branches, **kw))
    got = run(suffix, prefix_ids=seqs[0][:p])
    np.testing.assert_array_equal(got, run(whole))
    assert not np.array_equal(got, np.asarray(generate(m, m.params, whole["input_ids"], whole["attention_mask"],
                                                       max_new_tokens=8, eos_token_ids=())))  # the branches act


def test_shared_prefix_is_refused_where_a_sliding_window_is_shorter_than_the_cache(tiny_model):
    import dataclasses
    from sst_jax.models.generate import supports_shared_prefix
    windowed = dataclasses.replace(tiny_model.config, sliding_window=6)
    assert supports_shared_prefix(windowed, 6) and not supports_shared_prefix(windowed, 7)
    assert supports_shared_prefix(tiny_model.config, 10**6)
    ids = np.ones((1, 3), np.int32)
    with pytest.raises(ValueError, match="7-slot cache"):
        generate(windowed, tiny_model.params, ids, np.ones_like(ids), max_new_tokens=2, prefix_ids=[1, 2])
    generate(windowed, tiny_model.params, ids, np.ones_like(ids), max_new_tokens=1, prefix_ids=[1, 2])  # 6 slots
