"""Per-sample gradients and Fisher accumulators over any trainable pytree.

A per-sample loss is `loss_fn(trainable, fixed, example) -> scalar`, where `example` is one
sample (the batch pytree without its leading axis) and `fixed` holds everything that is not
differentiated (frozen weights, other branches). Passing `fixed` as an argument, rather than
closing over it, keeps large weights out of the compiled program as constants.

Per-sample gradients are `jax.vmap(jax.grad(loss_fn))` over chunks of `chunk` samples; the
accumulators (uncentred second moments) are updated inside a `lax.scan` over the chunks, so
memory is bounded by one chunk of gradients whatever the number of samples. Statistics:

  mean   Σ g / N                        (same structure as `trainable`)
  diag   Σ g² / N                       (same structure as `trainable`)
  dense  Σ g gᵀ / N per module          {key: (d, d)}; modules of equal size d in one einsum
  gram   G / √N per module              {key: (N, d)}: the low-rank factor, F = UᵀU, for when
                                        samples ≪ d (keeps every gradient, by design)

A "module" is a top-level key of `trainable` (which must then be a Mapping, e.g. {ModuleKey:
M}); its coordinates are its leaves in `jax.tree.leaves` order, each raveled row-major, which
is exactly `jax.flatten_util.ravel_pytree(trainable[key])` (see `module_vector`).

Data parallel: with `mesh`, every block of samples is split over the mesh axis `axis` (each
process transfers only its devices' samples), each device group scans its own chunks, and the
sums are reduced with `psum`, so the result equals the single-device one. Only `axis` is
manual: weights placed over the other mesh axes (fsdp, tensor) stay sharded inside the pass.
The statistics come back as arrays of this process's default device.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from sst_jax.models.sharding import put_global, shard_map, to_host

PyTree = Any
LossFn = Callable[[PyTree, PyTree, PyTree], jax.Array]
STATS = ("mean", "diag", "dense", "gram")
_HI = jax.lax.Precision.HIGHEST


CPU_CHUNK = 4
ACCELERATOR_CHUNK = 16


def default_chunk(backend: str | None = None) -> int:
    """Samples per vmapped gradient step (`chunk`) of every per-sample Fisher pass when none is
    given: 4 on CPU, where a wider vmap gains little on a few cores and costs activation memory,
    and 16 on GPU/TPU, where it keeps the matrix units busy. backend: a platform name ("cpu",
    "gpu", "cuda", "rocm", "tpu", ...) or None for `jax.default_backend()`. An explicit chunk (a
    config's "fisher": {"chunk": N}, `--set chunk=N`, `chunk=` in the library) always wins."""
    platform = (backend or jax.default_backend()).lower()
    return CPU_CHUNK if platform == "cpu" else ACCELERATOR_CHUNK


def resolve_chunk(chunk: int | None, mesh: Mesh | None = None) -> int:
    """`chunk`, or the default of the platform the pass runs on (the mesh's, else the default backend)."""
    if chunk is not None:
        return int(chunk)
    return default_chunk(None if mesh is None else mesh.devices.flat[0].platform)


def module_vector(tree: PyTree) -> jax.Array:
    """A module's coordinates as one vector: its leaves raveled row-major, in tree order."""
    return ravel_pytree(tree)[0]


def per_sample_grads(loss_fn: LossFn, trainable: PyTree, batch: PyTree, *, fixed: PyTree = None,
                     chunk: int | None = None, remat: bool = False) -> PyTree:
    """∂Lᵢ/∂trainable for every sample i (leading axis N); memory bounded by `chunk` samples
    (default: `default_chunk()`)."""
    return _per_sample_grads(loss_fn, trainable, fixed, batch, chunk=resolve_chunk(chunk), remat=remat)


@functools.partial(jax.jit, static_argnames=("loss_fn", "chunk", "remat"))
def _per_sample_grads(loss_fn, trainable, fixed, batch, *, chunk, remat):
    grad = jax.grad(jax.checkpoint(loss_fn) if remat else loss_fn)
    return jax.lax.map(lambda ex: grad(trainable, fixed, ex), batch, batch_size=chunk)


@dataclasses.dataclass(frozen=True)
class FisherStats:
    """Means over `n_samples` samples; a statistic not requested is None."""

    n_samples: int
    mean: PyTree = None
    diag: PyTree = None
    dense: dict | None = None
    gram: dict | None = None
    seconds: float = 0.0

    @property
    def samples_per_second(self) -> float:
        return self.n_samples / self.seconds if self.seconds > 0 else float("nan")


def _module_groups(trainable: PyTree) -> dict[int, tuple]:
    """{d: (keys...)}: modules grouped by coordinate count, keys in a canonical order."""
    if not isinstance(trainable, Mapping):
        raise TypeError("dense/gram statistics need a Mapping trainable {module key: pytree}; "
                        f"got {type(trainable).__name__}")
    groups: dict[int, list] = {}
    for key in sorted(trainable, key=repr):
        d = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(trainable[key]))
        groups.setdefault(d, []).append(key)
    return {d: tuple(keys) for d, keys in groups.items()}


def _flat(g: PyTree, keys: Sequence) -> jax.Array:
    """(samples, n_modules, d): per-sample gradients of `keys`, one row-major vector each."""
    rows = [jnp.concatenate([x.reshape(x.shape[0], -1) for x in jax.tree.leaves(g[k])], axis=1)
            for k in keys]
    return jnp.stack(rows, axis=1)


def _block_sums(loss_fn, stats, chunk, remat, groups, trainable, fixed, block, mask):
    """Sums of the statistics over one block of samples (leading axis a multiple of chunk)."""
    grad = jax.vmap(jax.grad(jax.checkpoint(loss_fn) if remat else loss_fn), in_axes=(None, None, 0))
    n = mask.shape[0]
    xs = jax.tree.map(lambda x: x.reshape((n // chunk, chunk) + x.shape[1:]), (block, mask))

    zeros = lambda t: jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), t)  # noqa: E731
    acc0 = {}
    if "mean" in stats:
        acc0["mean"] = zeros(trainable)
    if "diag" in stats:
        acc0["diag"] = zeros(trainable)
    if "dense" in stats:
        acc0["dense"] = {d: jnp.zeros((len(k), d, d), jnp.float32) for d, k in groups.items()}

    def body(acc, inp):
        ex, m = inp
        g = jax.tree.map(lambda x: x.astype(jnp.float32), grad(trainable, fixed, ex))
        mb = lambda x: m.reshape((-1,) + (1,) * (x.ndim - 1))  # noqa: E731
        new = dict(acc)
        if "mean" in stats:
            new["mean"] = jax.tree.map(lambda a, x: a + jnp.sum(x * mb(x), 0), acc["mean"], g)
        if "diag" in stats:
            new["diag"] = jax.tree.map(lambda a, x: a + jnp.sum(x * x * mb(x), 0), acc["diag"], g)
        out = {}
        if "dense" in stats or "gram" in stats:
            flats = {d: _flat(g, keys) * m[:, None, None] for d, keys in groups.items()}
            if "dense" in stats:
                new["dense"] = {d: acc["dense"][d] + jnp.einsum("smd,sme->mde", f, f, precision=_HI)
                                for d, f in flats.items()}
            if "gram" in stats:
                out = flats
        return new, out

    acc, grams = jax.lax.scan(body, acc0, xs)
    grams = {d: f.reshape((n,) + f.shape[2:]) for d, f in grams.items()}
    return acc, grams


@functools.lru_cache(maxsize=64)
def _compiled_step(loss_fn, stats, chunk, remat, groups_items, mesh, axis):
    groups = dict(groups_items)
    step = functools.partial(_block_sums, loss_fn, stats, chunk, remat, groups)
    if mesh is None:
        return jax.jit(step)

    def sharded(trainable, fixed, block, mask):
        acc, grams = step(trainable, fixed, block, mask)
        return jax.lax.psum(acc, axis), grams

    rep, shard = PartitionSpec(), PartitionSpec(axis)
    return jax.jit(shard_map(sharded, mesh=mesh, in_specs=(rep, rep, shard, shard), out_specs=(rep, shard),
                             axis=axis))


def place_block(block: PyTree, mask: np.ndarray, mesh: Mesh | None, axis: str) -> tuple[PyTree, Any]:
    """(block, mask) split over `axis` of the mesh (unchanged without one)."""
    if mesh is None:
        return block, mask
    sharding = lambda x: NamedSharding(mesh, PartitionSpec(axis, *([None] * (np.ndim(x) - 1))))  # noqa: E731
    return jax.tree.map(lambda x: put_global(x, sharding(x)), (block, mask))


def local_result(tree: PyTree) -> PyTree:
    """Arrays gathered from the mesh onto this process's default device."""
    return jax.tree.map(lambda x: jnp.asarray(to_host(x)), tree)


def pad_block(block: PyTree, multiple: int) -> tuple[PyTree, np.ndarray, int]:
    n = int(jax.tree.leaves(block)[0].shape[0])
    size = -(-n // multiple) * multiple
    pad = lambda x: np.concatenate([np.asarray(x), np.repeat(np.asarray(x)[-1:], size - n, 0)])  # noqa: E731
    mask = np.zeros(size, np.float32)
    mask[:n] = 1.0
    return (block if size == n else jax.tree.map(pad, block)), mask, n


def accumulate(loss_fn: LossFn, trainable: PyTree, batches: Iterable[PyTree], *,
               fixed: PyTree = None, stats: Sequence[str] = ("diag", "dense"), chunk: int | None = None,
               remat: bool = False, mesh: Mesh | None = None, axis: str = "data",
               total: int | None = None, desc: str = "fisher", progress: bool = True) -> FisherStats:
    """Fisher statistics (means over samples) of per-sample gradients of `loss_fn`.

    Args:
      loss_fn: per-sample loss, `loss_fn(trainable, fixed, example) -> scalar`; must be a
        stable function object (it is a compile-cache key).
      trainable: the differentiated pytree (a Mapping of modules for dense/gram).
      batches: iterable of batch pytrees (leading axis = samples); each is one jitted step,
        padded to a multiple of chunk (× mesh size) with masked samples.
      stats: any of "mean", "diag", "dense", "gram".
      chunk: samples per vmapped gradient (per device with a mesh); default `default_chunk()` of
        the mesh's platform (4 on CPU, 16 on GPU/TPU).
      remat: rematerialize the forward pass in the backward pass (less memory, more compute).
      mesh, axis: shard every block's samples over this mesh axis and psum the sums.
      total: number of samples, for the progress bar.
    """
    unknown = set(stats) - set(STATS)
    if unknown or not stats:
        raise ValueError(f"unknown statistics {sorted(unknown)}; expected some of {STATS}")
    stats = tuple(s for s in STATS if s in stats)
    groups = _module_groups(trainable) if {"dense", "gram"} & set(stats) else {}
    n_dev = 1 if mesh is None else int(mesh.shape[axis])
    chunk = resolve_chunk(chunk, mesh)
    step = _compiled_step(loss_fn, stats, chunk, remat, tuple(groups.items()), mesh, axis)

    acc, grams, n_total = None, [], 0
    start = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress, dynamic_ncols=True)
    for block in batches:
        block, mask, n = pad_block(block, chunk * n_dev)
        sums, g = step(trainable, fixed, *place_block(block, mask, mesh, axis))
        acc = sums if acc is None else jax.tree.map(jnp.add, acc, sums)
        if "gram" in stats:
            grams.append({d: to_host(f)[mask > 0] for d, f in g.items()})
        jax.block_until_ready(acc)
        n_total += n
        bar.update(n)
    bar.close()
    seconds = time.perf_counter() - start
    if n_total == 0:
        raise ValueError(f"{desc}: no samples in batches")
    logging.info("%s: %d samples in %.1f s (%.2f samples/s)", desc, n_total, seconds, n_total / seconds)

    acc = local_result(acc)
    scale = 1.0 / n_total
    mean = lambda t: jax.tree.map(lambda x: x * scale, t)  # noqa: E731
    out: dict[str, Any] = {}
    if "mean" in stats:
        out["mean"] = mean(acc["mean"])
    if "diag" in stats:
        out["diag"] = mean(acc["diag"])
    if "dense" in stats:
        out["dense"] = {k: acc["dense"][d][i] * scale for d, keys in groups.items() for i, k in enumerate(keys)}
    if "gram" in stats:
        out["gram"] = {k: jnp.asarray(np.concatenate([g[d][:, i] for g in grams]) * np.sqrt(scale))
                       for d, keys in groups.items() for i, k in enumerate(keys)}
    return FisherStats(n_samples=n_total, seconds=seconds, **out)
