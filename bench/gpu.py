"""One-GPU benchmark at Mistral-7B shape with random weights (no download): per-sample LoRA
Fisher pass with model-FLOPs utilisation, batched generalized eigensolver, merging 20 experts,
forward (MC-scoring) and greedy generation throughput. Run by bench/gpu.sh.

    python bench/gpu.py                    # on a GPU, bf16, Mistral-7B dims (< 10 min on an H100)
    python bench/gpu.py --dry-run          # tiny dims on CPU: exercises every code path

FLOPs of the Fisher pass (per sample of T tokens; N = parameters of all matmuls, i.e. the 7
projections of every layer plus the LM head, embeddings excluded):
    forward                 2·N·T + 4·L·T²·d_q      (QKᵀ and PV over the full T×T score matrix)
    backward, LoRA-only     2·N·T + 8·L·T²·d_q      (activation gradients; the frozen weights
                                                      need no weight gradients, which saves the
                                                      third 2·N·T of the usual 6·N·T)
    total                   4·N·T + 12·L·T²·d_q     (LoRA factors: < 1% at r=16, not counted)
MFU = total FLOPs per sample × samples/s ÷ the accelerator's peak (dense bf16; --peak-tflops).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, vendor datasheets


def mistral_config(dry_run: bool):
    from sst_jax.models import DecoderConfig

    if dry_run:
        return DecoderConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=344,
                             architecture="mistral", dtype="float32", max_position_embeddings=1024)
    return DecoderConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                         architecture="mistral", rope_theta=1e6, rms_eps=1e-5, max_position_embeddings=32768,
                         dtype="bfloat16")


def matmul_params(config) -> int:
    per_layer = sum(int(np.prod(config.module_shape(m))) for m in
                    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    return config.n_layers * per_layer + config.vocab_size * config.d_model


def fisher_flops_per_sample(config, seq: int) -> float:
    return 4.0 * matmul_params(config) * seq + 12.0 * config.n_layers * seq * seq * config.q_dim


def device_peak_gb() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def timed(fn, repeats: int = 1) -> tuple[float, float]:
    """(first call incl. compile, best of `repeats` later calls) in seconds."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return first, best


def lora(config, rank: int, seed: int = 0) -> dict:
    import jax
    import jax.numpy as jnp

    from sst_jax.models import MODULE_NAMES, LowRank

    key = jax.random.key(seed)
    out = {}
    for layer in range(config.n_layers):
        for m in MODULE_NAMES:
            o, i = config.module_shape(m)
            key, ka, kb = jax.random.split(key, 3)
            out[(layer, m)] = (LowRank(a=jax.random.normal(ka, (rank, i), jnp.float32) / np.sqrt(i),
                                       b=0.01 * jax.random.normal(kb, (o, rank), jnp.float32),
                                       scale=jnp.float32(2.0)),)
    return out


def bench_fisher(model, args) -> list:
    import jax
    import jax.numpy as jnp

    from sst_jax.fisher import branch_fisher
    from sst_jax.models import forward, response_nll

    config = model.config
    trainable = lora(config, args.rank)
    r = np.random.default_rng(0)
    ids = r.integers(3, config.vocab_size, size=(args.samples, args.seq)).astype(np.int32)
    loss_mask = np.zeros_like(ids)
    loss_mask[:, args.seq // 2:] = 1
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask}
    blocks = [{k: v[i:i + args.block] for k, v in batch.items()} for i in range(0, args.samples, args.block)]

    def per_sample():
        return jax.block_until_ready(branch_fisher(model, {}, trainable, blocks, stats=("diag",), chunk=args.chunk,
                                                   progress=False).diag)

    warm = time.perf_counter()
    jax.block_until_ready(branch_fisher(model, {}, trainable, blocks[:1], stats=("diag",), chunk=args.chunk,
                                        progress=False).diag)
    compile_s = time.perf_counter() - warm
    _, secs = timed(per_sample, repeats=1)
    sps = args.samples / secs

    # Reference: one batched gradient of the summed loss over the same tokens (no per-sample
    # gradients) — the floor a per-sample method can approach.
    @jax.jit
    def batch_grad(tr, params, b):
        def total(t):
            logits = forward(config, params, b["input_ids"], b["attention_mask"], branches=t)
            return response_nll(logits, b["input_ids"], b["loss_mask"]).sum()
        return jax.grad(total)(tr)

    sub = {k: jnp.asarray(v[:args.chunk]) for k, v in batch.items()}
    _, ref = timed(lambda: jax.block_until_ready(batch_grad(trainable, model.params, sub)), repeats=2)
    ref_sps = args.chunk / ref
    flops = fisher_flops_per_sample(config, args.seq)
    peak = args.peak_tflops * 1e12
    return [["Fisher pass: per-sample LoRA grads (samples/s)", sps, ref_sps, sps / ref_sps,
             f"MFU {100 * flops * sps / peak:.1f}% ({flops / 1e12:.2f} TFLOP/sample, N={args.samples}, "
             f"T={args.seq}, r={args.rank}, chunk {args.chunk}; compile+1st block {compile_s:.0f} s; "
             f"ref = batched grad of Σloss, MFU {100 * flops * ref_sps / peak:.1f}%)"]]


def bench_eigh(args) -> list:
    import jax

    from bench.eigensolver import spd_pairs
    from sst_jax.linalg import generalized_eigh

    rows = []
    for batch, n in ((args.modules, 256), (32, 1024), (1, 2048)) if not args.dry_run else ((8, 16), (2, 64)):
        a, b = (jax.device_put(x) for x in spd_pairs(batch, n, "float32"))
        first, secs = timed(lambda: jax.block_until_ready(generalized_eigh(a, b)), repeats=2)
        rows.append([f"generalized_eigh {batch} × {n}² f32 (s)", secs, None, None, f"first call {first:.1f} s"])
    return rows


def bench_merge(args) -> list:
    from bench import merge as bm

    rows = []
    bm.set_width(32 if args.dry_run else 1)
    for method in ("task_arithmetic", "ties", "dare_ties", "sst"):
        res = bm.run_ours(method, args.experts, 1)
        rows.append([f"merge {method}, {args.experts} experts, 1 layer (s)", res["seconds"], None, None,
                     f"×32 layers ≈ {32 * res['seconds']:.1f} s; first call {res['first_call_seconds']:.1f} s"])
    return rows


def bench_eval(model, args) -> list:
    import jax
    import jax.numpy as jnp

    from sst_jax.models import forward, generate

    config = model.config
    r = np.random.default_rng(2)
    ids = jnp.asarray(r.integers(3, config.vocab_size, size=(args.gen_batch, args.prompt)).astype(np.int32))
    mask = jnp.ones_like(ids)
    fwd = jax.jit(lambda p, i, m: forward(config, p, i, m)[:, -1])
    _, secs = timed(lambda: jax.block_until_ready(fwd(model.params, ids, mask)), repeats=2)
    first, gsecs = timed(lambda: jax.block_until_ready(
        generate(config, model.params, ids, mask, max_new_tokens=args.new_tokens, eos_token_ids=())), repeats=1)
    return [[f"forward (MC scoring) {args.gen_batch}×{args.prompt} (tokens/s)", args.gen_batch * args.prompt / secs,
             None, None, "jitted forward, last-position logits"],
            [f"greedy generation B={args.gen_batch}, {args.new_tokens} new (tokens/s)",
             args.gen_batch * args.new_tokens / gsecs, None, None, f"KV cache; first call {first:.0f} s"]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true", help="tiny dims on CPU")
    ap.add_argument("--out", default=os.environ.get("OUT") or common.OUT_DIR)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--experts", type=int, default=20)
    ap.add_argument("--modules", type=int, default=224, help="module stack for the eigensolver (32 layers × 7)")
    ap.add_argument("--gen-batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--only", default="fisher,eigh,eval,merge")
    args = ap.parse_args()
    if args.dry_run:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        args.samples, args.block, args.chunk, args.seq, args.experts = 8, 4, 2, 32, 3
        args.gen_batch, args.prompt, args.new_tokens, args.rank = 2, 16, 8, 4
    import jax

    from sst_jax.models import LoadedModel, init_params

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    if args.peak_tflops is None:
        args.peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in kind), 989.0)
    config = mistral_config(args.dry_run)
    t0 = time.perf_counter()
    params = jax.block_until_ready(init_params(config, jax.random.key(0)))
    init_s = time.perf_counter() - t0
    model = LoadedModel(config, params, None, "mistral-7b-shape-random", "random init")
    print(f"device {kind}; init {init_s:.1f} s; matmul params {matmul_params(config) / 1e9:.2f} B", flush=True)

    rows = []
    steps = {"fisher": lambda: bench_fisher(model, args), "eigh": lambda: bench_eigh(args),
             "merge": lambda: bench_merge(args), "eval": lambda: bench_eval(model, args)}
    for name in args.only.split(","):
        t0 = time.perf_counter()
        try:
            new = steps[name]()
        except Exception as e:  # a failing section must not lose the others' numbers
            new = [[f"{name}: FAILED", None, None, None, f"{type(e).__name__}: {str(e)[:200]}"]]
        rows += new
        print(name, f"{time.perf_counter() - t0:.1f} s", new, flush=True)
    peak = device_peak_gb()
    notes = [f"Device: {kind} ({jax.default_backend()}); {'DRY RUN, tiny dims on CPU' if args.dry_run else 'Mistral-7B dims, bf16 weights, random init'}; "
             f"peak device memory {peak:.1f} GiB." if peak is not None else f"Device: {kind}.",
             "Fisher FLOPs/sample = 4·N·T + 12·L·T²·d_q (N: matmul parameters incl. LM head; LoRA-only backward "
             "needs no weight gradients of the frozen base); MFU against dense bf16 peak "
             f"{args.peak_tflops:.0f} TFLOP/s.",
             "Fisher reference column: the batched gradient of the summed loss over `chunk` samples (no per-sample "
             "gradients), i.e. the floor; ratio = per-sample ÷ batched throughput."]
    os.makedirs(args.out, exist_ok=True)
    common.OUT_DIR = args.out
    common.write_table("gpu_dry_run" if args.dry_run else "gpu", "GPU benchmark at Mistral-7B shape",
                       ["case", "sst-jax", "reference", "ratio", "details"], rows, notes,
                       extra={"args": vars(args), "init_seconds": init_s}, command="bash bench/gpu.sh"
                       + (" --dry-run" if args.dry_run else ""))


if __name__ == "__main__":
    main()
