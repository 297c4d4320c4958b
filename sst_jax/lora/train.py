"""LoRA training with optax: AdamW, warmup + cosine, gradient accumulation, response-only loss,
optional bf16 compute, LoRA dropout, eval loss with early stopping, orbax checkpoints.

Batches split over the batch axes of the model's mesh (`LoadedModel.mesh`; data × fsdp),
padded to a multiple of their size with rows of weight 0; XLA reduces the gradients through
the shardings (the factors and optimizer state stay replicated), so the step is the
single-device one. With lora_dropout > 0 and padding rows the masks differ from an unpadded
run's (they are drawn for the padded shape), still a function of (seed, step).

Only the LoRA factors are optimised; the frozen params are a non-differentiated argument of
the jitted step. Everything random is a function of (seed, step): the batch order of each
epoch and the dropout key of each micro-batch. So a run resumed from a checkpoint ends
bit-identical to one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from tqdm.auto import tqdm

from sst_jax.data.chat import collate, encode_chat
from sst_jax.errors import DatasetError, NumericalError, SstJaxError
from sst_jax.io_utils import stable_hash
from sst_jax.lora.adapter import LoraAdapter
from sst_jax.lora.check import check_compatible
from sst_jax.models import forward
from sst_jax.models.loss import response_nll
from sst_jax.models.sharding import model_mesh, pad_batch, put_batch, to_host


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of one LoRA training run. `steps` counts optimizer updates; each update
    averages the gradients of `grad_accum` micro-batches of `batch_size` sequences."""

    steps: int = 200
    lr: float = 2e-4
    warmup_steps: int = 10
    cosine: bool = True  # cosine decay to min_lr_ratio·lr after warmup; else constant
    min_lr_ratio: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    bf16: bool = False  # compute in bfloat16 (frozen weights and activations); factors stay f32
    lora_dropout: float = 0.0
    eval_every: int = 50
    patience: int | None = None  # evaluations without improvement before stopping early
    checkpoint_every: int = 50
    seed: int = 0
    max_length: int = 256
    system: str | None = None  # optional system prompt of the chat template

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"TrainConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to lr, then cosine decay to min_lr_ratio·lr (or constant)."""
    warmup = min(cfg.warmup_steps, cfg.steps)
    if not cfg.cosine:
        if warmup == 0:
            return optax.constant_schedule(cfg.lr)
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup),
                                     optax.constant_schedule(cfg.lr)], [warmup])
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1),
                                              end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    chain = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
    chain.append(optax.adamw(lr_schedule(cfg), weight_decay=cfg.weight_decay))
    opt = optax.chain(*chain)
    return optax.MultiSteps(opt, every_k_schedule=cfg.grad_accum) if cfg.grad_accum > 1 else opt


def _is_encoded(pair) -> bool:
    return (len(pair) == 2 and all(isinstance(x, (list, tuple)) for x in pair)
            and all(isinstance(t, (int, np.integer)) for x in pair for t in x))


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], cfg: TrainConfig, what: str) -> list[tuple[list[int], list[int]]]:
    """Chat-formatted (ids, loss_mask) of (prompt, response) pairs, response tokens masked in.

    An item may also be an already encoded (ids, loss_mask) pair of int lists (e.g. from
    `sst_jax.data.chat.encode_plain` for lm-eval-style multiple-choice items); it is used as
    is, cut to the last `max_length` tokens.
    """
    out = []
    for i, pair in enumerate(pairs):
        if _is_encoded(pair):
            ids, mask = [int(t) for t in pair[0]], [int(t) for t in pair[1]]
            if len(ids) != len(mask) or not ids:
                raise DatasetError(f"{what} item {i}: encoded ids and loss mask differ in length or are empty")
            ids, mask = ids[-cfg.max_length:], mask[-cfg.max_length:]
            if sum(mask) == 0:
                raise DatasetError(f"{what} item {i}: no response tokens fit max_length={cfg.max_length}")
            out.append((ids, mask))
            continue
        if len(pair) != 2 or not all(isinstance(s, str) for s in pair):
            raise DatasetError(f"{what} item {i} must be a (prompt, response) pair of strings, got {pair!r}")
        ids, mask = encode_chat(tokenizer, pair[0], pair[1], system=cfg.system, max_length=cfg.max_length)
        if sum(mask) == 0:
            raise DatasetError(f"{what} item {i}: no response tokens fit max_length={cfg.max_length}")
        out.append((ids, mask))
    return out


def micro_batch_indices(n: int, batch_size: int, seed: int, micro_step: int) -> np.ndarray:
    """Sample indices of micro-batch `micro_step`: a stream of seeded per-epoch permutations."""
    start = micro_step * batch_size
    idx = []
    while len(idx) < batch_size:
        epoch, offset = divmod(start + len(idx), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        idx.extend(perm[offset: offset + batch_size - len(idx)].tolist())
    return np.asarray(idx)


def _batch(encoded, idx, pad_id) -> dict[str, np.ndarray]:
    return collate([encoded[i][0] for i in idx], pad_id, loss_masks=[encoded[i][1] for i in idx])


def _on_mesh(mesh, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The batch split over the mesh's batch axes: rows padded (repeating the last) to a
    multiple of their size, "weight" 1 for real rows and 0 for the padding."""
    out, n = pad_batch(batch, mesh)
    out["weight"] = (np.arange(len(out["input_ids"])) < n).astype(np.float32)
    return put_batch(mesh, out)


def _flatten_state(state) -> dict[str, np.ndarray]:
    return {f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(state))}


def _unflatten_state(template, flat: dict[str, Any]):
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if len(flat) != len(leaves):
        raise SstJaxError(f"checkpoint holds {len(flat)} arrays, this run needs {len(leaves)}")
    restored = [jnp.asarray(flat[f"leaf_{i:05d}"], dtype=jnp.asarray(t).dtype) for i, t in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, restored)


class _Checkpoints:
    """orbax CheckpointManager over (adapter, opt state, best adapter) + JSON progress."""

    def __init__(self, directory: str | os.PathLike, run_key: str):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.run_key = run_key
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False))

    def save(self, step: int, state, progress: dict) -> None:
        ocp = self.ocp
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_flatten_state(state)),
            progress=ocp.args.JsonSave({**progress, "run_key": self.run_key})))
        self.manager.wait_until_finished()

    def restore(self, template):
        step = self.manager.latest_step()
        if step is None:
            return None
        ocp = self.ocp
        got = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_flatten_state(template)), progress=ocp.args.JsonRestore()))
        progress = dict(got["progress"])
        if progress.pop("run_key", None) != self.run_key:
            raise SstJaxError(f"checkpoint {self.manager.directory} (step {step}) belongs to a run with "
                              "other settings, data or adapter; use a new checkpoint_dir or the same settings")
        return _unflatten_state(template, got["state"]), progress

    def close(self):
        self.manager.close()


def _loss(trainable: LoraAdapter, frozen, batch, key, config, dropout_rate: float,
          regularizer) -> jax.Array:
    logits = forward(config, frozen, batch["input_ids"], batch["attention_mask"],
                     branches=trainable.to_branches(), dropout_rate=dropout_rate,
                     dropout_key=key if dropout_rate > 0 else None)
    w = batch["weight"]  # 0 on rows that only pad the batch to the mesh
    loss = jnp.sum(response_nll(logits, batch["input_ids"], batch["loss_mask"]) * w) / jnp.sum(w)
    return loss if regularizer is None else loss + regularizer(trainable)


# Module-level jits keyed by the (hashable) configs: repeated runs with equal settings reuse
# the compiled steps; distinct sequence-length buckets are the only other recompiles.
@functools.partial(jax.jit, static_argnames=("config", "cfg", "regularizer", "replicated"))
def _train_step(trainable, opt_state, frozen, batch, key, *, config, cfg: TrainConfig, regularizer,
                replicated):
    loss, grads = jax.value_and_grad(_loss)(trainable, frozen, batch, key, config, cfg.lora_dropout,
                                            regularizer)
    updates, opt_state = make_optimizer(cfg).update(grads, opt_state, trainable)
    # Factors and optimizer state stay whole on every device (every host can save them).
    return jax.lax.with_sharding_constraint((optax.apply_updates(trainable, updates), opt_state),
                                            replicated) + (loss,)


@functools.partial(jax.jit, static_argnames=("config",))
def _eval_losses(trainable, frozen, batch, *, config):
    logits = forward(config, frozen, batch["input_ids"], batch["attention_mask"], branches=trainable.to_branches())
    return response_nll(logits, batch["input_ids"], batch["loss_mask"])


def train_lora(model, adapter: LoraAdapter, train_pairs: Sequence[tuple[str, str]],
               eval_pairs: Sequence[tuple[str, str]] | None, cfg: TrainConfig, *,
               checkpoint_dir: str | os.PathLike | None = None, progress: bool = True,
               callback: Callable[[int, dict], None] | None = None,
               regularizer: Callable[[LoraAdapter], jax.Array] | None = None) -> tuple[LoraAdapter, dict]:
    """Trains the factors of `adapter` on (prompt, response) pairs; returns (adapter, history).

    With eval pairs, the returned adapter is the one with the lowest eval loss (evaluated every
    `eval_every` steps and at the end). With `checkpoint_dir`, the run saves every
    `checkpoint_every` steps and resumes from the latest checkpoint there. `callback(step,
    record)` is called after every optimizer step. `regularizer(adapter)` (jittable, e.g. an
    AlignGuard-style Fisher penalty) is added to the training objective; the logged train loss
    includes it, the eval loss does not.
    """
    config, params, tok = model.config, model.params, model.tokenizer
    mesh = model_mesh(model)
    check_compatible(adapter, config, base_model_name=getattr(model, "name", None))
    if not train_pairs:
        raise DatasetError("train_lora needs at least one training pair")
    train = encode_pairs(tok, train_pairs, cfg, "train")
    evals = encode_pairs(tok, eval_pairs, cfg, "eval") if eval_pairs else []
    pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else config.pad_token_id)

    compute_cfg = config.replace(dtype="bfloat16") if cfg.bf16 else config
    frozen = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params) if cfg.bf16 else params
    out_dtype = adapter.meta.dtype
    meta = dataclasses.replace(adapter.meta, dtype="float32")
    # Master weights in f32 whatever the compute dtype. The adapter's name is static pytree data
    # that the step never reads: trained under a blank name, every adapter of the same shape
    # reuses one compiled step (N experts compile once, not N times); it is restored at the end.
    adapter = LoraAdapter(factors=adapter.astype("float32").factors,
                          meta=dataclasses.replace(meta, name=""))
    optimizer = make_optimizer(cfg)
    train_step = functools.partial(_train_step, config=compute_cfg, cfg=cfg, regularizer=regularizer,
                                   replicated=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    eval_losses = functools.partial(_eval_losses, config=compute_cfg)

    def evaluate(trainable) -> float:
        total = 0.0
        for start in range(0, len(evals), cfg.batch_size):
            idx = list(range(start, min(start + cfg.batch_size, len(evals))))
            n_real = len(idx)
            idx += [idx[0]] * (cfg.batch_size - n_real)  # keep one batch shape per bucket
            losses = to_host(eval_losses(trainable, frozen, _on_mesh(mesh, _batch(evals, idx, pad_id))))
            total += float(losses[:n_real].sum())
        return total / len(evals)

    run_key = stable_hash({"cfg": dataclasses.asdict(cfg), "meta": repr(meta),
                           "train": train, "eval": evals, "model": getattr(model, "name", ""),
                           "regularizer": getattr(regularizer, "__qualname__", None)})
    opt_state = optimizer.init(adapter)
    best = adapter
    state_progress = {"step": 0, "best_loss": None, "best_step": 0, "bad_evals": 0, "stopped_early": False,
                      "history": {"step": [], "train_loss": [], "lr": [], "eval_step": [], "eval_loss": []}}
    ckpt = _Checkpoints(checkpoint_dir, run_key) if checkpoint_dir is not None else None
    if ckpt is not None:
        restored = ckpt.restore((adapter, opt_state, best))
        if restored is not None:
            (adapter, opt_state, best), state_progress = restored
            logging.info("resumed LoRA training from %s at step %d", checkpoint_dir, state_progress["step"])

    schedule = lr_schedule(cfg)
    hist = state_progress["history"]
    base_key = jax.random.key(cfg.seed)
    # A finished or early-stopped run restored from its checkpoint does not train further.
    start = cfg.steps if state_progress["stopped_early"] else int(state_progress["step"])
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {meta.name}", unit="step",
               disable=not progress, dynamic_ncols=True)
    try:
        for step in range(start, cfg.steps):
            losses = []
            for j in range(cfg.grad_accum):
                micro = step * cfg.grad_accum + j
                batch = _on_mesh(mesh, _batch(train, micro_batch_indices(len(train), cfg.batch_size, cfg.seed, micro),
                                              pad_id))
                adapter, opt_state, loss = train_step(adapter, opt_state, frozen, batch,
                                                      jax.random.fold_in(base_key, micro))
                losses.append(float(loss))
            train_loss = float(np.mean(losses))
            if not math.isfinite(train_loss):
                raise NumericalError(f"training loss became {train_loss} at step {step + 1} of adapter "
                                     f"{meta.name!r}; lower TrainConfig.lr (now {cfg.lr}) or enable clipping")
            hist["step"].append(step + 1)
            hist["train_loss"].append(train_loss)
            hist["lr"].append(float(schedule(step)))
            record = {"step": step + 1, "train_loss": train_loss}
            done = step + 1 == cfg.steps
            if evals and ((step + 1) % cfg.eval_every == 0 or done):
                eval_loss = evaluate(adapter)
                hist["eval_step"].append(step + 1)
                hist["eval_loss"].append(eval_loss)
                record["eval_loss"] = eval_loss
                if state_progress["best_loss"] is None or eval_loss < state_progress["best_loss"]:
                    state_progress.update(best_loss=eval_loss, best_step=step + 1, bad_evals=0)
                    best = adapter
                else:
                    state_progress["bad_evals"] += 1
                    if cfg.patience is not None and state_progress["bad_evals"] >= cfg.patience:
                        state_progress["stopped_early"] = done = True
                        logging.info("early stop at step %d: no eval improvement for %d evaluations "
                                     "(best %.4f at step %d)", step + 1, cfg.patience,
                                     state_progress["best_loss"], state_progress["best_step"])
            state_progress["step"] = step + 1
            if ckpt is not None and ((step + 1) % cfg.checkpoint_every == 0 or done):
                ckpt.save(step + 1, (adapter, opt_state, best), state_progress)
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "step"})
            bar.update(1)
            if callback is not None:
                callback(step + 1, record)
            if done:
                break
    finally:
        bar.close()
        if ckpt is not None:
            ckpt.close()

    history = {**hist, "best_step": state_progress["best_step"], "best_eval_loss": state_progress["best_loss"],
               "stopped_early": state_progress["stopped_early"], "steps_run": state_progress["step"]}
    # The factors come back as arrays of this process's default device, like the Fishers: merges
    # work on them locally, whatever mesh trained them.
    result = jax.tree.map(lambda x: jnp.asarray(to_host(x)), best if evals else adapter)
    result = LoraAdapter(factors=result.factors, meta=meta)
    return (result if out_dtype == "float32" else result.astype(out_dtype)), history
