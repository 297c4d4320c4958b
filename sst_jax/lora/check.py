"""Compatibility of an adapter with a base model: module names, layer range, shapes, base id."""

from __future__ import annotations

from sst_jax.errors import AdapterMismatchError
from sst_jax.lora.adapter import LoraAdapter, module_shapes
from sst_jax.models.branches import MODULE_NAMES, hf_module_path


# Preset names of sst_jax.models and the hub ids their weights come from.
_PRESET_IDS = {"smollm2-135m": "huggingfacetb/smollm2-135m-instruct"}


def _canonical(name: str) -> str:
    from sst_jax.models.api import HUB_PRESETS

    name = name.rstrip("/").lower()
    presets = {**{k: v.lower() for k, v in HUB_PRESETS.items()}, **_PRESET_IDS}
    return presets.get(name, name)


def _same_model(a: str, b: str) -> bool:
    """Base ids agree when equal, aliases of one preset, or one is a path/hub id ending in the other."""
    a, b = _canonical(a), _canonical(b)
    return a == b or a.endswith("/" + b) or b.endswith("/" + a)


def check_compatible(adapter: LoraAdapter, config, *, base_model_name: str | None = None) -> None:
    """Raises AdapterMismatchError unless every factor fits `config`'s linear layers.

    `base_model_name` is compared with the adapter's recorded base model id when both are known.
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
    if base_model_name and recorded and not _same_model(base_model_name, recorded):
        raise AdapterMismatchError(
            f"adapter {name!r} was trained on {recorded!r} but is being applied to "
            f"{base_model_name!r}; shapes agree, but the weights are another model's. Pass the "
            "matching base model, or set the adapter's base_model if the two are the same model")
