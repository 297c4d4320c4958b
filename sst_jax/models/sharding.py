"""Device mesh (data / fsdp / tensor) and partition specs for the decoder's params and batches.

Weights are in HF (out, in) layout. Column-parallel projections (q, k, v, gate, up) split their
output over `tensor` and their input over `fsdp`; row-parallel ones (o, down) the reverse, so
an attention or MLP block needs one reduction over `tensor`. Batches split over data × fsdp.
XLA's SPMD partitioner inserts the collectives; the math is the single-device forward.

`place_model` records the mesh on the model; generation, log-likelihood scoring, LoRA training
and the Fisher passes read it there and split their batches with `put_batch` (rows padded to
a multiple of data × fsdp, the padding dropped after). With several processes (see
`sst_jax.models.distributed`) the mesh spans every host's devices and each host transfers only
its own rows; `to_host` gathers a sharded result back.
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
    """Sharding of (batch, seq, ...) activations / token ids: batch over data × fsdp (the
    batch axes this mesh has)."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


# ----------------------------------------------------------------------------- batches on a mesh
# Every batched computation (generation, log-likelihoods, LoRA training, Fisher passes) takes
# its mesh from the model (`LoadedModel.mesh`, set by `place_model`); a model without one runs
# on the 1×1×1 mesh of its default device, through the same code.


def model_mesh(model) -> Mesh:
    """The mesh `model` was placed on, or the 1×1×1 mesh of the default device."""
    mesh = getattr(model, "mesh", None)
    return mesh if mesh is not None else make_mesh(data=1, fsdp=1, tensor=1, devices=jax.local_devices()[:1])


def batch_multiple(mesh: Mesh | None) -> int:
    """Rows a batch is padded to a multiple of, to split over the mesh's batch axes."""
    if mesh is None:
        return 1
    return math.prod(int(mesh.shape[a]) for a in BATCH_AXES if a in mesh.axis_names)


def padded_rows(n: int, mesh: Mesh | None) -> int:
    """n rounded up to a multiple of `batch_multiple(mesh)`."""
    m = batch_multiple(mesh)
    return -(-int(n) // m) * m


def pad_batch(batch: Mapping[str, Any], mesh: Mesh | None) -> tuple[dict[str, np.ndarray], int]:
    """(batch with its rows padded to `padded_rows`, repeating the last row; the real count)."""
    n = len(next(iter(batch.values())))
    size = padded_rows(n, mesh)
    return {k: np.concatenate([np.asarray(v), np.repeat(np.asarray(v)[-1:], size - n, 0)])
            for k, v in batch.items()}, n


def put_global(x, sharding: NamedSharding) -> jax.Array:
    """A host array as one global array with `sharding`: every process passes the same full
    value and transfers only the shards of its own devices (its share of the data)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put_batch(mesh: Mesh, batch):
    """A batch (array or dict of arrays, leading axis = rows, a multiple of
    `batch_multiple(mesh)`) split over the mesh's batch axes (`batch_sharding`)."""
    return jax.tree.map(lambda x: put_global(x, batch_sharding(mesh, np.ndim(x))), batch)


def to_host(x) -> np.ndarray:
    """A (possibly global, sharded) array as one numpy array on this host (all-gathered from
    the other processes when some of its shards live there)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def placed_like(x, ref):
    """`x` on the devices of `ref` (an array on a mesh), for an eager op between them: an array
    committed elsewhere (e.g. a host result on the default device) is moved there; anything
    else is left to JAX, which places uncommitted arrays itself."""
    if not (isinstance(x, jax.Array) and isinstance(ref, jax.Array) and x.committed):
        return x
    if x.sharding.device_set == ref.sharding.device_set:
        return x
    if ref.is_fully_addressable:
        return jax.device_put(x, ref.sharding)
    return put_global(to_host(x), ref.sharding)  # a mesh over several processes


def shard_map(fn, *, mesh: Mesh, in_specs, out_specs, axis: str):
    """`fn` manual over mesh axis `axis` only (the others stay automatic: weights placed over
    fsdp/tensor stay there). jax.shard_map where it exists, else jax.experimental.shard_map."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names={axis},
                             check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy  # jax < 0.6

    return legacy(fn, mesh, in_specs, out_specs, check_rep=False, auto=frozenset(mesh.axis_names) - {axis})


def parse_mesh(spec: str | None, n_devices: int | None = None) -> dict[str, int]:
    """{"data": D, "fsdp": F, "tensor": T} from "data=D,fsdp=F,tensor=T" (missing axes are 1;
    None or "" puts every device, of every process, on `data`). One code path: one device is 1×1×1."""
    n = jax.device_count() if n_devices is None else n_devices
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
    """The model with its weights placed on a (data, fsdp, tensor) mesh by `param_specs`, and
    that mesh as `model.mesh`: every batched computation on the model splits its batches over
    it (a 1×1×1 mesh is one device, through the same code)."""
    mesh = make_mesh(data=mesh_shape["data"], fsdp=mesh_shape["fsdp"], tensor=mesh_shape["tensor"])
    return dataclasses.replace(model, params=shard_params(model.params, mesh), mesh=mesh)
