"""PEFT import/export: `adapter_model.safetensors` + `adapter_config.json`, both directions.

Tensor keys are PEFT's: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`.
PEFT features that change the maths beyond s·B·A (DoRA, lora_bias, trained biases,
modules_to_save, fan_in_fan_out, …) are refused with a message, never silently dropped.

`save_peft(..., base_config=cfg)` adds one extra key to adapter_config.json,
`sst_jax_base_fingerprint` (see `sst_jax.lora.check`); PEFT ignores keys it does not know, so
such a folder still loads with `PeftConfig` / `PeftModel.from_pretrained`. Folders are written
with `sst_jax.io_utils.atomic_directory` (complete new folder beside the old, then swapped in);
`load_peft` first repairs what an interrupted swap left (`recover_directory`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from absl import logging
from safetensors.numpy import load_file, save_file

from sst_jax.errors import AdapterError
from sst_jax.io_utils import atomic_directory, ensure_readable, pause_point, permission_denied, recover_directory
from sst_jax.lora.adapter import AdapterMeta, LoraAdapter, LoraFactors, freeze_pattern
from sst_jax.lora.check import FINGERPRINT_FIELDS, check_compatible, FINGERPRINT_KEY, adapter_fingerprint, base_fingerprint, \
    with_fingerprint
from sst_jax.models.branches import MODULE_NAMES, ModuleKey, hf_module_path, parse_module_path

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_KEY_RE = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<which>[AB])\.weight$")

# Config fields whose non-default value changes the adapter's function: (field, ok-values, advice).
_UNSUPPORTED = (
    ("use_dora", (False, None), "DoRA adds a magnitude vector; merge it into the base with PEFT "
     "(merge_and_unload) or retrain as plain LoRA"),
    ("lora_bias", (False, None), "a LoRA bias is not a low-rank ΔW; retrain with lora_bias=False"),
    ("bias", ("none", None), "trained biases are outside ΔW; retrain with bias='none'"),
    ("modules_to_save", (None, []), "fully trained modules (e.g. embeddings, lm_head) are not LoRA "
     "factors; retrain without modules_to_save or merge them into the base model first"),
    ("fan_in_fan_out", (False, None), "fan_in_fan_out layouts (GPT-2 Conv1D) are not supported"),
    ("layer_replication", (None, []), "layer replication changes the base model's layer stack"),
    ("trainable_token_indices", (None, {}, []), "trainable tokens change the embedding matrix"),
    ("use_qalora", (False, None), "QA-LoRA pools the input; retrain as plain LoRA"),
    ("target_parameters", (None, []), "LoRA on raw parameters (MoE experts) is not supported"),
)


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"missing {path}: a PEFT adapter directory needs {CONFIG_NAME} next to {WEIGHTS_NAME}")
    ensure_readable(path, "adapter config")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except PermissionError as err:
        raise permission_denied(path, "adapter config") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path} is not valid JSON ({err}); the file is corrupt or truncated: "
                           "re-save the adapter") from err
    if not isinstance(config, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(config).__name__}")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{path}: peft_type={peft_type!r}; sst-jax reads LoRA adapters only")
    for field, ok, advice in _UNSUPPORTED:
        if config.get(field, ok[0]) not in ok:
            raise AdapterError(f"{path}: {field}={config[field]!r} is not supported: {advice}")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        if not all(isinstance(t, str) for t in targets):
            raise AdapterError(f"{path}: target_modules must be a list of module names or a regex string, "
                               f"got {targets!r}")
        unknown = [t for t in targets if t.split(".")[-1] not in MODULE_NAMES]
        if unknown:
            raise AdapterError(f"{path}: target_modules {unknown} are not decoder linear layers "
                               f"{list(MODULE_NAMES)}; sst-jax cannot apply LoRA there. Retrain "
                               "without them or merge them into the base model with PEFT first")
    elif targets is not None and not isinstance(targets, str):
        raise AdapterError(f"{path}: target_modules must be a list of module names or a regex string, "
                           f"got {type(targets).__name__} {targets!r}")
    for field in ("r", "lora_alpha"):
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise AdapterError(f"{path}: {field} must be a positive number, got {value!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field)
        if pattern is None:
            continue
        if not isinstance(pattern, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in pattern.values()):
            raise AdapterError(f"{path}: {field} must map module patterns to positive numbers, got {pattern!r}")
    layers = config.get("layers_to_transform")
    if layers is not None and not (
            (isinstance(layers, int) and not isinstance(layers, bool) and layers >= 0)
            or (isinstance(layers, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                 for v in layers))):
        raise AdapterError(f"{path}: layers_to_transform must be a layer index or a list of them, got {layers!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdapterError(f"{path}: use_rslora must be true or false, got {config['use_rslora']!r}")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterError(f"{path}: base_model_name_or_path must be a string, got {base!r}")
    fp = config.get(FINGERPRINT_KEY)
    if fp is not None:
        ok = isinstance(fp, dict) and isinstance(fp.get("family", ""), str) and all(
            isinstance(fp[k], int) and not isinstance(fp[k], bool) and fp[k] > 0
            for k in FINGERPRINT_FIELDS if k != "family" and k in fp)
        if not ok:
            raise AdapterError(f"{path}: {FINGERPRINT_KEY} must be an object of positive integers "
                               f"({', '.join(FINGERPRINT_FIELDS[1:])}) and a family name, got {fp!r}; "
                               "remove the key or re-save the adapter")
    return config


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise AdapterError(
                f"{directory} holds only a pickled adapter_model.bin, which sst-jax does not unpickle "
                "(unsafe). Re-save it with PEFT: PeftModel.from_pretrained(base, dir)"
                ".save_pretrained(out, safe_serialization=True)")
        raise AdapterError(f"missing {path}")
    ensure_readable(path, "adapter weights")
    try:
        return load_file(str(path))
    except PermissionError as err:
        raise permission_denied(path, "adapter weights") from err
    except Exception as err:  # safetensors raises its own error types for bad headers/lengths
        raise AdapterError(f"{path} is not a readable safetensors file ({err}); "
                           "the file is corrupt or truncated: re-save the adapter") from err


def load_peft(directory: str | os.PathLike, *, name: str | None = None) -> LoraAdapter:
    """Reads a PEFT LoRA directory into a LoraAdapter (factors keep the stored dtype)."""
    directory = Path(directory)
    recover_directory(directory)  # an interrupted save_peft of this folder is repaired first
    if not directory.is_dir():
        raise AdapterError(f"adapter directory {directory} does not exist")
    config = _read_config(directory)
    tensors = _read_tensors(directory)
    wpath = directory / WEIGHTS_NAME
    pairs: dict[ModuleKey, dict[str, np.ndarray]] = {}
    for tkey, value in tensors.items():
        m = _KEY_RE.match(tkey)
        if m is None:
            raise AdapterError(f"{wpath}: tensor {tkey!r} is not a LoRA factor of a linear layer "
                               "(lora_A/lora_B.weight); embeddings, biases, DoRA magnitudes and "
                               "saved modules are not supported")
        try:
            mkey = parse_module_path(m["path"])
        except ValueError as err:
            raise AdapterError(f"{wpath}: tensor {tkey!r} targets a module sst-jax does not know; "
                               f"supported modules are {list(MODULE_NAMES)}") from err
        if not np.all(np.isfinite(value.astype(np.float32))):
            raise AdapterError(f"{wpath}: tensor {tkey!r} contains NaN or Inf; the adapter is broken "
                               "(diverged training?) and cannot be used")
        pairs.setdefault(mkey, {})[m["which"]] = value
    if not pairs:
        raise AdapterError(f"{wpath} holds no LoRA factors")

    meta = AdapterMeta(
        base_model=config.get("base_model_name_or_path"),
        targets=tuple(sorted({k[1] for k in pairs}, key=MODULE_NAMES.index)),
        r=int(config["r"]), alpha=float(config["lora_alpha"]),
        rank_pattern=freeze_pattern(config.get("rank_pattern") or {}),
        alpha_pattern=freeze_pattern(config.get("alpha_pattern") or {}),
        use_rslora=bool(config.get("use_rslora", False)),
        dtype=str(next(iter(tensors.values())).dtype),
        name=name or directory.name,
        layers=_layers(config.get("layers_to_transform")),
    )
    meta = with_fingerprint(meta, config.get(FINGERPRINT_KEY))
    factors = {}
    for mkey, pair in sorted(pairs.items()):
        path = hf_module_path(mkey)
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise AdapterError(f"{wpath}: {path} has no lora_{missing}.weight")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{wpath}: {path} has lora_A {a.shape} and lora_B {b.shape}; "
                               "expected (r, in) and (out, r)")
        if a.dtype.kind in "biuc" or b.dtype.kind in "biuc":
            raise AdapterError(f"{wpath}: {path} has lora_A of dtype {a.dtype} and lora_B of dtype "
                               f"{b.dtype}; LoRA factors must be floating point")
        expected = meta.rank_for(mkey)
        if a.shape[0] != expected:
            raise AdapterError(f"{wpath}: {path} has rank {a.shape[0]} but {CONFIG_NAME} says "
                               f"r={expected} (r / rank_pattern); config and weights disagree")
        factors[mkey] = LoraFactors(a=jnp.asarray(a), b=jnp.asarray(b))
    return LoraAdapter(factors=factors, meta=meta)


def _layers(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _target_spec(adapter: LoraAdapter) -> tuple[Any, Any]:
    """(target_modules, layers_to_transform) selecting exactly the adapter's modules in PEFT."""
    keys = set(adapter.factors)
    names = sorted({k[1] for k in keys}, key=MODULE_NAMES.index)
    layers = sorted({k[0] for k in keys})
    if keys == {(i, n) for i in layers for n in names}:
        if adapter.meta.layers is None:
            return names, None
        return names, layers
    # Not a layers × modules product (e.g. a union of adapters): name every module path.
    alternatives = "|".join(re.escape(hf_module_path(k)) for k in sorted(keys))
    return f"({alternatives})", None


def peft_config_dict(adapter: LoraAdapter) -> dict[str, Any]:
    """The adapter_config.json content for `adapter` (PEFT LoraConfig fields)."""
    meta = adapter.meta
    targets, layers = _target_spec(adapter)
    alpha = int(meta.alpha) if float(meta.alpha).is_integer() else meta.alpha
    return {
        "alpha_pattern": {k: (int(v) if float(v).is_integer() else v) for k, v in meta.alpha_pattern},
        "base_model_name_or_path": meta.base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": layers,
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": int(meta.r),
        "rank_pattern": {k: int(v) for k, v in meta.rank_pattern},
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": bool(meta.use_rslora),
    }


def write_dir_atomically(directory: Path, *writers: Callable[[Path], Any]) -> None:
    """Writes a whole folder with `atomic_directory`: every writer fills a new folder beside
    `directory`, which then replaces it in one swap.

    A failure (or a kill) in any writer leaves `directory` as it was; see
    `sst_jax.io_utils` for the swap and how an interrupted one is recovered. An existing
    folder that is not an earlier output of the same kind is refused (OutputError).
    """
    with atomic_directory(Path(directory)) as tmp:
        for i, write in enumerate(writers):
            write(tmp)
            pause_point(f"after-writer-{i}")


def save_peft(adapter: LoraAdapter, directory: str | os.PathLike, *, base_config=None,
              base_hub_id: str | None = None) -> Path:
    """Writes `adapter` as a PEFT directory; validated first, then written atomically.

    The folder is written completely beside `directory` and swapped in, so a failure or a
    kill leaves either the old folder or the new one, never a half-written adapter.
    `base_config` (the base model's DecoderConfig) records the base's architecture
    fingerprint under `sst_jax_base_fingerprint` (checked on use by `check_compatible`); an
    adapter loaded with a fingerprint keeps it when re-saved.
    """
    directory = Path(directory)
    if base_config is not None:
        check_compatible(adapter, base_config)
        fingerprint = base_fingerprint(base_config, hub_id=base_hub_id or adapter.meta.base_model)
    else:
        fingerprint = adapter_fingerprint(adapter)
    tensors: dict[str, np.ndarray] = {}
    for mkey, f in adapter.factors.items():
        path = hf_module_path(mkey)
        a, b = np.asarray(f.a), np.asarray(f.b)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"adapter {adapter.meta.name!r}: {path} has A {a.shape}, B {b.shape}")
        for which, t in (("A", a), ("B", b)):
            if not np.all(np.isfinite(t.astype(np.float32))):
                raise AdapterError(f"adapter {adapter.meta.name!r}: lora_{which} of {path} contains "
                                   f"NaN or Inf; refusing to write {directory}")
        if a.shape[0] != adapter.meta.rank_for(mkey):
            raise AdapterError(f"adapter {adapter.meta.name!r}: {path} has rank {a.shape[0]} but its "
                               f"metadata says {adapter.meta.rank_for(mkey)}; build it with from_low_rank")
        tensors[f"base_model.model.{path}.lora_A.weight"] = np.ascontiguousarray(a)
        tensors[f"base_model.model.{path}.lora_B.weight"] = np.ascontiguousarray(b)
    config = peft_config_dict(adapter)
    if fingerprint is not None:
        config[FINGERPRINT_KEY] = fingerprint

    write_dir_atomically(
        directory,
        lambda tmp: save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"}),
        lambda tmp: (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"),
    )
    logging.info("saved adapter %r (%d modules) to %s", adapter.meta.name, len(tensors) // 2, directory)
    return directory
