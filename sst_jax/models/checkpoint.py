"""Checkpoint readers: HF safetensors (single file or sharded index) and GGUF, mapped onto the
params pytree of `sst_jax.models.llama` by a key table.

Every failure names the file and the key: wrong file, missing or unknown keys, shape
mismatches, unsupported architecture or quantization type.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Iterator

import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from sst_jax.errors import CheckpointError
from sst_jax.io_utils import ensure_readable, permission_denied
from sst_jax.models.config import DecoderConfig
from sst_jax.models.llama import Params, param_shapes

Path = tuple  # a path into the params pytree, e.g. ("layers", 3, "q_proj", "weight")

# HF safetensors key -> params path. Layer index is captured as group 1.
_HF_TABLE: list[tuple[re.Pattern, Callable[[re.Match], Path]]] = [
    (re.compile(r"model\.embed_tokens\.weight"), lambda m: ("embed_tokens",)),
    (re.compile(r"model\.norm\.weight"), lambda m: ("norm",)),
    (re.compile(r"lm_head\.weight"), lambda m: ("lm_head",)),
    (re.compile(r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight"),
     lambda m: ("layers", int(m[1]), m[2])),
    (re.compile(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.(weight|bias)"),
     lambda m: ("layers", int(m[1]), m[2], m[3])),
]
_HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq")

# GGUF tensor name -> params path (llama.cpp naming).
_GGUF_MODULES = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
                 "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}
_GGUF_TABLE: list[tuple[re.Pattern, Callable[[re.Match], Path]]] = [
    (re.compile(r"token_embd\.weight"), lambda m: ("embed_tokens",)),
    (re.compile(r"output_norm\.weight"), lambda m: ("norm",)),
    (re.compile(r"output\.weight"), lambda m: ("lm_head",)),
    (re.compile(r"blk\.(\d+)\.attn_norm\.weight"), lambda m: ("layers", int(m[1]), "input_layernorm")),
    (re.compile(r"blk\.(\d+)\.ffn_norm\.weight"), lambda m: ("layers", int(m[1]), "post_attention_layernorm")),
    (re.compile(r"blk\.(\d+)\.(" + "|".join(_GGUF_MODULES) + r")\.(weight|bias)"),
     lambda m: ("layers", int(m[1]), _GGUF_MODULES[m[2]], m[3])),
]
GGUF_SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


def map_key(key: str, table) -> Path | None:
    for pattern, to_path in table:
        m = pattern.fullmatch(key)
        if m:
            return to_path(m)
    return None


def _get(tree: Any, path: Path) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: Any, path: Path, value: Any) -> None:
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


def _expected_paths(shapes: Params) -> dict[Path, tuple[int, ...]]:
    out: dict[Path, tuple[int, ...]] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, prefix + (k,))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, prefix + (i,))
        else:
            out[prefix] = tuple(node.shape)

    walk(shapes, ())
    return out


def _empty_like(shapes: Params) -> Params:
    if isinstance(shapes, dict):
        return {k: _empty_like(v) for k, v in shapes.items()}
    if isinstance(shapes, (list, tuple)):
        return [_empty_like(v) for v in shapes]
    return None


def assemble(config: DecoderConfig, tensors: Iterator[tuple[str, str, Path | None, Callable[[], np.ndarray]]],
             *, source: str, total: int | None = None, desc: str = "loading") -> Params:
    """Build the params pytree from (file, key, path, load) items, checking names and shapes.

    `load` is called only for mapped keys, so unknown tensors fail before anything is read.
    """
    shapes = param_shapes(config)
    expected = _expected_paths(shapes)
    params = _empty_like(shapes)
    dtype = jnp.dtype(config.dtype)
    seen: set[Path] = set()
    for file, key, path, load in tqdm(tensors, total=total, desc=desc, leave=False):
        if path is None:
            raise CheckpointError(f"{file}: unexpected tensor {key!r} (not a Llama/Mistral/Qwen2 "
                                  f"{config.architecture} weight)")
        if path not in expected:
            if path == ("lm_head",) and config.tie_word_embeddings:
                continue  # tied checkpoints may still store the head; it equals the embedding
            raise CheckpointError(f"{file}: tensor {key!r} does not fit the config "
                                  f"({config.n_layers} layers, bias on {config.bias_modules or 'none'})")
        array = load()
        if tuple(array.shape) != expected[path]:
            raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(array.shape)}, "
                                  f"expected {expected[path]} from the config")
        _set(params, path, jnp.asarray(array, dtype=dtype))
        seen.add(path)
    missing = [p for p in expected if p not in seen]
    if missing:
        names = [".".join(str(x) for x in p) for p in missing[:5]]
        raise CheckpointError(f"{source}: checkpoint is missing {len(missing)} tensors the config "
                              f"needs, e.g. {names}")
    return params


# ---------------------------------------------------------------------------------------------
# HF safetensors


def safetensors_files(directory: str) -> list[str]:
    """The weight files of an HF checkpoint dir: sharded index, or model.safetensors."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        ensure_readable(index, "safetensors index")
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except PermissionError as e:
            raise permission_denied(index, "safetensors index") from e
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e}); it needs "
                                  "{\"weight_map\": {tensor name: shard file}}. Re-save it") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
        files = sorted(set(weight_map.values()))
        paths = [os.path.join(directory, f) for f in files]
        for p in paths:
            if not os.path.exists(p):
                raise CheckpointError(f"{index}: shard {os.path.basename(p)} is missing")
        return paths
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return [single]
    others = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth", ".gguf")))
    hint = f" (found {others}; only safetensors and GGUF are read)" if others else ""
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json{hint}")


def load_safetensors(config: DecoderConfig, files: list[str]) -> Params:
    """Read HF safetensors shards into the params pytree (cast to config.dtype)."""
    from safetensors import SafetensorError, safe_open

    def items():
        for file in files:
            ensure_readable(file, "safetensors file")
            try:
                handle = safe_open(file, framework="flax")
            except PermissionError as e:
                raise permission_denied(file, "safetensors file") from e
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{file}: not a readable safetensors file ({e}); the file is corrupt "
                                      "or truncated: download or save it again") from e
            with handle as f:
                for key in f.keys():
                    if _HF_IGNORED.fullmatch(key):
                        continue
                    load = lambda f=f, key=key, file=file: _get_tensor(f, key, file)  # noqa: E731
                    yield file, key, map_key(key, _HF_TABLE), load

    def _get_tensor(f, key, file):
        try:
            return f.get_tensor(key)
        except Exception as e:  # safetensors / the array backend on a corrupt tensor
            raise CheckpointError(f"{file}: tensor {key!r} cannot be read ({type(e).__name__}: {e}); "
                                  "the file is corrupt or truncated: download or save it again") from e

    logging.info("loading %d safetensors file(s) from %s", len(files), os.path.dirname(files[0]))
    source = files[0] if len(files) == 1 else f"{os.path.dirname(files[0])} ({len(files)} shards)"
    return assemble(config, items(), source=source, desc="safetensors")


# ---------------------------------------------------------------------------------------------
# GGUF


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved -> HF rotate-half RoPE layout)."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def gguf_dequantize(tensor, file: str) -> np.ndarray:
    """float32 array in HF (out, in) layout from a GGUF tensor (F32/F16/BF16/Q8_0/Q4_0/Q4_1)."""
    from gguf import quants

    kind = tensor.tensor_type.name
    if kind not in GGUF_SUPPORTED_TYPES:
        raise CheckpointError(f"{file}: tensor {tensor.name!r} has quantization {kind}; "
                              f"supported: {GGUF_SUPPORTED_TYPES}")
    data = quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    return np.asarray(data, np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


def _gguf_field(reader, key: str, file: str, default: Any = None, kind: type | None = None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise CheckpointError(f"{file}: GGUF metadata key {key!r} is missing; the file was not written "
                                  "by a llama.cpp converter for a llama/qwen2 model")
        return default
    try:
        value = field.contents()
    except Exception as e:  # gguf's parser on a malformed field
        raise CheckpointError(f"{file}: GGUF metadata key {key!r} cannot be read ({type(e).__name__}: {e})") from e
    if kind is not None:
        ok = (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
              if kind in (int, float) else isinstance(value, kind))
        if kind is int and ok and float(value) != int(value):
            ok = False
        if not ok:
            want = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
            raise CheckpointError(f"{file}: GGUF metadata key {key!r} must be {want}, got {type(value).__name__} "
                                  f"{value!r}; the file is not a valid model GGUF")
        value = kind(value)
    return value


def gguf_config(reader, file: str, *, dtype: str = "float32") -> DecoderConfig:
    arch = _gguf_field(reader, "general.architecture", file)
    if arch not in ("llama", "qwen2"):
        raise CheckpointError(f"{file}: GGUF architecture {arch!r} is not supported (llama, qwen2)")
    g = lambda k, d=None, kind=int: _gguf_field(reader, f"{arch}.{k}", file, d, kind)  # noqa: E731
    names = {t.name for t in reader.tensors}
    n_heads = g("attention.head_count")
    d_model = g("embedding_length")
    vocab = g("vocab_size", 0)
    if not vocab:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise CheckpointError(f"{file}: GGUF has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
        vocab = len(tokens.data)
    for key, value in (("attention.head_count", n_heads), ("embedding_length", d_model)):
        if value <= 0:
            raise CheckpointError(f"{file}: GGUF metadata {arch}.{key} = {value} must be positive")
    if "rope_freqs.weight" in names or reader.fields.get(f"{arch}.rope.scaling.type") is not None:
        raise CheckpointError(f"{file}: GGUF RoPE scaling (rope_freqs / rope.scaling) is not supported; "
                              "load the HF safetensors checkpoint instead")
    eos = reader.fields.get("tokenizer.ggml.eos_token_id")
    pad = reader.fields.get("tokenizer.ggml.padding_token_id")
    eos_ids = (int(eos.contents()),) if eos is not None else ()
    return DecoderConfig(
        vocab_size=int(vocab), d_model=d_model, n_layers=g("block_count"), n_heads=n_heads,
        n_kv_heads=g("attention.head_count_kv", n_heads), d_ff=g("feed_forward_length"),
        head_dim=g("rope.dimension_count", d_model // n_heads), architecture=arch,
        rms_eps=g("attention.layer_norm_rms_epsilon", kind=float), rope_theta=g("rope.freq_base", 10000.0, float),
        max_position_embeddings=g("context_length", 4096),
        bias_modules=tuple(hf for gg, hf in _GGUF_MODULES.items() if f"blk.0.{gg}.bias" in names),
        tie_word_embeddings="output.weight" not in names, dtype=dtype, eos_token_ids=eos_ids,
        pad_token_id=int(pad.contents()) if pad is not None else (eos_ids[0] if eos_ids else 0))


def load_gguf(file: str, *, dtype: str = "float32") -> tuple[DecoderConfig, Params]:
    """Config and params from a GGUF file (dequantized with numpy via the `gguf` package)."""
    from gguf import GGUFReader

    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: GGUF file not found")
    ensure_readable(file, "GGUF file")
    try:
        reader = GGUFReader(file)
    except PermissionError as e:
        raise permission_denied(file, "GGUF file") from e
    except Exception as e:  # gguf raises ValueError/struct.error/... on foreign files
        raise CheckpointError(f"{file}: not a GGUF file ({type(e).__name__}: {e}); the file is corrupt, "
                              "truncated or another format") from e
    config = gguf_config(reader, file, dtype=dtype)
    permute = config.architecture == "llama"

    def load(t, path):
        try:
            w = gguf_dequantize(t, file)
        except CheckpointError:
            raise
        except Exception as e:  # truncated data / bad block layout inside gguf or numpy
            raise CheckpointError(f"{file}: tensor {t.name!r} cannot be read ({type(e).__name__}: {e}); "
                                  "the file is corrupt or truncated") from e
        if permute and path[-2:] in (("q_proj", "weight"), ("k_proj", "weight")):
            w = unpermute_qk(w, config.n_heads if path[-2] == "q_proj" else config.n_kv_heads)
        return w

    def items():
        for t in reader.tensors:
            path = map_key(t.name, _GGUF_TABLE)
            yield file, t.name, path, (lambda t=t, path=path: load(t, path))

    return config, assemble(config, items(), source=file, total=len(reader.tensors), desc="gguf")
