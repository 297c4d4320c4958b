"""The merge command on an 8-device host mesh writes the adapter it writes on one device.

XLA_FLAGS=--xla_force_host_platform_device_count=8 gives the CPU backend 8 devices; the
weights are placed by `sst_jax.models.sharding.param_specs` (fsdp/tensor) and XLA's SPMD
partitioner inserts the collectives, so the numbers may differ only by reduction order.
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from sst_jax.lora.adapter import init_lora
from sst_jax.lora.peft_io import save_peft
from sst_jax.models import load_model

REPO = Path(__file__).resolve().parents[1]


def _adapters(tmp_path: Path) -> tuple[str, str]:
    model = load_model("tiny")
    paths = []
    for seed, name, targets in [(1, "u", ("q_proj", "v_proj", "down_proj")), (2, "s", ("q_proj", "k_proj"))]:
        a = init_lora(jax.random.key(seed), model.config, targets=targets, r=4, alpha=8, base_model="tiny", name=name)
        a = a.replace_factors({k: dataclasses.replace(v, b=0.05 * jax.random.normal(jax.random.key(seed + 9), v.b.shape))
                               for k, v in a.factors.items()})
        save_peft(a, tmp_path / name, base_config=model.config)
        paths.append(str(tmp_path / name))
    return paths[0], paths[1]


def _merge(out: Path, utility: str, safety: str, *extra: str, devices: int = 1) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    cmd = [sys.executable, "-m", "sst_jax", "--model", "tiny", "--utility", utility, "--safety", safety,
           "--method", "sst", "--fisher_samples", "8", "--output", str(out), *extra]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return load_file(out / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data=2,fsdp=2,tensor=2", "data=8"])
def test_merge_on_an_8_device_mesh_equals_one_device(tmp_path, mesh):
    utility, safety = _adapters(tmp_path)
    one = _merge(tmp_path / "one", utility, safety)
    eight = _merge(tmp_path / "eight", utility, safety, "--mesh", mesh, devices=8)
    assert one.keys() == eight.keys()
    scale = max(float(np.abs(v).max()) for v in one.values())
    for k in one:  # reduction order only: ~1e-6 of the largest entry (a wrong sharding is O(1))
        np.testing.assert_allclose(eight[k], one[k], atol=2e-5 * scale, err_msg=k)
