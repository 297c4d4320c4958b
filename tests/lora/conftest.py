"""Fixtures of the LoRA tests."""

import pytest

from lora_fixtures import tiny_llama


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """save_pretrained output of the tiny base Llama (seed 0)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(0).save_pretrained(path)
    return path
