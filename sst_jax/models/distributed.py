"""Several hosts, one run: `jax.distributed` behind three flags, and who writes what.

Every process runs the same program on its own devices of one global mesh (`--mesh` counts
the devices of all hosts); batches split over the mesh's batch axes, each host transferring
only its devices' rows (`sharding.put_global`). Process 0 alone writes results, caches and
adapters (atomically, `io_utils`); the others wait for it at a barrier, so a file any process
reads afterwards is whole. The output and cache folders must be on a filesystem every host
sees (NFS, a bucket mount): a cache entry that only some hosts see would send them down
different paths (different collectives: a hang), so `agree` makes that an error instead.

    # host 0 (also the coordinator)                      # host 1
    ... --coordinator_address=10.0.0.1:1234 \\           ... --coordinator_address=10.0.0.1:1234 \\
        --num_processes=2 --process_id=0                     --num_processes=2 --process_id=1

With none of the three flags, `jax.distributed.initialize()` is called only where JAX
detects a multi-process cluster by itself (SLURM, Open MPI, a Cloud TPU pod slice that names
its workers, JAX_COORDINATOR_ADDRESS set); a plain machine stays one process.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np
from absl import flags, logging

from sst_jax.errors import SstJaxError


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """--coordinator_address, --num_processes, --process_id (the experiment runner and sst-merge)."""
    d = dict(flag_values=flag_values)
    flags.DEFINE_string("coordinator_address", None, "Multi-host runs: host:port of process 0's coordinator "
                        "(jax.distributed). Give it, --num_processes and --process_id on every host; default: "
                        "single process, unless JAX detects a cluster (SLURM, Open MPI, TPU pod slice).", **d)
    flags.DEFINE_integer("num_processes", None, "Multi-host runs: number of processes (one per host).", **d)
    flags.DEFINE_integer("process_id", None, "Multi-host runs: this process's index, 0..num_processes-1 "
                         "(process 0 writes every output).", **d)


def initialize_from_flags(flag_values) -> bool:
    """`initialize` with the three flags' values (see `define_flags`)."""
    return initialize(coordinator_address=flag_values.coordinator_address,
                      num_processes=flag_values.num_processes, process_id=flag_values.process_id)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """jax.distributed.initialize with whatever is given, or with nothing where `cluster_detected`;
    returns whether this is now a multi-process run. Call it before any JAX computation."""
    given = {k: v for k, v in (("coordinator_address", coordinator_address), ("num_processes", num_processes),
                               ("process_id", process_id)) if v is not None}
    if not given and cluster_detected() is None:
        return False
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise SstJaxError(f"--process_id {process_id} is not in 0..{num_processes - 1} (--num_processes {num_processes})")
    is_initialized = getattr(jax.distributed, "is_initialized", None)
    if is_initialized is None or not is_initialized():
        try:
            jax.distributed.initialize(**given)
        except (RuntimeError, ValueError) as err:
            raise SstJaxError(f"jax.distributed.initialize({', '.join(f'{k}={v!r}' for k, v in given.items())}) "
                              f"failed: {err}. Every host needs the same --coordinator_address and "
                              "--num_processes and its own --process_id, before any other JAX work.") from err
    logging.info("process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def cluster_detected() -> str | None:
    """The multi-process cluster this process runs in, by its environment (what
    jax.distributed.initialize() would detect without arguments), or None on a plain machine
    or in a cluster job of one process."""
    env = os.environ

    def count(*names: str) -> int:
        for name in names:
            try:
                return int(env[name])
            except (KeyError, ValueError):
                continue
        return 1

    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and count("SLURM_NTASKS", "SLURM_NPROCS") > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and count("OMPI_COMM_WORLD_SIZE") > 1:
        return "open-mpi"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return "cloud-tpu"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "cloud-tpu-multislice"
    return None


def is_primary() -> bool:
    """Whether this process writes outputs (process 0; the only one of a single-process run)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op with one process). `name` must be
    the same on every process (it is checked): use what is being waited for, e.g. a path."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def primary_only(fn: Callable[..., Any], *args, name: str, **kwargs) -> Any:
    """fn(*args, **kwargs) on process 0 only (its result there, None elsewhere), between two
    barriers: every process has finished what it read before (e.g. "does the output exist?")
    when process 0 writes, and what it wrote exists for every process once this returns."""
    barrier(f"before {name}")
    out = fn(*args, **kwargs) if is_primary() else None
    barrier(f"wrote {name}")
    return out


def agree(value: bool, what: str) -> bool:
    """`value` (e.g. "this cache entry exists"), checked equal on every process; hosts that see
    different files raise instead of diverging."""
    if jax.process_count() == 1:
        return bool(value)
    from jax.experimental import multihost_utils

    seen = np.asarray(multihost_utils.process_allgather(np.asarray(bool(value), np.int32))).reshape(-1)
    if len(set(seen.tolist())) > 1:
        hosts = ", ".join(f"process {i}: {'yes' if s else 'no'}" for i, s in enumerate(seen.tolist()))
        raise SstJaxError(f"{what}: the hosts disagree whether it exists ({hosts}). The output and cache "
                          "folders must be on a filesystem every host shares (NFS, a bucket mount).")
    return bool(value)
