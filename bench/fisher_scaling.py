"""Per-sample Fisher throughput on 1, 2, 4 and 8 host devices (a CPU scaling curve).

The same core-space Fisher pass as bench/fisher_per_sample.py (model m, core statistics), with
the samples split over a `data` mesh of D XLA host devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=D`, one fresh process per D). Every process
gets the machine's cores; the host devices share them, so the curve shows what data-parallel
splitting costs or buys on this CPU, not accelerator scaling. The D = 1 row is the reference of
the ratio column, measured in the same run; the D > 1 results are checked against it.

    python bench/fisher_scaling.py                 # D = 1, 2, 4, 8, 64 samples (≈ 3 min on 2 cores)
    python bench/fisher_scaling.py --devices 1,8 --samples 32
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402
from bench import fisher_per_sample as fps  # noqa: E402

SIZE = "m"
CHUNK = 4  # samples per vmapped gradient per device (the CPU default, sst_jax.fisher.default_chunk)


def run_case(devices: int, n: int) -> dict:
    import jax
    import jax.numpy as jnp

    from sst_jax.fisher import core_fisher
    from sst_jax.fisher.estimators import CoreSpace
    from sst_jax.models import load_model
    from sst_jax.models.sharding import make_mesh

    assert jax.device_count() == devices, (jax.device_count(), devices)
    model = load_model(fps.model_dir(SIZE))
    mesh = make_mesh(data=devices, fsdp=1, tensor=1)
    spaces = {k: CoreSpace(p=jnp.asarray(p), sigma=jnp.ones((fps.RANK,), jnp.float32), q=jnp.asarray(q))
              for k, (p, q) in fps.factors(SIZE, "core").items()}
    batch = fps.data(n)
    block = CHUNK * devices  # one vmapped chunk per device per block
    blocks = fps.blocks(batch, block)

    def run(bl):
        stats = core_fisher(model, {}, spaces, bl, chunk=CHUNK, mesh=mesh, progress=False)
        return jax.block_until_ready(stats.dense)

    res = fps._measure_with_warmup(run, blocks)
    dense = run(blocks)
    # A fingerprint of the result, to compare D > 1 with D = 1 (same samples, same sum).
    keys = sorted(dense, key=repr)
    res["checksum"] = [float(np.asarray(dense[k], np.float64).sum()) for k in keys[:4]]
    res["max_abs"] = float(max(np.abs(np.asarray(dense[k])).max() for k in keys))
    res["samples_per_s"] = n / res["seconds"]
    return res


def spawn(devices: int, n: int) -> dict:
    # XLA_FLAGS replaced: D forced host devices and XLA's default threads (every core), not the
    # one-thread setting of the other benchmarks.
    return common.run_case(os.path.abspath(__file__), f"{devices}:{n}", timeout=1800,
                           env_overrides={"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--devices", default="1,2,4,8", help="comma-separated host device counts")
    ap.add_argument("--samples", type=int, default=64, help="samples per pass (a multiple of 4 × each D)")
    args = ap.parse_args()
    if args.case:
        d, n = (int(x) for x in args.case.split(":"))
        common.emit(run_case(d, n))
        return
    fps.model_dir(SIZE)  # build the shared model once, outside the timed processes
    counts = [int(x) for x in args.devices.split(",")]
    results = {d: spawn(d, args.samples) for d in counts}
    ref = results.get(1, {})
    rows = []
    for d in counts:
        r = results[d]
        if "error" in r:
            rows.append([d, None, None, None, None, None, r["error"][-80:]])
            continue
        diff = float("nan")
        if "checksum" in ref:
            diff = max(abs(a - b) for a, b in zip(r["checksum"], ref["checksum"])) / max(ref["max_abs"], 1e-30)
        rows.append([d, r["seconds"], r["cpu_seconds"], r["samples_per_s"],
                     common.ratio(r["samples_per_s"], ref.get("samples_per_s")), diff, ""])
    common.write_table(
        "fisher_scaling", "Per-sample core Fisher on D host devices: samples/s (higher is better)",
        ["D (data axis)", "s", "CPU s", "samples/s", "÷ D=1", "max abs. diff. vs D=1 ÷ max entry", "error"], rows,
        [f"Model {SIZE} of bench/fisher_per_sample.py ({fps.SIZES[SIZE]}: d_model, layers, heads, kv heads, d_ff), "
         f"{args.samples} samples of {fps.SEQ} tokens, core statistics (r={fps.RANK}) on all 7 modules of every layer, "
         f"chunk {CHUNK} per device; time of the whole pass after one warm-up block (best of {fps.REPEATS}).",
         "D host devices come from --xla_force_host_platform_device_count=D in a fresh process; samples are split "
         "over the mesh's data axis by shard_map and the per-device sums psum'd (sst_jax.fisher.per_sample).",
         "All devices share the machine's cores, so on a 2-core CPU D > 2 cannot be faster; the column shows the "
         "overhead of the split. On accelerators each device is its own chip."],
        extra={str(d): results[d] for d in counts})


if __name__ == "__main__":
    main()
