"""Per-sample gradients of the response NLL w.r.t. LoRA factors and SST core matrices:
sst-jax (`branch_fisher` / `core_fisher`: lax.map-chunked vmap(grad) inside a scan) vs PyTorch
`torch.func.vmap(grad)` over `functional_call` on the same HF LlamaForCausalLM, vs a per-sample
backward loop in PyTorch (what the original did). Same weights (one save_pretrained directory
loaded by both), same data, float32, the same statistic accumulated (LoRA: diagonal Σg²;
core: dense Σ g gᵀ per module), the same chunk of 16 samples per vmapped gradient.

    python bench/fisher_per_sample.py            # the table (≈ 5 min on 2 cores)
    python bench/fisher_per_sample.py --quick    # one size, fewer samples
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

SIZES = {  # tiny Llamas: (d_model, n_layers, n_heads, n_kv_heads, d_ff)
    "s": (128, 2, 4, 2, 344),
    "m": (256, 4, 4, 2, 688),
    "l": (512, 8, 8, 4, 1376),
}
VOCAB, SEQ, PROMPT, RANK = 512, 64, 32, 8
CHUNK = int(os.environ.get("SST_BENCH_CHUNK", "16"))  # samples per vmapped gradient (--chunk)
REPEATS = 2  # best of: the shared machine's load changes by the second
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def model_dir(size: str) -> str:
    """A random HF Llama of `size`, saved once under bench/out/models (weights seeded)."""
    path = os.path.join(common.OUT_DIR, "models", f"llama-{size}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import torch
    import transformers

    from sst_jax.models.tokenizer import tiny_tokenizer

    d, n_layers, heads, kv, ff = SIZES[size]
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=d, intermediate_size=ff,
                                   num_hidden_layers=n_layers, num_attention_heads=heads,
                                   num_key_value_heads=kv, max_position_embeddings=512, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg)
    os.makedirs(path, exist_ok=True)
    hf.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def data(n: int, seed: int = 0) -> dict:
    """n unpadded sequences of SEQ tokens; the last SEQ-PROMPT are the response (loss_mask 1)."""
    r = np.random.default_rng(seed)
    ids = r.integers(3, VOCAB, size=(n, SEQ)).astype(np.int32)
    loss_mask = np.zeros((n, SEQ), np.int32)
    loss_mask[:, PROMPT:] = 1
    return {"input_ids": ids, "attention_mask": np.ones((n, SEQ), np.int32), "loss_mask": loss_mask}


def factors(size: str, target: str, seed: int = 1) -> dict:
    """{(layer, module): arrays} shared by both frameworks. lora: (A (r,in), B (out,r));
    core: (P (out,r), Q (in,r)) with orthonormal columns."""
    d, n_layers, heads, kv, ff = SIZES[size]
    hd = d // heads
    shapes = {"q_proj": (heads * hd, d), "k_proj": (kv * hd, d), "v_proj": (kv * hd, d), "o_proj": (d, heads * hd),
              "gate_proj": (ff, d), "up_proj": (ff, d), "down_proj": (d, ff)}
    r = np.random.default_rng(seed)
    out = {}
    for layer in range(n_layers):
        for m in MODULES:
            o, i = shapes[m]
            if target == "lora":
                out[(layer, m)] = (r.normal(0, 1 / math.sqrt(i), (RANK, i)).astype(np.float32),
                                   r.normal(0, 0.02, (o, RANK)).astype(np.float32))
            else:
                out[(layer, m)] = (np.linalg.qr(r.normal(size=(o, RANK)))[0].astype(np.float32),
                                   np.linalg.qr(r.normal(size=(i, RANK)))[0].astype(np.float32))
    return out


def blocks(batch: dict, size: int):
    n = batch["input_ids"].shape[0]
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


# ------------------------------------------------------------------------------- sst-jax


def run_jax(size: str, target: str, n: int) -> dict:
    import jax
    import jax.numpy as jnp

    from sst_jax.fisher import branch_fisher, core_fisher
    from sst_jax.fisher.estimators import CoreSpace
    from sst_jax.models import LowRank, load_model

    model = load_model(model_dir(size))
    fac = factors(size, target)
    batch = data(n)
    if target == "lora":
        trainable = {k: (LowRank(a=jnp.asarray(a), b=jnp.asarray(b), scale=jnp.float32(2.0)),)
                     for k, (a, b) in fac.items()}
        run = lambda bl: branch_fisher(model, {}, trainable, bl, stats=("diag",), chunk=CHUNK,  # noqa: E731
                                       progress=False).diag
    else:
        spaces = {k: CoreSpace(p=jnp.asarray(p), sigma=jnp.ones((RANK,), jnp.float32), q=jnp.asarray(q))
                  for k, (p, q) in fac.items()}
        run = lambda bl: core_fisher(model, {}, spaces, bl, chunk=CHUNK, progress=False).dense  # noqa: E731
    all_blocks = blocks(batch, CHUNK)
    # Warm-up (compile) on one block of the same shape, then time all blocks.
    res = _measure_with_warmup(lambda bl: jax.block_until_ready(run(bl)), all_blocks)
    res["n_params"] = int(sum(x.size for x in jax.tree.leaves(model.params)))
    return res


def _measure_with_warmup(fn, all_blocks) -> dict:
    import time

    t0 = time.perf_counter()
    fn(all_blocks[:1])
    warm = time.perf_counter() - t0
    out = common.measure(lambda: fn(all_blocks), warmup=0, repeats=REPEATS)
    out["warmup_seconds"] = warm
    return out


# ------------------------------------------------------------------------------- PyTorch


def torch_model(size: str, target: str):
    """HF LlamaForCausalLM with hand-written LoRA / core wrappers on every target Linear; only
    the branch parameters require grad. Returns (model, {name: parameter})."""
    import torch
    import transformers

    common.set_torch_threads()

    class Branch(torch.nn.Module):
        def __init__(self, base, first, second):
            super().__init__()
            self.base = base
            if target == "lora":  # y += s · x Aᵀ Bᵀ
                self.lora_A = torch.nn.Parameter(torch.tensor(first))
                self.lora_B = torch.nn.Parameter(torch.tensor(second))
            else:  # y += x Q Mᵀ Pᵀ  (ΔW = P M Qᵀ)
                self.register_buffer("P", torch.tensor(first))
                self.register_buffer("Q", torch.tensor(second))
                self.core = torch.nn.Parameter(torch.zeros(RANK, RANK))

        def forward(self, x):
            if target == "lora":
                return self.base(x) + 2.0 * ((x @ self.lora_A.T) @ self.lora_B.T)
            return self.base(x) + ((x @ self.Q) @ self.core.T) @ self.P.T

    model = transformers.LlamaForCausalLM.from_pretrained(model_dir(size), attn_implementation="eager").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for (layer, m), (first, second) in factors(size, target).items():
        parent = model.model.layers[layer].self_attn if m in MODULES[:4] else model.model.layers[layer].mlp
        setattr(parent, m, Branch(getattr(parent, m), first, second))
    params = {k: v for k, v in model.named_parameters() if v.requires_grad}
    return model, params


def torch_loss(model, params, ids, loss_mask):
    """Mean response NLL of one sample (ids (T,), loss_mask (T,)), like sst_jax response_nll."""
    import torch
    from torch.func import functional_call

    logits = functional_call(model, params, (ids[None],), {"use_cache": False}).logits[0]
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    tok = torch.gather(logp, 1, ids[1:, None])[:, 0]
    mask = loss_mask[1:].float()
    return -(tok * mask).sum() / mask.sum().clamp(min=1.0)


def _accumulate(acc: dict, grads: dict, target: str) -> None:
    """Σg² (lora) or Σ g gᵀ per module (core); grads have a leading sample axis."""
    import torch

    for k, g in grads.items():
        if target == "lora":
            s = (g * g).sum(0)
        else:
            f = g.reshape(g.shape[0], -1)
            s = f.T @ f
        acc[k] = s if k not in acc else acc[k] + s


def run_torch(size: str, target: str, n: int, mode: str) -> dict:
    import torch
    from torch.func import grad, vmap

    model, params = torch_model(size, target)
    batch = data(n)
    ids_all = torch.tensor(batch["input_ids"], dtype=torch.long)
    lm_all = torch.tensor(batch["loss_mask"])
    idx_blocks = [list(range(i, min(i + CHUNK, n))) for i in range(0, n, CHUNK)]

    def run_vmap(blks):
        acc = {}
        g_fn = vmap(grad(lambda p, i, m: torch_loss(model, p, i, m)), in_dims=(None, 0, 0))
        for b in blks:
            _accumulate(acc, g_fn(params, ids_all[b], lm_all[b]), target)
        return acc

    def run_loop(blks):
        acc = {}
        for b in blks:
            for i in b:
                for p in params.values():
                    p.grad = None
                torch_loss(model, params, ids_all[i], lm_all[i]).backward()
                _accumulate(acc, {k: p.grad[None] for k, p in params.items()}, target)
        return acc

    fn = run_vmap if mode == "torchfunc" else run_loop
    res = _measure_with_warmup(fn, idx_blocks)
    res["n_params"] = int(sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in params.values()))
    return res


# ------------------------------------------------------------------------------- driver

METHODS = ("jax", "torchfunc", "loop")


def case_result(case: str) -> dict:
    target, size, n, method = case.split(":")
    n = int(n)
    res = run_jax(size, target, n) if method == "jax" else run_torch(size, target, n, method)
    res["samples_per_s"] = n / res["seconds"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for both frameworks")
    ap.add_argument("--chunk", type=int, default=16, help="samples per vmapped gradient (both frameworks)")
    args = ap.parse_args()
    if args.case:
        common.emit(case_result(args.case))
        return
    os.environ["SST_BENCH_THREADS"] = str(args.threads)
    os.environ["SST_BENCH_CHUNK"] = str(args.chunk)
    global CHUNK
    CHUNK = args.chunk
    grid = [("lora", "m", 16), ("lora", "m", 64)] if args.quick else [
        ("lora", "s", 32), ("lora", "m", 16), ("lora", "m", 32), ("lora", "m", 64), ("lora", "l", 32),
        ("core", "m", 32)]
    for size in {s for _, s, _ in grid}:
        model_dir(size)  # build once, outside the timed children
    results = {}
    for target, size, n in grid:
        for method in METHODS:
            case = f"{target}:{size}:{n}:{method}"
            results[case] = common.run_case(__file__, case)
            r = results[case]
            print(case, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                         if k in ("samples_per_s", "peak_mb", "warmup_seconds", "error")}, flush=True)

    rows = []
    for target, size, n in grid:
        r = {m: results[f"{target}:{size}:{n}:{m}"] for m in METHODS}
        sps = {m: r[m].get("samples_per_s") for m in METHODS}
        mem = {m: r[m].get("peak_mb") for m in METHODS}
        params = r["jax"].get("n_params")
        rows.append([f"{target} {size} ({params / 1e6:.2f}M) N={n}" if params else f"{target} {size} N={n}",
                     sps["jax"], sps["torchfunc"], sps["loop"], common.ratio(sps["jax"], sps["torchfunc"]),
                     common.ratio(sps["jax"], sps["loop"]), mem["jax"], mem["torchfunc"], mem["loop"]])

    notes = [f"Per-sample gradients of the mean response NLL (T={SEQ}, response {SEQ - PROMPT} tokens, vocab {VOCAB}), "
             f"rank-{RANK} branches on all 7 linear modules of every layer, float32, chunk {CHUNK} samples per vmap.",
             f"samples/s: best of {REPEATS} timed runs over N samples, after a warm-up of one chunk (JAX compile excluded; JAX compile time is in the JSON "
             "as warmup_seconds). Peak MiB: extra peak RSS of the case's own process during the timed run "
             "(Linux VmHWM reset via /proc/self/clear_refs; above the loaded model and data).",
             f"Threads: {args.threads} per framework (torch.set_num_threads({args.threads}), OMP/MKL_NUM_THREADS, "
             f"XLA intra_op_parallelism_threads={args.threads}); one process at a time. Torch uses eager attention.",
             "Statistic accumulated in every column: LoRA rows Σ g² (diagonal Fisher), core rows Σ g gᵀ per module "
             "(dense r²×r² core Fisher, SST's input)."]
    slopes = _slopes(results, grid)
    notes += slopes
    name = "fisher_per_sample" + ("" if args.chunk == 16 else f"_chunk{args.chunk}") + ("_quick" if args.quick else "")
    common.write_table(name, "Per-sample Fisher: samples/s (higher is better) and peak memory",
                       ["case", "sst-jax /s", "torch.func /s", "torch loop /s", "jax÷func", "jax÷loop",
                        "jax MiB", "func MiB", "loop MiB"], rows, notes, extra={"results": results})


def _slopes(results: dict, grid) -> list[str]:
    """Seconds per extra sample (linear fit over N) and the size exponent (log-log fit over params)."""
    out = []
    ns = sorted(n for t, s, n in grid if t == "lora" and s == "m")
    if len(ns) >= 2:
        parts = []
        for m in METHODS:
            t = [results[f"lora:m:{n}:{m}"].get("seconds") for n in ns]
            if None not in t:
                slope, icpt = np.polyfit(ns, t, 1)
                parts.append(f"{m} {slope * 1e3:.1f} ms/sample (+{icpt:.2f} s)")
        out.append(f"Time vs samples (lora m, N={ns}, linear fit): " + "; ".join(parts) + ".")
    sizes = [s for t, s, n in grid if t == "lora" and n == 32]
    if len(sizes) >= 2:
        parts = []
        for m in METHODS:
            rs = [results[f"lora:{s}:32:{m}"] for s in sizes]
            if all("seconds" in r for r in rs):
                p = [results[f"lora:{s}:32:jax"].get("n_params", 1) for s in sizes]
                e = np.polyfit(np.log(p), np.log([r["seconds"] for r in rs]), 1)[0]
                parts.append(f"{m} time ∝ params^{e:.2f}")
        out.append(f"Time vs model size (lora, N=32, sizes {sizes}, log-log fit): " + "; ".join(parts) + ".")
    return out


if __name__ == "__main__":
    main()
