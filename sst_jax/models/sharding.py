"""Device mesh (data / fsdp / tensor) and partition specs for the decoder's params and batches.

Weights are in HF (out, in) layout. Column-parallel projections (q, k, v, gate, up) split their
output over `tensor` and their input over `fsdp`; row-parallel ones (o, down) the reverse, so
an attention or MLP block needs one reduction over `tensor`. Batches split over data × fsdp.
XLA's SPMD partitioner inserts the collectives; the math is the single-device forward.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sst_jax.models.llama import Params

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW = ("o_proj", "down_proj")


def make_mesh(*, data: int = 1, fsdp: int | None = None, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; fsdp defaults to whatever devices data × tensor leave."""
    devices = list(jax.devices() if devices is None else devices)
    if fsdp is None:
        if len(devices) % (data * tensor):
            raise ValueError(f"{len(devices)} devices do not split into data={data} × tensor={tensor}")
        fsdp = len(devices) // (data * tensor)
    n = data * fsdp * tensor
    if n > len(devices):
        raise ValueError(f"mesh data={data} × fsdp={fsdp} × tensor={tensor} needs {n} devices, "
                         f"have {len(devices)}")
    return Mesh(np.asarray(devices[:n]).reshape(data, fsdp, tensor), AXES)


def _spec_for(path: tuple, ndim: int) -> P:
    names = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    if "embed_tokens" in names or "lm_head" in names:
        return P("tensor", "fsdp")
    module = next((n for n in names if isinstance(n, str) and n.endswith("_proj")), None)
    if module is None:  # norms
        return P()
    leaf = names[-1]
    if leaf == "bias":
        return P("tensor") if module in _COLUMN else P()
    return P("tensor", "fsdp") if module in _COLUMN else P("fsdp", "tensor")


def param_specs(params: Params, mesh_shape: Mapping[str, int] | None = None, *,
                strict: bool = False) -> Any:
    """PartitionSpecs matching `params` (arrays or ShapeDtypeStructs).

    With `mesh_shape` ({axis: size}, e.g. `mesh.shape`), an axis that does not divide its
    dimension is dropped (that dimension is replicated), or with strict=True raises ValueError
    naming the parameter.
    """

    def one(path, leaf):
        spec = _spec_for(path, len(leaf.shape))
        if mesh_shape is None:
            return spec
        fixed = []
        for dim, axis in zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec))):
            size = 1 if axis is None else math.prod(mesh_shape[a] for a in ((axis,) if isinstance(axis, str) else axis))
            if dim % size:
                if strict:
                    raise ValueError(f"param {jax.tree_util.keystr(path)} dim {dim} is not divisible "
                                     f"by mesh axis {axis!r} of size {size}")
                axis = None
            fixed.append(axis)
        return P(*fixed)

    return jax.tree_util.tree_map_with_path(one, params)


def shard_params(params: Params, mesh: Mesh, *, strict: bool = False) -> Params:
    """Place params on `mesh` with `param_specs` (non-divisible dims replicated)."""
    specs = param_specs(params, mesh.shape, strict=strict)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of (batch, seq, ...) activations / token ids: batch over data × fsdp."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def parse_mesh(spec: str | None, n_devices: int | None = None) -> dict[str, int]:
    """{"data": D, "fsdp": F, "tensor": T} from "data=D,fsdp=F,tensor=T" (missing axes are 1;
    None or "" puts every local device on `data`). One code path: one device is 1×1×1."""
    n = jax.local_device_count() if n_devices is None else n_devices
    if not spec:
        return {"data": n, "fsdp": 1, "tensor": 1}
    out = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in spec.split(","):
        axis, sep, size = part.partition("=")
        axis = axis.strip()
        if not sep or axis not in out or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"--mesh {spec!r}: expected data=D,fsdp=F,tensor=T with positive sizes "
                             f"(e.g. data=2,fsdp=2,tensor=2); got {part!r}")
        out[axis] = int(size)
    if math.prod(out.values()) > n:
        raise ValueError(f"--mesh {spec!r} needs {math.prod(out.values())} devices; this host has {n} "
                         f"({jax.default_backend()}): use fewer, or XLA_FLAGS=--xla_force_host_platform_device_count=N on CPU")
    return out


def place_model(model, mesh_shape: Mapping[str, int]):
    """The model with its weights placed on a (data, fsdp, tensor) mesh by `param_specs`
    (a 1×1×1 mesh returns it unchanged)."""
    if math.prod(mesh_shape.values()) == 1:
        return model
    mesh = make_mesh(data=mesh_shape["data"], fsdp=mesh_shape["fsdp"], tensor=mesh_shape["tensor"])
    return dataclasses.replace(model, params=shard_params(model.params, mesh))
