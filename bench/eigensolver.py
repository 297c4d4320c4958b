"""Generalized symmetric eigensolver A v = λ B v: sst_jax.linalg.generalized_eigh (Cholesky
reduction, batched over module stacks, jitted) vs scipy.linalg.eigh(a, b) in a Python loop
(LAPACK sygvd), float32 and float64, on random SPD pairs.

    python bench/eigensolver.py             # 128×256², 32×1024², 1×2048² in f32 and f64
    python bench/eigensolver.py --quick     # smaller stacks
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

FULL = [(128, 256), (32, 1024), (1, 2048)]
QUICK = [(32, 256), (4, 1024), (1, 2048)]


def spd_pairs(batch: int, n: int, dtype: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A = XXᵀ/n (PSD, like F_h), B = YYᵀ/n + 0.1·I (SPD, like a damped F_b)."""
    r = np.random.default_rng(seed)
    x = r.standard_normal((batch, n, n)).astype(dtype)
    y = r.standard_normal((batch, n, n)).astype(dtype)
    a = x @ np.swapaxes(x, -1, -2) / n
    b = y @ np.swapaxes(y, -1, -2) / n + 0.1 * np.eye(n, dtype=dtype)
    return a, b


def run_case(case: str) -> dict:
    method, batch, n, dtype = case.split(":")
    batch, n = int(batch), int(n)
    a, b = spd_pairs(batch, n, dtype)
    if method == "jax":
        import jax

        if dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        from sst_jax.linalg import generalized_eigh

        aj, bj = jax.device_put(a), jax.device_put(b)
        t0 = time.perf_counter()
        jax.block_until_ready(generalized_eigh(aj, bj))  # compile + first run
        warm = time.perf_counter() - t0
        res = common.measure(lambda: jax.block_until_ready(generalized_eigh(aj, bj)), warmup=0, repeats=1)
        w = np.asarray(generalized_eigh(aj, bj)[0])
    else:
        import scipy.linalg

        warm = 0.0
        scipy.linalg.eigh(a[0], b[0])
        res = common.measure(lambda: [scipy.linalg.eigh(a[i], b[i]) for i in range(batch)], warmup=0, repeats=1)
        w = np.stack([scipy.linalg.eigh(a[i], b[i], eigvals_only=True)[::-1] for i in range(min(batch, 2))])
    res["warmup_seconds"] = warm
    np.save(os.path.join(common.OUT_DIR, f"eig_{method}_{batch}_{n}_{dtype}.npy"), w[:2])
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (XLA, OpenBLAS/MKL)")
    ap.add_argument("--dtypes", default="float32,float64")
    args = ap.parse_args()
    os.makedirs(common.OUT_DIR, exist_ok=True)
    if args.case:
        common.emit(run_case(args.case))
        return
    os.environ["SST_BENCH_THREADS"] = str(args.threads)
    rows, results = [], {}
    for batch, n in (QUICK if args.quick else FULL):
        for dtype in args.dtypes.split(","):
            r = {m: common.run_case(__file__, f"{m}:{batch}:{n}:{dtype}") for m in ("jax", "scipy")}
            results[f"{batch}x{n}:{dtype}"] = r
            print(batch, n, dtype, r, flush=True)
            err = float("nan")
            try:
                wj = np.load(os.path.join(common.OUT_DIR, f"eig_jax_{batch}_{n}_{dtype}.npy"))
                ws = np.load(os.path.join(common.OUT_DIR, f"eig_scipy_{batch}_{n}_{dtype}.npy"))
                err = float(np.max(np.abs(wj - ws)) / np.max(np.abs(ws)))
            except (OSError, ValueError):
                pass
            sj, ss = r["jax"].get("seconds"), r["scipy"].get("seconds")
            rows.append([f"{batch} × {n}² {dtype}", sj, ss, common.ratio(ss, sj), r["jax"].get("warmup_seconds"),
                         r["jax"].get("peak_mb"), r["scipy"].get("peak_mb"), err])
    notes = ["A = XXᵀ/n, B = YYᵀ/n + 0.1·I with X, Y standard normal (seed 0); the same matrices for both.",
             "sst-jax: `generalized_eigh(a, b)` on the whole stack (vmapped Cholesky reduction + eigh, jitted), "
             "time after one compile+run (compile+first run in 'jax 1st call s'). scipy: "
             "`[scipy.linalg.eigh(a[i], b[i]) for i in range(batch)]` (LAPACK sygvd via scipy's default driver).",
             f"Threads: {args.threads} for both (XLA intra_op_parallelism_threads, OPENBLAS/OMP/MKL_NUM_THREADS). "
             "Peak MiB: extra peak RSS of the case's own process during the timed run.",
             "max |Δλ|/|λ|max: eigenvalues of the first two problems, ours vs scipy (a correctness check)."]
    common.write_table("eigensolver", "Generalized eigensolver: seconds (lower is better)",
                       ["case", "sst-jax s", "scipy loop s", "speed-up (scipy÷jax)", "jax 1st call s",
                        "jax MiB", "scipy MiB", "max |Δλ|/|λ|max"], rows, notes, extra={"results": results})


if __name__ == "__main__":
    main()
