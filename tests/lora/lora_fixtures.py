"""Tiny HF PyTorch Llama + PEFT helpers for the LoRA tests (built in code, random init)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama_config():
    return transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(tiny_llama_config())
    return model.eval()


def randomize_lora_b(peft_model, seed: int = 1, std: float = 0.2):
    """PEFT initialises B = 0; give it values so the adapter changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return peft_model


def peft_lora(seed: int = 0, **lora_kwargs):
    """(base_model_seed, PeftModel) with random non-zero B."""
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    kwargs.update(lora_kwargs)
    model = peft.get_peft_model(tiny_llama(seed), peft.LoraConfig(**kwargs))
    return randomize_lora_b(model, seed + 1).eval()


def lora_layers(peft_model):
    """{(layer, module): peft LoraLayer} of a PeftModel over a Llama."""
    from sst_jax.models.branches import parse_module_path

    out = {}
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            out[parse_module_path(name)] = mod
    return out
