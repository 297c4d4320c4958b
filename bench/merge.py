"""Merging 20 experts of random rank-16 LoRA adapters of Mistral-7B shape (q/k/v/o/gate/up/
down; d=4096, d_ff=14336, GQA k/v 1024) on a subset of layers (default 1), extrapolated per
layer: sst-jax merge(...) with task_arithmetic, ties, dare_ties, sst (20 utility experts +
a safety adapter; Fishers precomputed random SPD — the Fisher pass is bench/fisher_per_sample)
and sst_multi (20 experts, no safety adapter) vs PEFT add_weighted_adapter (`cat`, `ties_svd`)
on a torch nn.Module tree with the same Linear shapes, and our streaming TIES/DARE vs PEFT's
stacked merge utilities (`peft.utils.merge_utils.ties`, `dare_ties`, `dare_linear` on the n dense
task tensors) at 7B width, side by side in one run (each case in its own process).

    python bench/merge.py                 # 20 experts, 1 layer (several minutes)
    python bench/merge.py --experts 4     # quick
    python bench/merge.py --modules gate_proj --only ours:ties:1,ours:dare_ties:1,ours:dare_linear:1
                                          # streaming TIES/DARE, one 14336×4096 MLP module at 7B width
    python bench/merge.py --modules q_proj --only ours:ties:1,peftutil:ties:1,ours:dare_ties:1,\
        peftutil:dare_ties:1,ours:dare_linear:1,peftutil:dare_linear:1
                                          # vs PEFT's stacked utilities, one 4096×4096 module (the
                                          # stack of 20 dense 14336×4096 task tensors is 4.7 GB, and
                                          # PEFT's ties holds several such copies)

Memory: "peak MiB" is the extra RSS of the timed call; "process peak MiB" is the case process's
whole-life peak RSS (getrusage ru_maxrss: the Python/JAX runtime, inputs, compile and both calls;
XLA's CPU allocations are in RSS), i.e. what the merge needs end to end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

D, FF, KV, RANK, ALPHA = 4096, 14336, 1024, 16, 32
SHAPES = {"q_proj": (D, D), "k_proj": (KV, D), "v_proj": (KV, D), "o_proj": (D, D),
          "gate_proj": (FF, D), "up_proj": (FF, D), "down_proj": (D, FF)}
MODULES = tuple(SHAPES)
# (library, method, width divisor). TIES/DARE stream the experts through each module (a few
# out × in buffers, never an n × out × in stack); at 7B width they are slow on one core, so run
# them on a subset of modules (--modules) and extrapolate; the 1/4-width rows compare with PEFT.
GRID = (("ours", "task_arithmetic", 1), ("ours", "sst", 1), ("ours", "sst_multi", 1), ("peft", "cat", 1),
        ("ours", "ties", 1), ("ours", "dare_ties", 1), ("ours", "dare_linear", 1),
        ("ours", "task_arithmetic", 4), ("ours", "ties", 4), ("ours", "dare_ties", 4), ("ours", "sst", 4),
        ("peft", "cat", 4), ("peft", "ties_svd", 4),
        ("peftutil", "ties", 1), ("peftutil", "dare_ties", 1), ("peftutil", "dare_linear", 1))
SAMPLE = 200_000  # entries of the first module's merged ΔW saved per case, to compare results across cases


def set_width(div: int) -> None:
    """Scale every module's dims by 1/div (div = 1: Mistral-7B shape)."""
    d, ff, kv = 4096 // div, 14336 // div, 1024 // div
    full = {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d),
            "gate_proj": (ff, d), "up_proj": (ff, d), "down_proj": (d, ff)}
    SHAPES.update({m: full[m] for m in SHAPES})


def expert_factors(n: int, layers: int, seed: int = 0) -> list[dict]:
    """n adapters {(layer, module): (A (r,in), B (out,r))}, PEFT-like scales (A ~ U(±1/√in))."""
    r = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ad = {}
        for layer in range(layers):
            for m, (o, i) in SHAPES.items():
                ad[(layer, m)] = (r.uniform(-1, 1, (RANK, i)).astype(np.float32) / np.sqrt(i),
                                  r.normal(0, 0.01, (o, RANK)).astype(np.float32))
        out.append(ad)
    return out


def spd(n: int, r: np.random.Generator) -> np.ndarray:
    x = r.standard_normal((n, n)).astype(np.float32)
    return x @ x.T / n + 0.1 * np.eye(n, dtype=np.float32)


# ------------------------------------------------------------------------------- ours


def run_ours(method: str, n: int, layers: int) -> dict:
    import jax
    import jax.numpy as jnp

    from sst_jax.merge import merge
    from sst_jax.merge.sst import MultiFishers, SstFishers
    from sst_jax.models import LowRank

    raw = expert_factors(n + (1 if method == "sst" else 0), layers)
    adapters = [{k: LowRank(a=jnp.asarray(a), b=jnp.asarray(b), scale=ALPHA / RANK) for k, (a, b) in ad.items()}
                for ad in raw]
    keys = sorted(adapters[0])
    r = np.random.default_rng(1)
    kwargs: dict = {}
    if method == "sst":
        safety, adapters = adapters[-1], adapters[:-1]
        fh, fb = spd(RANK * RANK, r), spd(RANK * RANK, r)
        kwargs = dict(safety=safety, alpha=1.0,
                      fishers=SstFishers(kind="core", harmful={k: fh for k in keys}, benign={k: fb for k in keys},
                                         n_harmful=64, n_benign=64))
    elif method == "sst_multi":
        mats = [spd(RANK * RANK, r) for _ in range(4)]  # a few distinct SPD matrices, reused (memory)
        kwargs = dict(fishers=MultiFishers(
            fishers=tuple({k + (i,): mats[(i + j) % 4] for k in keys for i in range(n)} for j in range(n)),
            n_samples=(64,) * n))
    elif method in ("dare_ties", "dare_linear"):
        kwargs = dict(density=0.5, key=jax.random.PRNGKey(0))
    elif method == "ties":
        kwargs = dict(density=0.2)

    def run():
        res = merge(method, adapters, [1.0] * n, **kwargs)
        jax.block_until_ready(res.factors)
        # Dense results (TIES/DARE) merge a module when it is read: form each one and drop it, as
        # an export does (to_peft(rank=...), to_merged_hf), so one module is held at a time.
        for k in res.dense:
            jax.block_until_ready(res.delta(k, keep=False))
        return res

    t0 = time.perf_counter()
    res = run()  # compile (the shapes repeat across modules; XLA caches per shape)
    first = time.perf_counter() - t0
    if res.dense:
        save_sample(f"ours_{method}", np.asarray(res.delta(keys[0], keep=False)))
    del res
    out = common.measure(run, warmup=0, repeats=1)
    out["first_call_seconds"] = first
    return out


def save_sample(name: str, x: np.ndarray) -> None:
    """A fixed random subset of the entries of one merged ΔW (same positions in every case)."""
    os.makedirs(common.OUT_DIR, exist_ok=True)
    idx = np.random.default_rng(7).choice(x.size, size=min(SAMPLE, x.size), replace=False)
    np.save(os.path.join(common.OUT_DIR, f"merge_sample_{name}.npy"), x.reshape(-1)[np.sort(idx)])


def compare_samples(a: str, b: str) -> float:
    """max |a − b| / max |b| over the saved samples (NaN when either is missing)."""
    try:
        x, y = (np.load(os.path.join(common.OUT_DIR, f"merge_sample_{n}.npy")) for n in (a, b))
    except (OSError, ValueError):
        return float("nan")
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))


# ------------------------------------------------------------------------------- PEFT merge_utils


def run_peft_utils(method: str, n: int, layers: int) -> dict:
    """PEFT's stacked merge utilities on the n dense task tensors ΔWᵢ = (α/r)·BᵢAᵢ of each module
    (formed in torch, float32, as add_weighted_adapter does): ties (density 0.2, majority sign
    "total" = ours with equal weights), dare_ties and dare_linear (density 0.5)."""
    import torch
    from peft.utils import merge_utils

    common.set_torch_threads()
    raw = expert_factors(n, layers)
    keys = sorted(raw[0])
    fn = {"ties": lambda ts, w: merge_utils.ties(ts, w, 0.2, "total"),
          "dare_ties": lambda ts, w: merge_utils.dare_ties(ts, w, 0.5, "total"),
          "dare_linear": lambda ts, w: merge_utils.dare_linear(ts, w, 0.5)}[method]
    weights = torch.ones(n)
    torch.manual_seed(0)

    def module(k):
        tasks = [(ALPHA / RANK) * (torch.from_numpy(np.asarray(ad[k][1], np.float32))
                                   @ torch.from_numpy(np.asarray(ad[k][0], np.float32))) for ad in raw]
        return fn(tasks, weights)

    def run():
        for k in keys:
            module(k)

    with torch.no_grad():
        save_sample(f"peftutil_{method}", module(keys[0]).numpy())
        return common.measure(run, warmup=0, repeats=1)


# ------------------------------------------------------------------------------- PEFT


def run_peft(combination: str, n: int, layers: int) -> dict:
    import peft
    import torch

    common.set_torch_threads()

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for m in (m for m in MODULES[:4] if m in SHAPES):
                setattr(self, m, torch.nn.Linear(SHAPES[m][1], SHAPES[m][0], bias=False, device="meta"))

    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for m in (m for m in MODULES[4:] if m in SHAPES):
                setattr(self, m, torch.nn.Linear(SHAPES[m][1], SHAPES[m][0], bias=False, device="meta"))

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn, self.mlp = Attn(), Mlp()

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer() for _ in range(layers)])

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

        def forward(self, x):
            return x

    base = Model().to_empty(device="cpu")  # base weights are never read by the merge
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(SHAPES), lora_dropout=0.0)
    raw = expert_factors(n, layers)
    pm = peft.get_peft_model(base, cfg, adapter_name="e0")
    for i in range(1, n):
        pm.add_adapter(f"e{i}", cfg)
    with torch.no_grad():
        for name, mod in pm.named_modules():
            if hasattr(mod, "lora_A") and isinstance(getattr(mod, "lora_A"), torch.nn.ModuleDict):
                parts = name.split(".")
                layer, m = int(parts[parts.index("layers") + 1]), parts[-1]
                for i in range(n):
                    a, b = raw[i][(layer, m)]
                    mod.lora_A[f"e{i}"].weight.copy_(torch.from_numpy(a))
                    mod.lora_B[f"e{i}"].weight.copy_(torch.from_numpy(b))
    names = [f"e{i}" for i in range(n)]
    extra = dict(density=0.2, svd_full_matrices=False) if combination == "ties_svd" else {}
    counter = [0]

    def run():
        counter[0] += 1
        pm.add_weighted_adapter(names, [1.0] * n, f"merged{counter[0]}", combination_type=combination, **extra)

    return common.measure(run, warmup=0, repeats=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case")
    ap.add_argument("--experts", type=int, default=20)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma-separated methods to skip")
    ap.add_argument("--only", default="", help="comma-separated cases lib:method:div to run (default: all)")
    ap.add_argument("--modules", default=",".join(MODULES), help="comma-separated target modules per layer")
    args = ap.parse_args()
    mods = [m for m in args.modules.split(",") if m]
    for m in list(SHAPES):
        if m not in mods:
            del SHAPES[m]
    if args.case:
        lib, method, div = args.case.split(":")
        set_width(int(div))
        run = {"ours": run_ours, "peft": run_peft, "peftutil": run_peft_utils}[lib]
        res = run(method, args.experts, args.layers)
        common.emit(res)
        return
    os.environ["SST_BENCH_THREADS"] = str(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    results = {}
    extra_args = ["--experts", str(args.experts), "--layers", str(args.layers), "--modules", ",".join(mods)]
    only = set(filter(None, args.only.split(",")))
    for lib, m, div in GRID:
        case = f"{lib}:{m}:{div}"
        if m in skip or (only and case not in only):
            continue
        results[case] = r = common.run_case(__file__, case, extra_args, timeout=1800)
        print(case, {k: v for k, v in r.items() if k != "seconds_all"}, flush=True)
    rows = []
    for key, r in results.items():
        lib, m, div = key.split(":")
        ref_cat = results.get(f"peft:cat:{div}", {}).get("seconds")
        ref_ties = results.get(f"peft:ties_svd:{div}", {}).get("seconds")
        ref_util = results.get(f"peftutil:{m}:{div}", {}).get("seconds") if lib == "ours" else None
        s = r.get("seconds")
        per_layer = s / args.layers if s is not None else None
        width = "7B width" if div == "1" else f"1/{div} width"
        # Same trim, election and merge as PEFT's ties with equal weights (DARE: other random masks).
        ran_both = lib == "ours" and m == "ties" and f"peftutil:ties:{div}" in results  # samples of this run
        diff = compare_samples(f"ours_{m}", f"peftutil_{m}") if ran_both else float("nan")
        rows.append([f"{lib} {m} ({width})", s, per_layer, per_layer * 32 if per_layer is not None else None,
                     r.get("peak_mb"), r.get("max_rss_mb"), common.ratio(ref_cat, s), common.ratio(ref_ties, s),
                     common.ratio(ref_util, s), diff, r.get("error", "")[-80:]])
    notes = [f"{args.experts} experts, rank {RANK}, α={ALPHA}, modules {','.join(mods)} of {args.layers} layer(s) at Mistral-7B "
             f"shape (d={D}, d_ff={FF}, k/v {KV}); 'x32 layers s' extrapolates linearly to the 32 layers of the "
             "full model (every layer has the same shapes, and each module is merged independently). Rows marked "
             "1/4 width scale every module dimension by 1/4 (d=1024, d_ff=3584, k/v 256), where TIES/DARE are compared "
             "with PEFT; with a subset of --modules the x32 column covers only those modules.",
             "ours: `merge(method, experts, [1.0]*n, ...)` including the result's report; TIES density 0.2 (trim per "
             "module), DARE-TIES density 0.5; sst: 20 utility experts + 1 safety adapter, Fishers given as random SPD "
             "256×256 per module (the Fisher pass is benchmark 1); sst_multi: each expert against the others' "
             "(random SPD) Fishers. Time after one untimed call (JIT compile; first-call time in the JSON).",
             "TA/SST results stay exact low-rank factors (no dense ΔW); TIES/DARE produce a dense ΔW per module, "
             "streaming the experts one at a time (two passes: election score, then agreeing sum and count); PEFT `cat` concatenates factors, PEFT `ties_svd` builds dense ΔW per "
             "adapter, trims/elects, then SVD-truncates to rank 16 (run with svd_full_matrices=False: PEFT's default "
             "True computes the full U of a 14336×14336 matrix). Our TIES returns the dense ΔW without an SVD.",
             "peftutil: PEFT's `merge_utils.ties` (density 0.2, majority sign 'total'), `dare_ties`, `dare_linear` "
             "(density 0.5) on the list of the n dense task tensors of each module (formed in torch from the same "
             "factors; they stack them: n × out × in float32). 'PEFT utils ÷ row': that case's seconds ÷ ours. "
             "'max |Δ| vs PEFT': our TIES vs PEFT's over 200k fixed entries of the first module, relative to the "
             "largest |entry| (equal weights, so the conventions agree; DARE draws other random masks).",
             f"Threads: {args.threads} per framework. Peak MiB: extra peak RSS of the case's own process during the "
             "timed call (the inputs are already built); process peak MiB: getrusage(RUSAGE_SELF).ru_maxrss of the "
             "case's process at exit (runtime + inputs + compile + both calls). Our dense results merge a module when "
             "it is read; the timed call forms every module and drops it (as an export does), so the peak is about "
             "one module's buffers whatever the number of modules.",
             "÷ columns: reference seconds ÷ row seconds (>1: the row is faster than that PEFT mode)."]
    common.write_table("merge", f"Merging {args.experts} experts at 7B shape: seconds (lower is better)",
                       ["case", "s", "s/layer", "x32 layers s", "peak MiB", "process peak MiB", "PEFT cat ÷ row", "PEFT ties_svd ÷ row",
                        "PEFT utils ÷ row", "max |Δ| vs PEFT", "error"], rows, notes, extra={"results": results})


if __name__ == "__main__":
    main()
