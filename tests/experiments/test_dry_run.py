"""`run_real_experiments --dry_run` plans for the mesh it is given (here 8 devices on a 1-device
CPU host), offline, from the preset's config alone."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_plans_an_8_device_mesh_offline_on_one_device():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "experiments.run_real_experiments", "--dry_run", "--mode", "full",
                          "--model", "mistral-7b", "--mesh", "fsdp=8", "--device_gb", "16", "--dtype", "bfloat16"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-2000:]
    head = next(line for line in out.stdout.splitlines() if line.startswith("**mistral-7b**"))
    # fsdp=8 on 16 GB devices; the Fisher chunk is the accelerator default when --device_gb plans elsewhere.
    assert "data=1 × fsdp=8 × tensor=1" in head and "fisher_chunk=16" in head and ": fits" in head
    assert "| Fisher activations |" in out.stdout and "| KV cache |" in out.stdout
