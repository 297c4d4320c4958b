"""Several processes, one run (sst_jax.models.distributed): when jax.distributed starts, who
writes, and two processes on localhost (4 CPU devices each, joined by jax.distributed over
gloo) merging what one process merges.

Measured 2026-12-02 (jax 0.10.2, CPU): the two-process merge (mesh data=2,fsdp=2,tensor=2 over
both processes) matches the one-device merge to 2.6e-6 of its largest entry, its cached
Fishers to ~1e-6 of theirs; the cache entries have the same content-keyed names.
"""

import dataclasses
import os
import pickle
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from multihost_helpers import final_outputs, run
from sst_jax.errors import SstJaxError
from sst_jax.models import distributed

CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_NPROCS",
                "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


@pytest.fixture
def plain_machine(monkeypatch):
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None),  # a one-task job
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_NTASKS": "4"}, "slurm"),
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "2"}, "open-mpi"),
    ({"TPU_WORKER_HOSTNAMES": "t1v-0"}, None),  # a single-host TPU VM
    ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1"}, "cloud-tpu"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
])
def test_a_cluster_is_detected_from_the_environment_only_with_several_processes(plain_machine, env, expected):
    for name, value in env.items():
        plain_machine.setenv(name, value)
    assert distributed.cluster_detected() == expected


def test_without_flags_a_plain_machine_stays_one_process(plain_machine):
    called = []
    plain_machine.setattr(jax.distributed, "initialize", lambda **kw: called.append(kw))
    assert distributed.initialize() is False
    assert not called and jax.process_count() == 1


def test_a_process_id_outside_the_process_count_is_an_error(plain_machine):
    plain_machine.setattr(jax.distributed, "initialize", lambda **kw: pytest.fail("must not start"))
    with pytest.raises(SstJaxError, match="--process_id 2 is not in 0..1"):
        distributed.initialize("localhost:1", num_processes=2, process_id=2)


def test_one_process_writes_and_agrees_with_itself(tmp_path):
    assert distributed.is_primary()
    def write(path):
        path.write_text("x")
        return "done"

    assert distributed.primary_only(write, tmp_path / "f", name="f") == "done"
    assert (tmp_path / "f").read_text() == "x"
    assert distributed.agree(True, "f") is True and distributed.agree(False, "f") is False


# ----------------------------------------------------------------------------- two processes


def _adapters(root: Path) -> tuple[str, str]:
    from sst_jax.lora.adapter import init_lora
    from sst_jax.lora.peft_io import save_peft
    from sst_jax.models import load_model

    model = load_model("tiny")
    paths = []
    for seed, name, targets in [(1, "u", ("q_proj", "v_proj", "down_proj")), (2, "s", ("q_proj", "k_proj"))]:
        a = init_lora(jax.random.key(seed), model.config, targets=targets, r=4, alpha=8, base_model="tiny", name=name)
        a = a.replace_factors({k: dataclasses.replace(v, b=0.05 * jax.random.normal(jax.random.key(seed + 9), v.b.shape))
                               for k, v in a.factors.items()})
        save_peft(a, root / name, base_config=model.config)
        paths.append(str(root / name))
    return paths[0], paths[1]


def _merge_args(utility: str, safety: str, out: Path, cache: Path) -> list[str]:
    return ["--model", "tiny", "--utility", utility, "--safety", safety, "--method", "sst",
            "--fisher_samples", "8", "--output", str(out), "--cache_dir", str(cache)]


@pytest.fixture(scope="module")
def one_process_merge(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_process_merge")
    utility, safety = _adapters(root)
    writes = run("sst-merge", _merge_args(utility, safety, root / "merged", root / "cache"), devices=1,
                 logs=root / "logs")
    return root, utility, safety, writes[0]


def _relative(placed, root: Path) -> set[str]:
    return {os.path.relpath(p, root) for p in placed}


@pytest.mark.slow
@pytest.mark.heavy
def test_two_processes_compute_the_fishers_and_the_merge_of_one(one_process_merge, tmp_path):
    root, utility, safety, one_writes = one_process_merge
    writes = run("sst-merge", _merge_args(utility, safety, tmp_path / "merged", tmp_path / "cache") +
                 ["--mesh", "data=2,fsdp=2,tensor=2"], devices=4, processes=2, logs=tmp_path / "logs")

    one, two = load_file(root / "merged" / "adapter_model.safetensors"), load_file(tmp_path / "merged" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    scale = max(float(np.abs(v).max()) for v in one.values())
    for k in one:  # reduction order only (a wrong split or a missing psum is O(1))
        np.testing.assert_allclose(two[k], one[k], atol=2e-5 * scale, err_msg=k)

    stats = sorted(p.name for p in (root / "cache" / "statistics").glob("*.pkl"))
    assert stats == sorted(p.name for p in (tmp_path / "cache" / "statistics").glob("*.pkl")) and stats
    for name in stats:  # F_h, F_b of the same content-keyed recipe
        f1 = pickle.loads((root / "cache" / "statistics" / name).read_bytes())
        f2 = pickle.loads((tmp_path / "cache" / "statistics" / name).read_bytes())
        for key in f1.harmful:
            for a, b in ((f1.harmful[key], f2.harmful[key]), (f1.benign[key], f2.benign[key])):
                a, b = np.asarray(a), np.asarray(b)
                np.testing.assert_allclose(b, a, atol=1e-4 * np.abs(a).max())

    placed = final_outputs(writes[0], tmp_path)
    assert max(placed.values()) == 1  # each output put in place once ...
    assert _relative(placed, tmp_path) == _relative(final_outputs(one_writes, root), root)  # ... the same ones
    assert writes[1] == []  # process 1 writes nothing


@pytest.mark.slow
@pytest.mark.heavy
def test_hosts_that_see_different_caches_stop_with_an_error(one_process_merge, tmp_path):
    root, utility, safety, _ = one_process_merge
    shutil.copytree(root / "cache", tmp_path / "cache0")  # process 0 sees the cache, process 1 an empty one
    args = [_merge_args(utility, safety, tmp_path / "merged", tmp_path / f"cache{i}") for i in range(2)]
    run("sst-merge", args, devices=4, processes=2, logs=tmp_path / "logs", check=False, timeout=600)
    errors = [(tmp_path / "logs" / f"stderr-{i}.log").read_text() for i in range(2)]
    assert all("the hosts disagree whether it exists (process 0: yes, process 1: no)" in e for e in errors), errors[0][-2000:]
    assert not (tmp_path / "merged").exists()
