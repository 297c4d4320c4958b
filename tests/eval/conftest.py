"""A tiny random Llama in HF PyTorch and the same weights loaded by sst_jax (built once)."""

import pytest
import torch
import transformers

from sst_jax.models import load_model
from sst_jax.models.tokenizer import tiny_tokenizer


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    """(HF torch LlamaForCausalLM, our LoadedModel) with identical random weights."""
    d = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-6, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the default init: peaky logits, stable argmax
        for _, p in hf.named_parameters():
            p.copy_(0.1 * torch.randn_like(p))
    hf.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return hf, load_model(str(d))
