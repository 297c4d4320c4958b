"""Per-device memory plan of an sst-jax run (the `--dry_run` backend): a pure function of the
model config, mesh and run sizes; nothing is allocated.

What is counted (bytes per device):
- weights: every parameter of `param_shapes(config)` in `dtype`, split as `param_specs` splits
  it on this mesh (column-parallel (out, in) over (tensor, fsdp), row-parallel over (fsdp,
  tensor), embeddings/lm_head over (tensor, fsdp), norms replicated; an axis that does not
  divide its dimension replicates it). Replicated over `data`.
- LoRA params: r·(in + out) per targeted module, float32, replicated (they are small).
- LoRA grads: one float32 copy; optimizer: AdamW's two moments, 2 × LoRA in float32.
- activations (training batch / Fisher chunk): what reverse mode keeps per sample without
  rematerialisation, per layer and token, in `dtype` unless noted:
    4·d (residual stream, two RMSNorm outputs, attention residual)
    + (q_dim + 2·kv_dim) + q_dim (q, k, v; attention output)
    + n_heads·T·(4 + itemsize)/itemsize (scores in float32 and probabilities: materialised attention)
    + 3·d_ff (gate, up, their SwiGLU product),
  plus float32 logits and their gradient, 2·T·vocab·4 bytes per sample. Head- and d_ff-sized
  terms are split over `tensor`, training samples over data × fsdp (ceil). The Fisher chunk is
  per data shard (`sst_jax.fisher.accumulate` pads each block to chunk × data and every
  data-parallel device scans `chunk` samples at a time), so only fsdp splits it. For the Fisher
  also the per-sample gradients in core space (r² float32 per module per sample) and the
  accumulator (r⁴ float32 per module).
- generation: the KV cache, n_layers · 2 · b · (seq_len + max_new_tokens) · kv_dim, with b =
  gen_batch split over data × fsdp and kv_dim over `tensor`, plus the prefill of one layer at a
  time (materialised float32 scores b·n_heads·seq_len²) and the last position's logits.

Phases do not overlap: peak = weights + LoRA + max(train, Fisher, generation). `fits` keeps
`reserve_fraction` (default 10 %) of the device for the runtime, XLA scratch and fragmentation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import numpy as np

from sst_jax.models.branches import MODULE_NAMES
from sst_jax.models.config import DecoderConfig

GiB = 1024 ** 3
GB = 1000 ** 3

# Shapes of the hub presets (from their published config.json, as tests/models/test_presets.py).
PRESET_CONFIGS = {
    "mistral-7b": DecoderConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                                d_ff=14336, architecture="mistral", max_position_embeddings=32768),
    "llama-3.1-8b": DecoderConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                                  d_ff=14336, architecture="llama", max_position_embeddings=131072),
    "qwen-2.5-14b": DecoderConfig(vocab_size=152064, d_model=5120, n_layers=48, n_heads=40, n_kv_heads=8,
                                  d_ff=13824, architecture="qwen2", bias_modules=("q_proj", "k_proj", "v_proj"),
                                  max_position_embeddings=32768),
}

_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of each component, the phase peaks, and whether the run fits."""

    model: str
    mesh_shape: tuple[tuple[str, int], ...]
    dtype: str
    device_bytes: int
    weights: int
    lora_params: int
    lora_grads: int
    optimizer: int
    train_activations: int
    fisher_activations: int
    fisher_state: int
    kv_cache: int
    generation_work: int
    reserve_fraction: float = 0.1
    sizes: tuple[tuple[str, int], ...] = ()

    @property
    def train_peak(self) -> int:
        return self.lora_grads + self.optimizer + self.train_activations

    @property
    def fisher_peak(self) -> int:
        return self.fisher_activations + self.fisher_state

    @property
    def generation_peak(self) -> int:
        return self.kv_cache + self.generation_work

    @property
    def peak(self) -> int:
        return self.weights + self.lora_params + max(self.train_peak, self.fisher_peak, self.generation_peak)

    @property
    def usable_bytes(self) -> int:
        return int(self.device_bytes * (1.0 - self.reserve_fraction))

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable_bytes

    def format(self) -> str:
        """A Markdown table (GiB per device)."""
        mesh = " × ".join(f"{k}={v}" for k, v in self.mesh_shape)
        g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
        rows = [("weights", self.weights), ("LoRA params (f32)", self.lora_params),
                ("LoRA grads (f32)", self.lora_grads), ("AdamW state (2× f32)", self.optimizer),
                ("training activations", self.train_activations),
                ("Fisher activations", self.fisher_activations), ("Fisher grads + accumulator", self.fisher_state),
                ("KV cache", self.kv_cache), ("generation prefill + logits", self.generation_work),
                ("phase peak: training", self.train_peak), ("phase peak: Fisher", self.fisher_peak),
                ("phase peak: generation", self.generation_peak),
                ("**peak (weights + LoRA + max phase)**", self.peak),
                (f"usable ({100 * (1 - self.reserve_fraction):.0f}% of {self.device_bytes / GB:.0f} GB)",
                 self.usable_bytes)]
        sizes = ", ".join(f"{k}={v}" for k, v in self.sizes)
        lines = [f"**{self.model}**, {self.dtype}, mesh {mesh}, {sizes}: "
                 f"{'fits' if self.fits else 'DOES NOT FIT'} ({self.peak / GiB:.1f} of {self.usable_bytes / GiB:.1f} GiB)",
                 "", "| component | GiB / device |", "|---|---|"]
        lines += [f"| {name} | {g(b)} |" for name, b in rows]
        return "\n".join(lines) + "\n"


def _itemsize(dtype) -> int:
    return int(np.dtype(jax.numpy.dtype(dtype)).itemsize)


def weight_bytes(config: DecoderConfig, mesh_shape: Mapping[str, int], dtype) -> int:
    """Bytes of the params on one device, as `param_specs(…, mesh_shape)` shards them."""
    from sst_jax.models.llama import param_shapes
    from sst_jax.models.sharding import param_specs

    mesh_shape = {a: int(mesh_shape.get(a, 1)) for a in ("data", "fsdp", "tensor")}
    shapes = param_shapes(config.replace(dtype=jax.numpy.dtype(dtype).name))
    specs = param_specs(shapes, mesh_shape)
    total = 0
    for leaf, spec in zip(jax.tree.leaves(shapes), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
        n = 1
        for dim, axis in zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec))):
            size = 1 if axis is None else math.prod(mesh_shape[a] for a in ((axis,) if isinstance(axis, str) else axis))
            n *= dim // size
        total += n * _itemsize(dtype)
    return total


def _split(n: int, parts: int) -> int:
    return -(-n // parts)


def _tensor_split(dim: int, t: int) -> int:
    """A dimension split over `tensor` when divisible, else replicated (as param_specs)."""
    return dim // t if dim % t == 0 else dim


def activation_bytes(config: DecoderConfig, *, samples: int, seq_len: int, dtype, tensor: int = 1) -> int:
    """Reverse-mode activations of `samples` sequences of `seq_len` tokens (see module doc)."""
    it = _itemsize(dtype)
    c, t = config, tensor
    heads = _tensor_split(c.n_heads, t)
    per_tok = (4 * c.d_model + _tensor_split(2 * c.q_dim + 2 * c.kv_dim, t) + 3 * _tensor_split(c.d_ff, t)) * it
    per_tok += heads * seq_len * (4 + it)  # float32 scores + probabilities
    logits = 2 * seq_len * c.vocab_size * 4
    return samples * (c.n_layers * seq_len * per_tok + logits)


def lora_param_count(config: DecoderConfig, r: int, targets: Sequence[str], layers: Sequence[int] | None) -> int:
    layers = range(config.n_layers) if layers is None else layers
    return len(layers) * sum(r * sum(config.module_shape(m)) for m in targets)


def memory_plan(config: DecoderConfig, *, mesh_shape: Mapping[str, int], dtype="bfloat16", lora_r: int = 16,
                lora_targets: Sequence[str] = MODULE_NAMES, lora_layers: Sequence[int] | None = None,
                batch_size: int = 8, seq_len: int = 1024, fisher_chunk: int = 8, gen_batch: int = 32,
                max_new_tokens: int = 256, device_bytes: int = 80 * GB, reserve_fraction: float = 0.1,
                name: str = "model") -> MemoryPlan:
    """Per-device bytes of weights, LoRA, optimizer, activations, Fisher and generation.

    mesh_shape: {"data": D, "fsdp": F, "tensor": T} (missing axes are 1). The training and
    generation batches split over data × fsdp, the Fisher chunk (samples per data shard) over
    fsdp only; see the module docstring for each term's formula."""
    unknown = set(mesh_shape) - {"data", "fsdp", "tensor"}
    if unknown:
        raise ValueError(f"mesh_shape axes must be data, fsdp, tensor; got {sorted(unknown)}")
    mesh = {a: int(mesh_shape.get(a, 1)) for a in ("data", "fsdp", "tensor")}
    bad = [m for m in lora_targets if m not in MODULE_NAMES]
    if bad:
        raise ValueError(f"unknown LoRA targets {bad}; expected some of {MODULE_NAMES}")
    d, f, t = mesh["data"], mesh["fsdp"], mesh["tensor"]
    it = _itemsize(dtype)
    n_lora = lora_param_count(config, lora_r, lora_targets, lora_layers)
    n_mod = (config.n_layers if lora_layers is None else len(lora_layers)) * len(lora_targets)
    per_dev = lambda b: _split(b, d * f)  # noqa: E731
    train_act = activation_bytes(config, samples=per_dev(batch_size), seq_len=seq_len, dtype=dtype, tensor=t)
    fisher_samples = _split(fisher_chunk, f)  # chunk is per data shard: data does not divide it
    fisher_act = activation_bytes(config, samples=fisher_samples, seq_len=seq_len, dtype=dtype, tensor=t)
    fisher_state = n_mod * 4 * (fisher_samples * lora_r ** 2 + lora_r ** 4)
    b = per_dev(gen_batch)
    total = seq_len + max_new_tokens
    kv = config.n_layers * 2 * b * total * _tensor_split(config.kv_dim, t) * it
    prefill = b * _tensor_split(config.n_heads, t) * seq_len * seq_len * (4 + it) \
        + b * seq_len * (2 * config.d_model + _tensor_split(config.q_dim + 2 * config.kv_dim + 3 * config.d_ff, t)) * it \
        + b * config.vocab_size * 4
    sizes = (("r", lora_r), ("targets", len(lora_targets)), ("batch", batch_size), ("seq", seq_len),
             ("fisher_chunk", fisher_chunk), ("gen_batch", gen_batch), ("new_tokens", max_new_tokens))
    return MemoryPlan(model=name, mesh_shape=tuple(mesh.items()), dtype=jax.numpy.dtype(dtype).name,
                      device_bytes=int(device_bytes), weights=weight_bytes(config, mesh, dtype),
                      lora_params=4 * n_lora, lora_grads=4 * n_lora, optimizer=8 * n_lora,
                      train_activations=train_act, fisher_activations=fisher_act, fisher_state=fisher_state,
                      kv_cache=kv, generation_work=prefill, reserve_fraction=reserve_fraction, sizes=sizes)
