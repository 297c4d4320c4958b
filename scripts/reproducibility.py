"""Does the same seed give the same numbers under other CPU settings? Runs exp1 of
`configs/repro.json` (smollm2-135m) once per setting in a fresh process and output folder, then
compares everything the run produced: the result JSON's metrics and per-item responses, and
every cached adapter / Fisher / evaluation file byte for byte (max |difference| of arrays).

    python scripts/reproducibility.py --out /tmp/repro [--settings default,one_thread,no_eigen_threads,avx2,no_xnnpack]

Settings: `default` (XLA's own threading), `one_thread` (taskset to one core),
`no_eigen_threads` (XLA_FLAGS=--xla_cpu_multi_thread_eigen=false), `avx2` (XLA_FLAGS=
--xla_cpu_max_isa=AVX2: XLA's own code generated as for a CPU without AVX-512), `no_xnnpack`
(XLA_FLAGS=--xla_cpu_use_xnnpack=false: dots through XLA's Eigen path instead of the
XNNPACK/YNNPACK kernels jaxlib uses by default, which pick their kernels from the CPU at run time
and so ignore --xla_cpu_max_isa). Prints one table row per setting vs `default` and writes
reproducibility.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "default": ({}, None),
    "one_thread": ({}, "0"),
    "no_eigen_threads": ({"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}, None),
    "avx2": ({"XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}, None),
    "no_xnnpack": ({"XLA_FLAGS": "--xla_cpu_use_xnnpack=false"}, None),
}


def run(setting: str, out: Path) -> float:
    env_extra, cpus = SETTINGS[setting]
    env = {**os.environ, **env_extra}
    cmd = [sys.executable, str(REPO / "experiments" / "run_real_experiments.py"), "--model", "smollm2-135m",
           "--config", str(REPO / "configs" / "repro.json"), "--experiment", "exp1", "--seeds", "0",
           "--output_dir", str(out / setting), "--log_file", str(out / f"{setting}.log")]
    if cpus is not None:
        cmd = ["taskset", "-c", cpus] + cmd
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def arrays(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file
        return load_file(str(path))
    if path.suffix == ".npz":
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    return {}


def compare(a: Path, b: Path) -> dict:
    """Files under cache/ and the exp1 metrics of two output folders."""
    fa = {p.relative_to(a): p for p in (a / "cache").rglob("*") if p.is_file()}
    fb = {p.relative_to(b): p for p in (b / "cache").rglob("*") if p.is_file()}
    common = sorted(set(fa) & set(fb))
    identical = [k for k in common if fa[k].read_bytes() == fb[k].read_bytes()]
    max_diff = 0.0
    for k in common:
        xa, xb = arrays(fa[k]), arrays(fb[k])
        for name in set(xa) & set(xb):
            if xa[name].dtype.kind == "f":
                max_diff = max(max_diff, float(np.max(np.abs(xa[name].astype(np.float64) - xb[name].astype(np.float64)))))
    ra = json.loads(next((a / "exp1_safety_utility").glob("*.json")).read_text())["results"]["0"]["configurations"]
    rb = json.loads(next((b / "exp1_safety_utility").glob("*.json")).read_text())["results"]["0"]["configurations"]
    responses = same = 0
    metric_diff = 0.0
    for name in ra:
        for part in ("harmful", "benign"):
            for x, y in zip(ra[name]["records"].get(part, []), rb[name]["records"].get(part, [])):
                responses += 1
                same += x["response"] == y["response"]
        for m in ("refusal", "over_refusal", "utility"):
            if m in ra[name]["metrics"]:
                metric_diff = max(metric_diff, abs(ra[name]["metrics"][m]["value"] - rb[name]["metrics"][m]["value"]))
    return {"files": len(common), "identical_files": len(identical), "only_in_one": len(set(fa) ^ set(fb)),
            "max_abs_array_difference": max_diff, "responses": responses, "identical_responses": same,
            "max_metric_difference": metric_diff}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--settings", default="default,one_thread,no_eigen_threads,avx2,no_xnnpack")
    args = parser.parse_args()
    out = Path(args.out)
    names = args.settings.split(",")
    if names[0] != "default":
        names = ["default"] + [n for n in names if n != "default"]
    unknown = set(names) - set(SETTINGS)
    if unknown:
        raise SystemExit(f"unknown settings {sorted(unknown)}; known: {', '.join(SETTINGS)}")
    walls = {}
    for name in names:
        if not (out / name / "exp1_safety_utility").exists():
            walls[name] = round(run(name, out), 1)
    from experiments.common import provenance  # the commit and CPU, as result files record them
    source = provenance()
    report = {"cpu": f"{source['cpu']} ({source['cpus']} cores)", "walls_s": walls, "vs_default": {n: compare(out / "default", out / n) for n in names[1:]}}
    (out / "reproducibility.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
