"""One end-to-end run of exp1-exp3 on the `tiny` preset (configs/smoke.json), shared by the
tests that read its result files (≈ 1-2 min on 2 CPU cores)."""

import json
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMOKE_CONFIG = str(REPO / "configs" / "smoke.json")


def tiny_settings(out: Path, **flags):
    """RunSettings of `run_real_experiments.py --model tiny --config configs/smoke.json
    --output_dir OUT` (every other flag at its default; `flags` override)."""
    from experiments import run_real_experiments, runner

    flag_values = run_real_experiments.FLAGS
    values = {name: flag_values[name].default for name in flag_values}
    values.update(model="tiny", mode="minimal", experiment="all", config=SMOKE_CONFIG,
                  output_dir=str(out), seed=0, log_file="", **flags)
    return runner.RunSettings.from_flags(types.SimpleNamespace(**values))


def run_tiny(out: Path) -> dict[str, dict]:
    """All three experiments on `tiny` into `out`; {experiment: result payload}."""
    from experiments import runner

    paths = runner.run_model("tiny", tiny_settings(out))
    return {json.loads(p.read_text())["experiment"]: json.loads(p.read_text()) for p in paths}


@pytest.fixture(scope="session")
def run_tiny_experiments():
    """`run_tiny` itself, for tests that need runs of their own (conftest is not importable)."""
    return run_tiny


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(root, results dir = root / "results", {experiment: payload}): the guide's commands
    run in `root`, where `results/` is where the runner's default --output_dir would be."""
    root = tmp_path_factory.mktemp("tiny_run")
    out = root / "results"
    return root, out, run_tiny(out)
