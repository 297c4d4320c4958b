"""The front door: your own adapters in, one merged adapter out (DESIGN §10).

    import sst_jax
    result = sst_jax.merge_adapters("smollm2-135m", utility=["./math"], safety="./safety",
                                    method="sst", alpha=1.0)     # embedded data by default
    sst_jax.write_merge(result, "./merged")                       # a PEFT adapter + merge_report

Everything a merge needs is checked before any compute (the model load aside): the method and
its hyper-parameters (declared by the registry), the adapters (format, NaN/Inf, shapes, base
model), the data (files, fields, counts). Data-aware methods get their statistics (Fishers,
activation moments) from `MethodSpec.statistics` on datasets built here; with `cache_dir` they
are cached by content, so an α sweep computes them once and a rerun resumes.

Data. `harmful`: prompts (a refusal target is filled in for each, `embedded.refusal_for`) or
(prompt, refusal) pairs; `benign`: prompts (the base model's own greedy answer is the target:
what "keep behaving as before" means) or (prompt, response) pairs; `utility_data`: one dataset
of (prompt, response) pairs per utility adapter (needed by `fisher` and `sst_multi`; mixed into
F_b for the others). Each may be a list, or a file (JSON/JSONL/CSV/Parquet rows with fields
`prompt` and optional `response`). Omitted harmful/benign data are the embedded training splits
(HarmBench + Do-Not-Answer prompts; benign look-alikes), never their held-out test splits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata as md
import inspect
import os
import pickle
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging

from sst_jax.data import embedded
from sst_jax.data.examples import Example, as_examples, batches_digest, encode_examples, interleave, to_batches
from sst_jax.data.sources import load_prompts
from sst_jax.errors import AdapterError, DatasetError, HyperParameterError, SstJaxError
from sst_jax.fisher import resolve_chunk
from sst_jax.eval.safety import generate_responses
from sst_jax.io_utils import atomic_directory, atomic_write_bytes, atomic_write_json, atomic_write_text, stable_hash
from sst_jax.lora.adapter import LoraAdapter
from sst_jax.lora.check import check_compatible
from sst_jax.lora.peft_io import load_peft
from sst_jax import __version__
from sst_jax.merge import MergeResult, get_method, validate_inputs
from sst_jax.merge.ties import expert_digest
from sst_jax.models.branches import concat_lowrank
from sst_jax.models import LoadedModel, load_model
from sst_jax.models.api import HUB_PRESETS
from sst_jax.models.distributed import agree, primary_only
from sst_jax.models.sharding import to_host

DEFAULT_FISHER_SAMPLES = 64
MIN_ROWS = 3  # fewer rows than this cannot estimate anything: an error, not a warning
BENIGN_ANSWER_TOKENS = 64


# ----------------------------------------------------------------------------- inputs


def load_adapter(adapter: Any, name: str) -> LoraAdapter | MergeResult:
    """A loaded adapter, a MergeResult (a merge can feed another merge) or a PEFT folder."""
    if isinstance(adapter, (LoraAdapter, MergeResult)):
        return adapter
    if isinstance(adapter, (str, os.PathLike)):
        path = Path(adapter)
        if not path.is_dir():
            raise AdapterError(f"adapter {name!r}: {path} is not a directory (expected a PEFT adapter folder "
                               "with adapter_config.json and adapter_model.safetensors)")
        return load_peft(path, name=name)
    raise AdapterError(f"adapter {name!r}: expected a PEFT folder or a loaded adapter, got {type(adapter).__name__}")


def adapter_digest(adapter: Any) -> str:
    """Content hash of an adapter's ΔW factors per module (`merge.ties.expert_digest`, the
    identity DARE keys its masks by): what cache keys refer to, never a path."""
    if isinstance(adapter, LoraAdapter):
        lows = adapter.low_rank()
    elif isinstance(adapter, MergeResult):
        lows = {k: concat_lowrank([(lr, 1.0) for lr in br]) for k, br in adapter.to_branches().items()}
    else:
        lows = adapter  # {ModuleKey: LowRank}
    h = hashlib.sha256()
    for key in sorted(lows):
        h.update(repr(key).encode())
        h.update(expert_digest(lows[key]))
    return h.hexdigest()[:16]


def model_identity(model: LoadedModel) -> dict:
    """What a base model is, by content: its architecture and a hash of a sample of its weights
    (never the path it was loaded from, so caches survive a moved virtualenv or a renamed folder)."""
    c = model.config
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(model.params)[0], key=lambda x: str(x[0])):
        # Every weight, sampled at 4096 evenly spaced entries (a folded merge changes every entry
        # of its modules, so any sample sees it) plus its shape: cheap even at 14B.
        step = max(1, int(leaf.size) // 4096)
        sample = to_host(jax.numpy.ravel(leaf)[::step])  # sampled on the device(s), not copied whole
        h.update(f"{jax.tree_util.keystr(path)}{leaf.shape}{leaf.dtype}".encode())
        h.update(np.ascontiguousarray(sample).tobytes())
    return {"family": c.architecture, "layers": c.n_layers, "d_model": c.d_model,
            "heads": c.n_heads, "kv_heads": c.n_kv_heads, "d_ff": c.d_ff, "vocab": c.vocab_size,
            "dtype": str(c.dtype), "weights": h.hexdigest()[:16]}


def read_examples(source: Any, what: str, *, need_response: bool = False) -> list[Example] | None:
    """Examples from a list or a file; None when `source` is None (the embedded default)."""
    if source is None:
        return None
    if isinstance(source, (str, os.PathLike)):
        where = str(source)
        examples = [Example(p, r) for p, r in load_prompts(source, min_rows=MIN_ROWS)]
    else:
        examples = as_examples(list(source), what)
        where = what
    if len(examples) < MIN_ROWS:
        raise DatasetError(f"{what}: {where} has {len(examples)} rows; at least {MIN_ROWS} needed")
    if need_response:
        missing = [i for i, e in enumerate(examples, start=1) if e.response is None]
        if missing:
            raise DatasetError(f"{what}: {where}, row {missing[0]}: no 'response' (each utility example needs "
                               "the answer the adapter should give)")
    return examples


def embedded_harmful(n: int, seed: int) -> list[Example]:
    """n embedded training prompts (never the test split) in a seeded order."""
    prompts = [p.text for p in embedded.harmful_prompts("train")]
    order = np.random.default_rng([seed, len(prompts)]).permutation(len(prompts))
    return [Example(prompts[i]) for i in order[:n]]


def embedded_benign(n: int, seed: int) -> list[Example]:
    prompts = [p.text for p in embedded.benign_prompts("train")]
    order = np.random.default_rng([seed, len(prompts)]).permutation(len(prompts))
    return [Example(prompts[i]) for i in order[:n]]


@dataclasses.dataclass(frozen=True)
class MergeData:
    """The datasets of one merge, before targets are filled in."""

    harmful: list[Example]
    benign: list[Example]
    utility: tuple[list[Example], ...] | None
    sources: dict


# ----------------------------------------------------------------------------- the call


@dataclasses.dataclass(frozen=True)
class MergeRequest:
    """A merge's inputs, read and checked without the model (everything `check_request` can)."""

    spec: Any
    hparams: dict
    utilities: list
    given_utility: list
    safety: Any
    given_safety: Any
    data: MergeData
    fisher_samples: tuple[int, int]
    weights: list[float] | None


def check_request(*, utility: Any, safety: Any = None, method: str = "sst", weights: Sequence[float] | None = None,
                  harmful: Any = None, benign: Any = None, utility_data: Sequence[Any] | None = None,
                  hparams: dict | None = None,
                  fisher_samples: int | tuple[int, int] = DEFAULT_FISHER_SAMPLES) -> MergeRequest:
    """Every check that needs no model: method and hyper-parameters, adapters (format, NaN/Inf),
    weights, data files (fields, counts) and what the method needs. Raises a named error."""
    spec = get_method(method)
    hp = spec.parse_hparams(hparams)
    if not isinstance(utility, (list, tuple)):
        utility = [utility]
    if not utility:
        raise AdapterError("merge needs at least one utility adapter")
    utilities = [load_adapter(u, _default_name(u, f"utility[{i}]")) for i, u in enumerate(utility)]
    if weights is not None and len(list(weights)) != len(utilities):
        raise AdapterError(f"got {len(list(weights))} weights for {len(utilities)} utility adapters")
    safety_adapter = load_adapter(safety, "safety") if safety is not None else None
    if "safety" in spec.needs and safety_adapter is None:
        raise AdapterError(f"method {method!r} adds a safety adapter to the utility part: pass safety=... (--safety DIR)")
    n_h, n_b = (fisher_samples, fisher_samples) if isinstance(fisher_samples, int) else fisher_samples
    if min(n_h, n_b) < 1:
        raise DatasetError(f"fisher_samples must be positive, got {fisher_samples}")
    user = MergeData(harmful=read_examples(harmful, "harmful"), benign=read_examples(benign, "benign"),
                     utility=None if utility_data is None else tuple(
                         read_examples(d, f"utility data [{i}]", need_response=True)
                         for i, d in enumerate(utility_data)), sources={})
    if user.utility is not None and len(user.utility) != len(utilities):
        raise DatasetError(f"utility_data has {len(user.utility)} datasets for {len(utilities)} utility adapters "
                           "(one per adapter, in the same order)")
    if spec.data_aware and "utility" in spec.needs and user.utility is None:
        raise DatasetError(f"method {method!r} needs one dataset per utility adapter (utility_data=[...], "
                           "--utility_data FILE per --utility)")
    return MergeRequest(spec=spec, hparams=hp, utilities=utilities, given_utility=list(utility),
                        safety=safety_adapter, given_safety=safety, data=user, fisher_samples=(int(n_h), int(n_b)),
                        weights=None if weights is None else [float(w) for w in weights])


def merge_adapters(model: str | LoadedModel, *, utility: Any = None, safety: Any = None, method: str = "sst",
                   alpha: float = 1.0, weights: Sequence[float] | None = None, harmful: Any = None,
                   benign: Any = None, utility_data: Sequence[Any] | None = None,
                   hparams: dict | None = None, seed: int = 0,
                   fisher_samples: int | tuple[int, int] = DEFAULT_FISHER_SAMPLES, batch_size: int = 8,
                   dtype: str | None = None, cache_dir: str | os.PathLike | None = None,
                   accept_base_mismatch: bool = False, progress: bool = True,
                   request: MergeRequest | None = None) -> MergeResult:
    """Merge utility adapters (weights default to 1) and an optional safety adapter (weight α)
    with `method` (see `sst_jax.merge.list_methods()`; hparams are checked against its declared
    parameters). model: a preset name, HF folder, .gguf, hub id or a loaded model. Returns a
    MergeResult (`write_merge` writes it; `.to_peft`, `.to_dense`, `.report`). request: the
    result of `check_request` (already read and checked), instead of the input arguments."""
    start = time.perf_counter()
    req = request or check_request(utility=utility, safety=safety, method=method, weights=weights, harmful=harmful,
                                   benign=benign, utility_data=utility_data, hparams=hparams,
                                   fisher_samples=fisher_samples)
    method, weights = req.spec.name, req.weights
    spec, hp, utilities, safety_adapter, user = req.spec, req.hparams, req.utilities, req.safety, req.data
    n_h, n_b = req.fisher_samples
    utility = req.given_utility

    if not isinstance(model, LoadedModel):
        model = load_model(model, dtype=dtype or default_dtype())
    names = [_adapter_label(u, i) for i, u in enumerate(utilities)]
    experts, expert_weights = list(utilities), None if weights is None else [float(w) for w in weights]
    merge_safety, merge_alpha = safety_adapter, alpha
    if method == "sst_multi" and safety_adapter is not None:  # S is one more expert, weight α
        experts.append(safety_adapter)
        expert_weights = (expert_weights or [1.0] * len(utilities)) + [float(alpha)]
        names.append("safety")
        merge_safety = None
    key = jax.random.key(seed)
    inputs = validate_inputs(experts, expert_weights, safety=merge_safety, alpha=merge_alpha, model=model,
                             modules="union", names=names, key=key)
    check_bases(experts + ([safety_adapter] if safety_adapter is not None else []), model,
                accept_mismatch=accept_base_mismatch)

    timings: dict[str, float] = {}
    stats_report = {}
    if hp.get("chunk") is None and any(p.name == "chunk" for p in spec.params):
        # Samples per vmapped Fisher gradient: the backend's default (4 CPU, 16 GPU/TPU), recorded.
        hp = {**hp, "chunk": resolve_chunk(None, getattr(model, "mesh", None))}
    kwargs = dict(hp)
    if spec.data_aware and spec.statistics is not None:
        data = _resolve_data(user, model, n_h, n_b, seed, cache_dir, progress)
        t0 = time.perf_counter()
        batches = _build_batches(spec, data, model, inputs, batch_size, with_safety=safety_adapter is not None)
        inputs = dataclasses.replace(inputs, data=batches)  # e.g. sst_guard(sequential=True) measures more
        kwargs["fishers"] = _statistics(spec, inputs, batches, hp, model, cache_dir, seed)
        timings["statistics"] = round(time.perf_counter() - t0, 3)
        stats_report = {"samples": {k: _n(v) for k, v in batches.items()}, "sources": data.sources}
    t0 = time.perf_counter()
    result = spec.fn(inputs, **kwargs)
    timings["merge"] = round(time.perf_counter() - t0, 3)
    timings["total"] = round(time.perf_counter() - start, 3)
    result.report.update(
        base_model=result.report.get("base_model") or _hub_id(model),
        model=model.name, model_identity=model_identity(model), seed=seed, data=stats_report,
        timings_s=timings, inputs={"utility": [_describe(u, x) for u, x in zip(utilities, utility)],
                                   "safety": None if safety_adapter is None else _describe(safety_adapter, req.given_safety)})
    result.report["hparams"] = {**result.report.get("hparams", {}), **{k: v for k, v in hp.items()}}
    return result


def default_dtype() -> str:
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def check_bases(adapters: Sequence[Any], model: LoadedModel, *, accept_mismatch: bool = False) -> None:
    """Every adapter's recorded base model against the loaded one (shapes are checked by
    validate_inputs; names that differ are only a warning when the architecture matches)."""
    for a in adapters:
        if isinstance(a, LoraAdapter):
            check_compatible(a, model.config, base_model_name=_hub_id(model), accept_base_mismatch=accept_mismatch)


def _default_name(adapter: Any, fallback: str) -> str:
    if isinstance(adapter, (str, os.PathLike)):
        return Path(adapter).name or fallback
    return fallback


def _adapter_label(adapter: Any, i: int) -> str:
    meta = getattr(adapter, "meta", None)
    return str(meta.name) if meta is not None and meta.name else f"utility[{i}]"


def _describe(adapter: Any, given: Any) -> dict:
    return {"name": _adapter_label(adapter, 0), "source": str(given) if isinstance(given, (str, os.PathLike))
            else type(given).__name__, "digest": adapter_digest(adapter)}


def _hub_id(model: LoadedModel) -> str:
    return HUB_PRESETS.get(model.name, model.name)


def _n(batches) -> int:
    if batches is None:
        return 0
    if isinstance(batches, list) and batches and isinstance(batches[0], list):
        return [sum(len(b["input_ids"]) for b in group) for group in batches]
    return sum(len(b["input_ids"]) for b in batches)


def _resolve_data(user: MergeData, model: LoadedModel, n_h: int, n_b: int, seed: int, cache_dir, progress) -> MergeData:
    """Fill in defaults and targets: embedded prompts where none were given, refusals for harmful
    prompts, the base model's own answers for benign prompts without a response."""
    sources = {}
    harmful = user.harmful[:n_h] if user.harmful is not None else embedded_harmful(n_h, seed)
    sources["harmful"] = "user" if user.harmful is not None else "embedded train split (HarmBench + Do-Not-Answer)"
    harmful = [e if e.response is not None else dataclasses.replace(e, response=embedded.refusal_for(e.prompt))
               for e in harmful]
    benign = user.benign[:n_b] if user.benign is not None else embedded_benign(n_b, seed)
    sources["benign"] = "user" if user.benign is not None else "embedded train split (benign look-alikes)"
    missing = [e.prompt for e in benign if e.response is None]
    if missing:
        answers = dict(zip(missing, base_answers(model, missing, cache_dir=cache_dir, progress=progress)))
        benign = [e if e.response is not None else dataclasses.replace(e, response=answers[e.prompt]) for e in benign]
        sources["benign_targets"] = f"base model's greedy answers ({BENIGN_ANSWER_TOKENS} tokens)"
    return MergeData(harmful=harmful, benign=benign, utility=user.utility, sources=sources)


def base_answers(model: LoadedModel, prompts: Sequence[str], *, cache_dir=None, progress: bool = True,
                 max_new_tokens: int = BENIGN_ANSWER_TOKENS, batch_size: int = 8) -> list[str]:
    """The base model's greedy answers (cached by content under cache_dir)."""
    path = None
    if cache_dir is not None:
        recipe = {"model": model_identity(model), "prompts": list(prompts), "max_new_tokens": max_new_tokens}
        path = Path(cache_dir) / "base_answers" / f"answers-{stable_hash(recipe)}.pkl"
        if agree(path.exists(), str(path)):
            with open(path, "rb") as f:
                return pickle.load(f)
    answers = generate_responses(model, model.params, list(prompts), max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, progress=progress, desc="base answers")
    if path is not None:  # process 0 writes; the others wait for it
        primary_only(atomic_write_bytes, path, pickle.dumps(answers), name=str(path))
    return answers


def _build_batches(spec, data: MergeData, model: LoadedModel, inputs, batch_size: int, *, with_safety: bool) -> dict:
    """Collated datasets by name: harmful, benign (benign mixed with every utility dataset,
    round-robin, at the benign count), utility (one per expert; S's is the harmful set)."""
    tok, pad = model.tokenizer, model.config.pad_token_id
    enc = lambda exs: to_batches(encode_examples(tok, exs), pad, batch_size=batch_size)  # noqa: E731
    out = {"harmful": enc(data.harmful)}
    n_b = len(data.benign)
    mixed = interleave(data.benign, *(data.utility or ()))[:n_b] if data.utility else data.benign
    out["benign"] = enc(mixed)
    if data.utility is not None:
        per = [enc(d[:n_b]) for d in data.utility]
        if spec.name == "sst_multi" and with_safety:
            per.append(out["harmful"])
        out["utility"] = per
    return out


def _statistics_params(spec, stat_kw: dict) -> dict:
    """The statistics' parameters as the function sees them: its keyword defaults (never the chunk
    size), overridden by the method's. Two methods that share a statistics function (agl takes
    sst's Fishers) share the cache entry when the parameters agree, given or defaulted."""
    sig = inspect.signature(spec.statistics).parameters.values()
    params = {p.name: p.default for p in sig if p.kind is p.KEYWORD_ONLY and p.name != "chunk"}
    params.update({p: stat_kw.get(p, params.get(p)) for p in spec.statistics_params})
    return params


def _statistics(spec, inputs, batches: dict, hp: dict, model: LoadedModel, cache_dir, seed: int) -> Any:
    """spec.statistics(inputs, batches, ...), cached by content: the statistics function, the
    parameters that change it, model identity, adapters, weights and data (never paths or chunk
    sizes)."""
    stat_kw = {p: hp[p] for p in spec.statistics_params if p in hp}
    if "chunk" in hp:
        stat_kw["chunk"] = hp["chunk"]
    path = None
    if cache_dir is not None:
        digest = {k: (batches_digest(v) if k != "utility" else [batches_digest(g) for g in v])
                  for k, v in batches.items()}
        recipe = {"statistics": f"{spec.statistics.__module__}.{spec.statistics.__qualname__}",
                  "params": _statistics_params(spec, stat_kw), "model": model_identity(model),
                  "utility": [adapter_digest(u) for u in inputs.utility],
                  "weights": list(inputs.weights),
                  "safety": None if inputs.safety is None else adapter_digest(inputs.safety),
                  "data": digest, "seed": seed}
        path = Path(cache_dir) / "statistics" / f"stats-{stable_hash(recipe)}.pkl"
        if agree(path.exists(), str(path)):
            try:
                with open(path, "rb") as f:
                    return pickle.load(f)
            except Exception as err:  # noqa: BLE001 - a damaged cache entry is recomputed
                logging.warning("statistics cache %s unreadable (%s); recomputing", path, err)
    stats = spec.statistics(inputs, batches, **stat_kw)
    if path is not None:
        primary_only(atomic_write_bytes, path, pickle.dumps(jax.device_get(stats)), name=str(path))
    return stats


# ----------------------------------------------------------------------------- output


def write_merge(result: MergeResult, output: str | os.PathLike, *, format: str = "peft", rank: int | None = None,
                model: LoadedModel | None = None, overwrite: bool = False, extra_report: dict | None = None) -> Path:
    """Write the merged adapter (format "peft": a PEFT folder, exact for factor results and
    SVD-truncated at `rank` otherwise; "hf": merged full weights as HF safetensors, needs the
    model) with merge_report.json and merge_report.md beside it, atomically: the folder appears
    complete or not at all."""
    output = Path(output)
    if format not in ("peft", "hf"):
        raise SstJaxError(f"--format must be 'peft' or 'hf', got {format!r}")
    if output.exists() and not overwrite:
        raise SstJaxError(f"{output} exists; pass overwrite (--overwrite) to replace it")
    if format == "hf" and model is None:
        raise SstJaxError("format 'hf' writes merged full weights and needs the base model")
    if format == "peft" and not result.exact and rank is None:
        raise SstJaxError(f"method {result.method!r} produces a dense ΔW; a PEFT adapter needs --rank N "
                          "(SVD truncation, error reported) or use --format hf")
    if format == "hf" and jax.process_count() > 1:
        raise SstJaxError("--format hf (merged full weights) is written by one process; run it on one host, "
                          "or write --format peft and merge the adapter into the weights there")
    primary_only(_write_merge_folder, result, output, format, rank, model, extra_report, name=str(output))
    logging.info("wrote %s (%s)", output, format)
    return output


def _write_merge_folder(result: MergeResult, output: Path, format: str, rank: int | None,
                        model: LoadedModel | None, extra_report: dict | None) -> None:
    with atomic_directory(output) as staging:
        if format == "peft":
            errors = result.to_peft(str(staging), rank=rank, base_config=None if model is None else model.config,
                                    base_hub_id=result.report.get("base_model"))
        else:
            result.to_merged_hf(model, str(staging))
            errors = {}
        report = {**result.report, **(extra_report or {}), "format": format, "rank": rank,
                  "truncation_error": errors, "versions": package_versions()}
        report.pop("export", None)
        atomic_write_json(staging / "merge_report.json", report)
        atomic_write_text(staging / "merge_report.md", report_markdown(report))


def package_versions() -> dict[str, str]:
    """Versions of what produced a result (merge reports and experiment results), and the backend."""
    out = {"python": platform.python_version(), "sst_jax": __version__}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    out["backend"] = jax.default_backend()
    out["devices"] = [str(d) for d in jax.devices()]
    return out


def report_markdown(report: dict) -> str:
    """A human-readable merge report: inputs, data, timings and a per-module table."""
    lines = [f"# merge report: {report.get('method')}", "",
             f"- base model: {report.get('base_model')} (loaded as {report.get('model')})",
             f"- adapters: {', '.join(report.get('adapters', []))}; weights {report.get('weights')}; "
             f"alpha {report.get('alpha')}",
             f"- hyper-parameters: {report.get('hparams')}",
             f"- format: {report.get('format')}" + (f", rank {report['rank']}" if report.get("rank") else ""),
             f"- data: {report.get('data', {}).get('samples', 'none (data-free method)')}",
             f"- timings (s): {report.get('timings_s')}"]
    if report.get("command"):
        lines.append(f"- command: `{report['command']}`")
    lines += ["", "| module | rank | ‖ΔW‖_F | kept k | top λ | patch-norm ratio | truncation error |",
              "|---|---|---|---|---|---|---|"]
    trunc = report.get("truncation_error") or {}
    for path, m in (report.get("modules") or {}).items():
        st = m.get("safety", m) if isinstance(m, dict) else {}
        eig = st.get("eigvals") or []
        cells = [path, m.get("rank"), _fmt(m.get("norm")), st.get("k", ""), _fmt(eig[0] if eig else None),
                 _fmt(st.get("patch_norm_ratio")), _fmt(trunc.get(path))]
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(x) -> str:
    return "" if x is None else f"{float(x):.4g}"
