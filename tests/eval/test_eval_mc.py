"""MC scoring against HF transformers PyTorch on the same tiny random Llama, and the prompt
string against lm-eval-harness's MMLU format."""

import numpy as np
import pytest
import torch

from sst_jax.data.chat import encode_plain
from sst_jax.data.sources import MCQuestion
from sst_jax.eval.mc import evaluate_mc, mc_continuations, mc_prompt, single_token_choice_ids

QUESTIONS = [
    MCQuestion("What is 12 + 35?", ("47", "46", "57", "37"), 0, "addition", "fixture"),
    MCQuestion("What is the capital of France?", ("Rome", "Paris", "Tokyo", "Berlin"), 1,
               "capitals", "fixture"),
    MCQuestion("Which colour is the sky on a clear day?", ("red", "green", "blue", "yellow"), 2,
               "knowledge", "fixture"),
    MCQuestion("What is 7 * 8?", ("54", "64", "48", "56"), 3, "multiplication", "fixture"),
    MCQuestion("How do I bake bread?", ("knead the dough", "freeze it", "boil it", "paint it"), 0,
               "cooking", "fixture"),
]


def _hf_choice_logliks(hf, tok, question):
    """Summed log p(continuation | prompt) per choice, one unpadded torch forward each."""
    out = []
    for cont in mc_continuations():
        ids, mask = encode_plain(tok, mc_prompt(question.question, question.choices), cont)
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        tgt = torch.tensor(ids[1:])
        tok_lp = logp[torch.arange(len(tgt)), tgt].numpy()
        out.append(float((tok_lp * np.asarray(mask[1:])).sum()))
    return np.asarray(out)


def test_prompt_matches_lm_eval_mmlu_format():
    text = mc_prompt("What is 2 + 2?", ["3", "4", "5", "22"])
    assert text == "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
    assert mc_continuations() == (" A", " B", " C", " D")


@pytest.mark.parametrize("single_token", [True, False])
def test_choice_logliks_and_accuracy_match_hf_torch(pair, single_token):
    hf, model = pair
    assert single_token_choice_ids(model.tokenizer) is not None
    result = evaluate_mc(model, model.params, QUESTIONS, batch_size=4,
                         single_token=single_token, progress=False)
    ref = np.stack([_hf_choice_logliks(hf, model.tokenizer, q) for q in QUESTIONS])
    ours = np.asarray([r.loglik for r in result.records])
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    ref_pred = ref.argmax(axis=1)
    assert [r.prediction for r in result.records] == ref_pred.tolist()
    ref_acc = float(np.mean(ref_pred == np.asarray([q.answer for q in QUESTIONS])))
    assert result.accuracy.value == pytest.approx(ref_acc)
    assert result.accuracy.n == len(QUESTIONS)
    assert result.scoring == ("single-token" if single_token else "per-continuation")


def test_branches_match_hf_with_delta_merged_into_weights(pair):
    """A low-rank branch on layer 0's v_proj scores like torch with W + ΔW in that layer."""
    import copy

    import jax.numpy as jnp

    from sst_jax.models import LowRank

    hf, model = pair
    r = np.random.default_rng(0)
    a, b = r.normal(size=(4, 64)) * 0.3, r.normal(size=(32, 4)) * 0.3  # v_proj: (2 kv heads · 16, 64)
    branch = LowRank(a=jnp.asarray(a, jnp.float32), b=jnp.asarray(b, jnp.float32), scale=2.0)
    patched = copy.deepcopy(hf)
    with torch.no_grad():
        patched.model.layers[0].self_attn.v_proj.weight += torch.tensor(2.0 * b @ a, dtype=torch.float32)
    result = evaluate_mc(model, model.params, QUESTIONS[:3], branches={(0, "v_proj"): (branch,)},
                         progress=False)
    ref = np.stack([_hf_choice_logliks(patched, model.tokenizer, q) for q in QUESTIONS[:3]])
    base = np.stack([_hf_choice_logliks(hf, model.tokenizer, q) for q in QUESTIONS[:3]])
    assert np.abs(ref - base).max() > 1e-3  # the patch matters at this scale
    np.testing.assert_allclose([r.loglik for r in result.records], ref, atol=1e-4, rtol=0)


def test_few_shot_context_format():
    from sst_jax.eval.mc import mc_context

    shot = MCQuestion("1+1?", ("1", "2", "3", "4"), 1, "elementary_mathematics", "dev")
    q = MCQuestion("2+2?", ("3", "4", "5", "6"), 1, "elementary_mathematics", "test")
    assert mc_context(q) == mc_prompt(q.question, q.choices)
    assert mc_context(q, shots=[shot], description=True) == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")


def test_few_shot_scores_match_hf_torch(pair):
    hf, model = pair
    from sst_jax.eval.mc import mc_context

    shots = [MCQuestion("What is 1 + 1?", ("2", "3", "4", "5"), 0, q.subject, "dev") for q in QUESTIONS[:2]]
    result = evaluate_mc(model, model.params, QUESTIONS[:2], fewshot=shots, n_shots=1,
                         progress=False)
    ref = []
    for q in QUESTIONS[:2]:
        ctx = mc_context(q, shots=[shots[0]])
        row = []
        for cont in mc_continuations():
            ids, mask = encode_plain(model.tokenizer, ctx, cont)
            with torch.no_grad():
                logits = hf(input_ids=torch.tensor([ids])).logits[0].double()
            lp = torch.log_softmax(logits[:-1], -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
            row.append(float((lp.numpy() * np.asarray(mask[1:])).sum()))
        ref.append(row)
    np.testing.assert_allclose([r.loglik for r in result.records], ref, atol=1e-4)
