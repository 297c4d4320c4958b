"""A run killed (SIGKILL) part way resumes from its caches and ends with the numbers of an
uninterrupted run: every cache entry is written whole or not at all."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _command(out: Path) -> list[str]:
    return [sys.executable, str(REPO / "experiments" / "run_real_experiments.py"), "--mode", "minimal",
            "--model", "tiny", "--config", str(REPO / "configs" / "smoke.json"), "--experiment", "exp1",
            "--output_dir", str(out), "--log_file", ""]


def _env() -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": str(REPO)}


def _entries(out: Path) -> int:
    """Cache entries written so far. os.walk, not rglob: the run renames checkpoint folders
    while we count (orbax's temporary folders vanish mid-walk; os.walk skips them)."""
    return sum(1 for _, _, files in os.walk(out / "cache") for f in files if f.endswith((".json", ".pkl")))


def _kill_after(out: Path, entries: int, timeout: float = 300.0) -> None:
    """Start the run and SIGKILL it once `entries` cache entries exist."""
    proc = subprocess.Popen(_command(out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.monotonic()
    while proc.poll() is None and _entries(out) < entries and time.monotonic() - start < timeout:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _results(out: Path) -> dict:
    files = sorted((out / "exp1_safety_utility").glob("exp1_results_*.json"))
    assert files, "the run wrote no result file"
    return json.loads(files[-1].read_text())["results"]


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_numbers(tmp_path, tiny_run):
    _, _, uninterrupted = tiny_run
    out = tmp_path / "results"
    for entries in (1, 4, 9):  # killed three times, each later than the last
        _kill_after(out, entries)
    assert _entries(out) >= 1 and not list((out / "exp1_safety_utility").glob("*.json"))
    done = subprocess.run(_command(out), env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _results(out) == uninterrupted["exp1"]["results"]
