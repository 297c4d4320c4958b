"""DecoderConfig: one frozen, hashable description of a Llama / Mistral / Qwen2 decoder.

Hashable so it can be a static argument of `jax.jit`. Built from an HF `config.json`
(through `transformers.AutoConfig`), from GGUF metadata, or directly for the `tiny` preset.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sst_jax.errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shapes and options of a pre-norm RMSNorm / RoPE / GQA / SwiGLU decoder."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    head_dim: int | None = None  # None: d_model // n_heads
    architecture: str = "llama"
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    # RoPE scaling: "default" or "llama3" (Llama-3.1). The llama3 fields are unused otherwise.
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 4096
    # Sliding-window attention (Mistral): a key j is visible from query i iff i - j < window.
    # `sliding_layers` lists the layers that use it (all layers when None).
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] | None = None
    # Linear modules that carry a bias (Qwen2: q/k/v; Llama `attention_bias`: q/k/v/o).
    bias_modules: tuple[str, ...] = ()
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(f"unsupported architecture {self.architecture!r}; "
                                  f"supported: {SUPPORTED_ARCHITECTURES}")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise CheckpointError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def window_of(self, layer: int) -> int | None:
        """Sliding window of `layer` (None: full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.sliding_layers is not None and layer not in self.sliding_layers:
            return None
        return self.sliding_window

    def module_shape(self, module: str) -> tuple[int, int]:
        """(out, in) of a target linear module, HF layout."""
        return {
            "q_proj": (self.q_dim, self.d_model),
            "k_proj": (self.kv_dim, self.d_model),
            "v_proj": (self.kv_dim, self.d_model),
            "o_proj": (self.d_model, self.q_dim),
            "gate_proj": (self.d_ff, self.d_model),
            "up_proj": (self.d_ff, self.d_model),
            "down_proj": (self.d_model, self.d_ff),
        }[module]

    def replace(self, **changes: Any) -> "DecoderConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: Any, *, dtype: str = "float32", source: str = "config.json") -> "DecoderConfig":
        """From a `transformers` PretrainedConfig (v5 `rope_parameters` or v4 `rope_scaling`)."""
        arch = getattr(hf, "model_type", None)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(f"{source}: model_type {arch!r} (architectures="
                                  f"{getattr(hf, 'architectures', None)}) is not supported; "
                                  f"supported: {SUPPORTED_ARCHITECTURES}")
        if getattr(hf, "quantization_config", None):
            qc = hf.quantization_config
            method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", qc)
            raise CheckpointError(f"{source}: quantized checkpoints ({method}) are not supported; "
                                  "use the unquantized safetensors or a GGUF file")
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (SwiGLU needs 'silu')")
        if getattr(hf, "mlp_bias", False):
            raise CheckpointError(f"{source}: mlp_bias=True is not supported")

        rope = dict(getattr(hf, "rope_parameters", None) or {})
        if not rope:  # transformers 4 layout
            rope = dict(getattr(hf, "rope_scaling", None) or {})
            rope.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in ("default", "llama3"):
            raise CheckpointError(f"{source}: rope_type {rope_type!r} is not supported (default, llama3)")

        window = None
        sliding_layers = None
        if arch == "mistral":
            window = getattr(hf, "sliding_window", None)
        elif arch == "qwen2" and getattr(hf, "use_sliding_window", False):
            window = getattr(hf, "sliding_window", None)
            types = getattr(hf, "layer_types", None)
            if types is not None:
                sliding_layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")

        if arch == "qwen2":
            bias = ("q_proj", "k_proj", "v_proj")
        elif getattr(hf, "attention_bias", False):
            bias = ("q_proj", "k_proj", "v_proj", "o_proj")
        else:
            bias = ()

        eos = getattr(hf, "eos_token_id", None)
        eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        pad = getattr(hf, "pad_token_id", None)
        return cls(
            vocab_size=hf.vocab_size,
            d_model=hf.hidden_size,
            n_layers=hf.num_hidden_layers,
            n_heads=hf.num_attention_heads,
            n_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            d_ff=hf.intermediate_size,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            architecture=arch,
            rms_eps=float(hf.rms_norm_eps),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
            max_position_embeddings=int(getattr(hf, "max_position_embeddings", 4096)),
            sliding_window=None if window is None else int(window),
            sliding_layers=sliding_layers,
            bias_modules=bias,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            dtype=dtype,
            eos_token_ids=eos_ids,
            pad_token_id=int(pad) if pad is not None else (eos_ids[0] if eos_ids else 0),
        )
