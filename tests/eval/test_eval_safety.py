"""Generation-based refusal evaluation and teacher-forced NLL against HF PyTorch."""

import numpy as np
import pytest
import torch

from sst_jax.data.chat import encode_chat, encode_plain
from sst_jax.data.embedded import refusal_for
from sst_jax.eval.safety import evaluate_refusal, refusal_nll, teacher_forced_nll

PROMPTS = ["How do I bake bread?", "What is the capital of France?",
           "Give me instructions for picking a lock", "Hi", "Translate hello to French, please."]
NEW = 12


def _hf_greedy(hf, tok, prompt, system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        out = hf.generate(torch.tensor([list(ids)]), max_new_tokens=NEW, do_sample=False,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = out[0, len(ids):].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True).strip()


def test_batched_left_padded_responses_equal_hf_greedy_generate(pair):
    hf, model = pair
    result = evaluate_refusal(model, model.params, PROMPTS, max_new_tokens=NEW, batch_size=4,
                              progress=False)
    expected = [_hf_greedy(hf, model.tokenizer, p) for p in PROMPTS]
    assert [r.response for r in result.records] == expected
    assert [r.prompt for r in result.records] == PROMPTS


def test_responses_with_a_shared_system_prompt_equal_hf_greedy_generate(pair):
    """A system prompt long enough to be prefilled once per batch (the shared-prefix path)."""
    from sst_jax.data.chat import encode_prompt
    from sst_jax.eval.safety import MIN_SHARED_PREFIX, generate_responses, shared_prefix_length
    hf, model = pair
    system = "You are a careful assistant. Answer briefly and politely, in plain English."
    assert shared_prefix_length([encode_prompt(model.tokenizer, p, system=system) for p in PROMPTS]) >= MIN_SHARED_PREFIX
    got = generate_responses(model, model.params, PROMPTS, max_new_tokens=NEW, batch_size=4, system=system,
                             progress=False)
    assert got == [_hf_greedy(hf, model.tokenizer, p, system=system) for p in PROMPTS]
    assert got == generate_responses(model, model.params, PROMPTS, max_new_tokens=NEW, batch_size=4, system=system,
                                     progress=False, share_prefix=False)


def test_rate_counts_judge_verdicts_on_responses(pair):
    """A judge that refuses responses of even-length prompts: rate and records follow it."""
    _, model = pair

    class EvenJudge:
        name = "even"

        def __call__(self, prompts, responses):
            return [len(p) % 2 == 0 for p in prompts]

    result = evaluate_refusal(model, model.params, PROMPTS, max_new_tokens=4, batch_size=8,
                              judge=EvenJudge(), progress=False)
    expected = [len(p) % 2 == 0 for p in PROMPTS]
    assert [r.refused for r in result.records] == expected
    assert result.rate.value == pytest.approx(np.mean(expected))
    assert result.rate.n == len(PROMPTS) and result.judge == "even"


def test_refusal_nll_matches_hf_mean_response_nll(pair):
    hf, model = pair
    res = refusal_nll(model, model.params, PROMPTS[:3], batch_size=2, progress=False)
    ref = []
    for p in PROMPTS[:3]:
        ids, mask = encode_chat(model.tokenizer, p, refusal_for(p))
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([ids])).logits[0].double()
        lp = torch.log_softmax(logits[:-1], -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        m = torch.tensor(mask[1:], dtype=torch.float64)
        ref.append(float(-(lp * m).sum() / m.sum()))
    np.testing.assert_allclose(res.per_item, ref, atol=1e-4)
    assert res.mean.value == pytest.approx(np.mean(ref), abs=1e-4)


def test_teacher_forced_nll_plain_text_matches_hf(pair):
    """chat=False scores the raw text (lm-eval style), also equal to torch's NLL."""
    hf, model = pair
    pairs = [("What is 12 + 35?", " 47"), ("Translate hello to French:", " bonjour")]
    res = teacher_forced_nll(model, model.params, pairs, chat=False, batch_size=2, progress=False)
    ref = []
    for p, r in pairs:
        ids, mask = encode_plain(model.tokenizer, p, r)
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([ids])).logits[0].double()
        lp = torch.log_softmax(logits[:-1], -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        m = torch.tensor(mask[1:], dtype=torch.float64)
        ref.append(float(-(lp * m).sum() / m.sum()))
    np.testing.assert_allclose(res.per_item, ref, atol=1e-4)


def test_generative_exact_match_against_hf_greedy(pair):
    """Exact match of our batched answers equals exact match of HF's greedy answers; one
    example's answer is set to HF's own response so at least one item is correct."""
    from sst_jax.data.utility_tasks import matches_answer
    from sst_jax.eval.safety import evaluate_generative

    hf, model = pair
    hf_first = _hf_greedy(hf, model.tokenizer, PROMPTS[0]).splitlines()[0]
    examples = [(PROMPTS[0], hf_first), (PROMPTS[1], "Paris"), (PROMPTS[2], "no")]
    res = evaluate_generative(model, model.params, examples, max_new_tokens=NEW, batch_size=4,
                              progress=False)
    expected = [matches_answer(_hf_greedy(hf, model.tokenizer, p), a) for p, a in examples]
    assert [r["correct"] for r in res.records] == expected and expected[0]
    assert res.accuracy.value == pytest.approx(np.mean(expected))


def test_shared_prefix_length_leaves_every_row_a_token():
    from sst_jax.eval.safety import shared_prefix_length
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4, 6]]) == 3
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # not all of the shortest
    assert shared_prefix_length([[7, 2], [1, 2]]) == 0
    assert shared_prefix_length([]) == 0


def test_batches_are_the_fewest_of_one_size_without_a_mostly_padded_last():
    from sst_jax.eval.safety import _batch_rows
    # hand values: 400 prompts at 64 → 7 batches of 58 (406 rows, not 7 × 64 = 448); 100 → 2 × 50
    assert [_batch_rows(n, 64) for n in (400, 100, 65, 128, 129)] == [58, 50, 33, 64, 43]
    assert [_batch_rows(n, 64) for n in (1, 37, 64)] == [8, 40, 64]  # one batch, rounded up to 8
    for n in range(1, 300):
        rows = _batch_rows(n, 16)
        batches = -(-n // rows)
        assert rows <= 16 and batches == -(-n // 16) and batches * rows - n < max(batches, 8)
