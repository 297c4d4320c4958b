"""The package imports and the command line explains itself."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUBPACKAGES = ["models", "lora", "fisher", "linalg", "merge", "data", "eval"]


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_subpackage_imports_and_says_what_belongs_there(name):
    module = importlib.import_module(f"sst_jax.{name}")
    assert module.__doc__ and len(module.__doc__.split()) >= 8


def test_cli_help_lists_the_original_flags_with_help_text():
    out = subprocess.run([sys.executable, "experiments/run_real_experiments.py", "--helpfull"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for flag, words in {"--mode": "minimal", "--model": "mistral-7b",
                        "--experiment": "exp1"}.items():
        entry = f"  {flag}:"
        assert entry in text, f"{flag} is not a defined flag"
        block = text[text.index(entry):][:600]
        assert words in block, f"{flag} help does not mention {words}"


def test_cli_rejects_an_unknown_mode():
    out = subprocess.run([sys.executable, "experiments/run_real_experiments.py", "--mode", "huge"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "mode" in out.stderr
