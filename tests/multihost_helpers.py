"""Subprocess runs of the two commands on forced host devices, one or several processes, with
every file each process writes recorded (tests/test_distributed.py, tests/experiments/test_mesh_run.py).

The device count (XLA_FLAGS) is fixed when JAX starts, so every run is a fresh interpreter.
Writes are recorded by wrapping os.replace and os.rename, which every atomic write ends with
(`sst_jax.io_utils`): one line per destination in the process's log.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_DRIVER = """
import os, runpy, sys
log = open(os.environ["WRITE_LOG"], "a")
for name in ("replace", "rename"):
    def wrapped(src, dst, *a, _orig=getattr(os, name), **k):
        log.write(os.path.abspath(os.fspath(dst)) + "\\n"); log.flush()
        return _orig(src, dst, *a, **k)
    setattr(os, name, wrapped)
command, args = sys.argv[1], sys.argv[2:]
if command == "sst-merge":
    from sst_jax import cli
    sys.exit(cli.main(["sst-merge", *args]))
sys.argv = [command, *args]
runpy.run_path(command, run_name="__main__")
"""

EXPERIMENTS = str(REPO / "experiments" / "run_real_experiments.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run(command: str, args: list[str] | list[list[str]], *, devices: int, processes: int = 1, logs: Path,
        timeout: float = 1500, check: bool = True) -> list[list[str]]:
    """Run `command` (EXPERIMENTS or "sst-merge") in `processes` processes of `devices` CPU
    devices each (joined by jax.distributed on localhost when more than one); `args` is one
    argument list for all, or one per process. Returns each process's recorded write
    destinations; with `check`, fails with the processes' stderr on a non-zero exit."""
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for i in range(processes):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "PYTHONPATH": str(REPO), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
               "WRITE_LOG": str(logs / f"writes-{i}.log")}
        extra = [] if processes == 1 else [f"--coordinator_address=localhost:{port}",
                                           f"--num_processes={processes}", f"--process_id={i}"]
        err = open(logs / f"stderr-{i}.log", "w")
        own = args[i] if args and isinstance(args[0], list) else args
        procs.append((subprocess.Popen([sys.executable, "-c", _DRIVER, command, *own, *extra], env=env,
                                       stdout=subprocess.DEVNULL, stderr=err), err))
    codes = []
    for proc, err in procs:
        try:
            codes.append(proc.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
            raise
        finally:
            err.close()
    for i, code in enumerate(codes):
        assert code == 0 or not check, f"process {i} exited {code}:\n" + (logs / f"stderr-{i}.log").read_text()[-3000:]
    return [_lines(logs / f"writes-{i}.log") for i in range(processes)]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def final_outputs(writes: list[str], root: Path) -> Counter:
    """How often each output under `root` was put in place, leaving out the files written inside
    an atomic folder's staging copy (.<name>.new-*) and orbax's transient training checkpoints."""
    root = os.path.abspath(root)
    return Counter(w for w in writes
                   if w.startswith(root) and ".new-" not in w and ".ckpt" not in w)
