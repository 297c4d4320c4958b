"""Shared helpers for the benchmark scripts: one fresh process per case, timing, peak memory,
and the one table every script prints and writes under bench/out/.

Peak memory is the peak resident set size (Linux VmHWM) of the case's own process during the
timed section only: the high-water mark is reset (`/proc/self/clear_refs` ← 5) after setup and
warm-up, and we report `VmHWM − VmRSS(before)`, i.e. the extra memory the measured work needed
above the loaded model and inputs. It covers every allocator in the process (XLA, torch, numpy).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> int:
    """Reset the peak-RSS mark; returns the current RSS in KiB (the baseline)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # kernels without clear_refs: the peak then includes setup (said in the notes)
    return _status_kb("VmRSS")


def peak_mb(baseline_kb: int) -> float:
    """Peak RSS above `baseline_kb` since the last reset, in MiB."""
    return max(_status_kb("VmHWM") - baseline_kb, 0) / 1024.0


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024.0


def measure(fn: Callable[[], Any], *, repeats: int = 1, warmup: int = 1) -> dict:
    """Run fn `warmup` times (compile), then `repeats` timed runs; best wall time and peak memory."""
    for _ in range(warmup):
        fn()
    base = reset_peak()
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    # cpu_seconds: CPU time of the whole process (all its threads); on a shared, oversubscribed
    # machine it is a steadier measure of single-threaded work than wall time.
    return {"seconds": min(times), "seconds_all": times, "cpu_seconds": min(cpu), "peak_mb": peak_mb(base),
            "rss_mb": base / 1024.0}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("jax", "jaxlib", "flax", "torch", "transformers", "peft", "scipy", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def machine() -> dict:
    load = os.getloadavg()
    return {"cores": os.cpu_count(), "platform": platform.platform(), "processor": platform.machine(),
            "loadavg_1_5_15": [round(x, 2) for x in load],
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def threads() -> int:
    """Threads per framework for this run (SST_BENCH_THREADS, default 1; see thread_env)."""
    return int(os.environ.get("SST_BENCH_THREADS", "1"))


def thread_env(n: int) -> dict:
    """Environment giving both frameworks the same n intra-op threads.

    XLA: intra_op_parallelism_threads=n (single-threaded Eigen when n = 1); our LAPACK eigensolver:
    n workers (SST_JAX_GEVP_THREADS). torch: OMP/MKL
    threads and torch.set_num_threads(n) (set_torch_threads). OMP_WAIT_POLICY=PASSIVE because
    on an oversubscribed machine spinning OpenMP barriers made 2-thread torch 20-40x slower."""
    flags = f"--xla_cpu_multi_thread_eigen={'true' if n > 1 else 'false'} intra_op_parallelism_threads={n}"
    return {"SST_BENCH_THREADS": str(n), "XLA_FLAGS": flags, "OMP_NUM_THREADS": str(n), "SST_JAX_GEVP_THREADS": str(n),
            "MKL_NUM_THREADS": str(n), "OPENBLAS_NUM_THREADS": str(n), "OMP_WAIT_POLICY": "PASSIVE", "JAX_PLATFORMS": "cpu"}


def set_torch_threads() -> int:
    """torch intra-op threads = the threads XLA gets (thread_env)."""
    import torch

    n = threads()
    torch.set_num_threads(n)
    return n


def run_case(script: str, case: str, args: Sequence[str] = (), timeout: int = 900,
             env_overrides: dict | None = None) -> dict:
    """Run `python script --case case` in a fresh process; it prints one JSON line 'RESULT {...}'.
    `env_overrides` win over the thread settings (e.g. XLA_FLAGS for forced host devices)."""
    cmd = [sys.executable, script, "--case", case, *args]
    env = dict(os.environ)
    env.update(thread_env(threads()))
    env.update(env_overrides or {})
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # stdin from /dev/null: a case started from a background job must never wait on a terminal.
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stdout + proc.stderr)[-3000:]
    return {"error": f"exit {proc.returncode}: {tail}"}


def max_rss_mb() -> float:
    """Peak RSS of this whole process so far (getrusage ru_maxrss: inputs, XLA and all)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(result: dict) -> None:
    """Child side of run_case; adds the process's lifetime peak RSS as `max_rss_mb`."""
    result = {**result, "max_rss_mb": max_rss_mb()}
    print("RESULT " + json.dumps(result), flush=True)


def fmt(x: Any) -> str:
    if isinstance(x, float):
        if x != x:
            return "—"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"
    return "—" if x is None else str(x)


def write_table(name: str, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                notes: Sequence[str], extra: dict | None = None, command: str | None = None) -> str:
    """Print the table and write bench/out/<name>.md and .json; returns the Markdown."""
    os.makedirs(OUT_DIR, exist_ok=True)
    mach, vers = machine(), versions()
    cmd = command or "python " + " ".join(["bench/" + os.path.basename(sys.argv[0]), *sys.argv[1:]])
    lines = [f"### {title}", "",
             f"Machine: {mach['cores']}-core {mach['processor']} CPU ({mach['platform']}), "
             f"load average {mach['loadavg_1_5_15']} at the end (shared machine), {mach['date_utc']}.  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".  ",
             f"Command: `{cmd}`", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    lines += [""] + [f"- {n}" for n in notes]
    md = "\n".join(lines) + "\n"
    print(md)
    with open(os.path.join(OUT_DIR, name + ".md"), "w") as f:
        f.write(md)
    with open(os.path.join(OUT_DIR, name + ".json"), "w") as f:
        json.dump({"title": title, "columns": list(columns), "rows": [list(r) for r in rows], "notes": list(notes),
                   "machine": mach, "versions": vers, "command": cmd, "extra": extra or {}}, f, indent=1,
                  default=str)
    return md


def ratio(a: float | None, b: float | None) -> float:
    """a / b, NaN when either is missing."""
    if a is None or b is None or b == 0 or a != a or b != b:
        return float("nan")
    return a / b
