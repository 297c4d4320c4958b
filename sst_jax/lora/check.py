"""Compatibility of an adapter with a base model, by architecture fingerprint, not folder name.

A base model is identified by its fingerprint: family, layer count and the sizes that fix every
linear layer's shape (`base_fingerprint`), plus its hub id where known. Folder names are not an
identity: the same weights load from an HF-cache snapshot folder named by a commit hash, from
a renamed copy, or from a preset name.

What is checked (`check_compatible`):
  1. every factor's layer index is within the model's layers and its (out, in) shape is the
     model's: an adapter that does not fit cannot be applied (AdapterMismatchError, always);
  2. when the adapter's adapter_config.json carries our `sst_jax_base_fingerprint` (written by
     `save_peft(..., base_config=...)`), it must equal the model's fingerprint in every field
     (AdapterMismatchError naming both; `accept_base_mismatch=True` makes it a warning);
  3. the recorded base id (base_model_name_or_path) and the model's name are compared last,
     as a hint only: a different name with a matching fingerprint is an absl warning.

Families "llama" and "mistral" compare equal (one module tree; GGUF files of Mistral models
say "llama").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from absl import logging

from sst_jax.errors import AdapterMismatchError
from sst_jax.lora.adapter import AdapterMeta, LoraAdapter, module_shapes
from sst_jax.models.api import HUB_PRESETS
from sst_jax.models.branches import MODULE_NAMES, hf_module_path

FINGERPRINT_KEY = "sst_jax_base_fingerprint"  # our extra key in adapter_config.json
FINGERPRINT_FIELDS = ("family", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                      "vocab_size")
_FAMILY_ALIASES = {"mistral": "llama"}

# Preset names of sst_jax.models and the hub ids their weights come from.
_PRESET_IDS = {"smollm2-135m": "huggingfacetb/smollm2-135m-instruct"}


@dataclasses.dataclass(frozen=True)
class FingerprintedMeta(AdapterMeta):
    """AdapterMeta plus the base-model fingerprint recorded in the adapter's folder."""

    base_fingerprint: tuple[tuple[str, Any], ...] | None = None


def base_fingerprint(config, *, hub_id: str | None = None) -> dict[str, Any]:
    """The architecture fingerprint of a DecoderConfig (and its hub id, when given)."""
    fp: dict[str, Any] = {
        "family": str(config.architecture),
        "n_layers": int(config.n_layers),
        "d_model": int(config.d_model),
        "n_heads": int(config.n_heads),
        "n_kv_heads": int(config.n_kv_heads),
        "head_dim": int(config.head_dim),
        "d_ff": int(config.d_ff),
        "vocab_size": int(config.vocab_size),
    }
    if hub_id:
        fp["hub_id"] = str(hub_id)
    return fp


def adapter_fingerprint(adapter: LoraAdapter) -> dict[str, Any] | None:
    """The base fingerprint an adapter's folder recorded, or None (plain PEFT adapters)."""
    fp = getattr(adapter.meta, "base_fingerprint", None)
    return None if fp is None else dict(fp)


def with_fingerprint(meta: AdapterMeta, fingerprint: Mapping[str, Any] | None) -> AdapterMeta:
    """`meta` carrying `fingerprint` (a FingerprintedMeta), or plain when fingerprint is None."""
    fields = {f.name: getattr(meta, f.name) for f in dataclasses.fields(AdapterMeta)}
    if fingerprint is None:
        return AdapterMeta(**fields)
    return FingerprintedMeta(**fields, base_fingerprint=tuple(sorted(dict(fingerprint).items())))


def fingerprint_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """'field (a vs b)' for every architecture field both fingerprints have and that differs."""
    out = []
    for field in FINGERPRINT_FIELDS:
        if field not in a or field not in b:
            continue
        va, vb = a[field], b[field]
        same = (_FAMILY_ALIASES.get(va, va) == _FAMILY_ALIASES.get(vb, vb)) if field == "family" else va == vb
        if not same:
            out.append(f"{field} ({va!r} vs {vb!r})")
    return out


def describe_fingerprint(fp: Mapping[str, Any]) -> str:
    body = ", ".join(f"{k}={fp[k]}" for k in FINGERPRINT_FIELDS if k in fp)
    return body + (f", hub id {fp['hub_id']!r}" if fp.get("hub_id") else "")


def _canonical(name: str) -> str:
    name = name.rstrip("/").lower()
    presets = {**{k: v.lower() for k, v in HUB_PRESETS.items()}, **_PRESET_IDS}
    return presets.get(name, name)


def _same_model(a: str, b: str) -> bool:
    """Base ids agree when equal, aliases of one preset, or one is a path/hub id ending in the other."""
    a, b = _canonical(a), _canonical(b)
    return a == b or a.endswith("/" + b) or b.endswith("/" + a)


def check_compatible(adapter: LoraAdapter, config, *, base_model_name: str | None = None,
                     accept_base_mismatch: bool = False) -> None:
    """Raises AdapterMismatchError unless `adapter` fits the base model described by `config`.

    Checks shapes and layer range (always an error: such an adapter cannot be applied), then
    the adapter's recorded base fingerprint if it has one (an error unless
    `accept_base_mismatch`, then a warning). `base_model_name` (preset, hub id or folder) is
    compared with the adapter's recorded base id only to warn: names are not identities.
    """
    name = adapter.meta.name
    recorded = adapter.meta.base_model
    hint = f" (adapter_config.json says base_model_name_or_path={recorded!r})" if recorded else ""
    model = f"the base model {base_model_name!r}" if base_model_name else "the base model"
    shapes = module_shapes(config)
    for (layer, module), f in adapter.factors.items():
        if module not in MODULE_NAMES:
            raise AdapterMismatchError(f"adapter {name!r} targets unknown module {module!r}")
        path = hf_module_path((layer, module)).removeprefix("model.")
        if not 0 <= layer < int(config.n_layers):
            raise AdapterMismatchError(
                f"adapter {name!r} targets {path} but {model} has {config.n_layers} layers. "
                f"Was the adapter trained on another base model?{hint}")
        out_dim, in_dim = shapes[module]
        a_shape, b_shape = tuple(f.a.shape), tuple(f.b.shape)
        if a_shape[1:] != (in_dim,):
            raise AdapterMismatchError(
                f"adapter {name!r} targets {path} with A of shape {a_shape} but {model} has "
                f"{module} input size {in_dim}. Was the adapter trained on another base model?{hint}")
        if b_shape[:1] != (out_dim,) or b_shape[1:] != a_shape[:1]:
            raise AdapterMismatchError(
                f"adapter {name!r} targets {path} with B of shape {b_shape} (A {a_shape}) but "
                f"{model} has {module} output size {out_dim}. Was the adapter trained on another "
                f"base model?{hint}")

    ours = base_fingerprint(config)
    theirs = adapter_fingerprint(adapter)
    if theirs is not None:
        diff = fingerprint_differences(theirs, ours)
        if diff:
            msg = (f"adapter {name!r} was trained on a base model with {describe_fingerprint(theirs)}, but "
                   f"{model} has {describe_fingerprint(ours)}: {', '.join(diff)} differ{hint}. Load the base "
                   "model the adapter was trained on, or pass accept_base_mismatch=True if you know it fits")
            if not accept_base_mismatch:
                raise AdapterMismatchError(msg)
            logging.warning("%s (accepted: accept_base_mismatch=True)", msg)
            return

    ids = [i for i in (recorded, (theirs or {}).get("hub_id")) if i]
    if base_model_name and ids and not any(_same_model(base_model_name, i) for i in ids):
        logging.warning(
            "adapter %r was trained on %r but is applied to %r; the architecture fingerprint matches "
            "(%s), so the names are taken as two names of one model (an HF-cache snapshot or a renamed "
            "folder). If the weights are another model's, the adapter will not do what it was trained for",
            name, ids[0], base_model_name, describe_fingerprint(ours))
