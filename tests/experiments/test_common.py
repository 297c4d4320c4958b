"""experiments.common.provenance: the commit and CPU a result file records, checked against git
and /proc/cpuinfo read here independently."""

import subprocess
from pathlib import Path

import pytest

from experiments import common


def _git(*args):
    return subprocess.run(["git", "-C", str(common.REPO), *args], capture_output=True, text=True)


def test_provenance_names_the_checkouts_commit_and_whether_it_is_dirty():
    head = _git("rev-parse", "HEAD")
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    assert common.provenance()["git_commit"] == head.stdout.strip() + ("+dirty" if dirty else "")


def test_provenance_outside_git_says_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "REPO", tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no parent repository either
    assert common.provenance()["git_commit"] == "unknown"


def test_provenance_names_the_cpu_model():
    info = Path("/proc/cpuinfo")
    if not info.exists():
        pytest.skip("no /proc/cpuinfo")
    names = [line.partition(":")[2].strip() for line in info.read_text().splitlines() if line.startswith("model name")]
    if not names:
        pytest.skip("/proc/cpuinfo names no model")
    out = common.provenance()
    assert out["cpu"].startswith(names[0])
    flags = next(line for line in info.read_text().splitlines() if line.startswith("flags")).split()
    assert ("avx512f" in out["cpu"]) == ("avx512f" in flags)  # which AVX generation XLA can use
    assert 1 <= out["cpus"] <= len(names)
