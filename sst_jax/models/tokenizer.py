"""Tokenizers: a small byte-level BPE trained in code (the `tiny` preset) and GGUF metadata.

Both come back as `transformers.PreTrainedTokenizerFast` with a chat template, an EOS and a
pad token, so `sst_jax.data.chat` treats every model the same way.
"""

from __future__ import annotations

import functools
import os

from sst_jax.errors import CheckpointError, TokenizerError

# ChatML, the format SmolLM2 and Qwen2 use.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# A few hundred words of varied English (prompts, answers, refusals, arithmetic, code) so the
# BPE merges cover what the tests and the tiny experiments feed it; byte-level BPE still
# encodes any text.
_TINY_CORPUS = """
The capital of France is Paris. The capital of Italy is Rome. The capital of Japan is Tokyo.
What is the capital of Germany? Berlin is the capital of Germany. Answer the question briefly.
I'm sorry, but I cannot help with that request. I can't assist with anything harmful or illegal.
As an AI assistant, I must refuse. Here is how you can do it safely: first, read the manual.
Sure! Here is a short answer. Please explain your reasoning step by step before you answer.
Question: What is 12 + 35? Answer: 47. Question: What is 7 * 8? Answer: 56. 0 1 2 3 4 5 6 7 8 9
A. red B. green C. blue D. yellow. The correct choice is B. Choose one option: A, B, C or D.
def add(a, b):\n    return a + b\nprint(add(2, 3))\n# Python code with indentation and comments.
The weather today is sunny with a light breeze. Scientists study the stars, oceans and forests.
How do I bake bread? Mix flour, water, salt and yeast, knead the dough, let it rise, then bake.
Translate to French: hello, thank you, good night. Bonjour, merci, bonne nuit.
History, geography, chemistry, biology, physics, mathematics, economics, law and medicine.
You are a helpful assistant. The user asks a question and the assistant gives a helpful reply.
"""


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 512):
    """Byte-level BPE trained on a built-in corpus in well under a second; ChatML template.

    EOS is `<|im_end|>` (what the chat template ends a turn with), pad `<|endoftext|>`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(TINY_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([line for line in _TINY_CORPUS.splitlines() if line] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token=None,
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "left"
    fast.name_or_path = "tiny"
    return fast


def gguf_tokenizer(path: str):
    """Tokenizer and chat template from a GGUF file's metadata (transformers' GGUF reader)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
    except Exception as e:  # transformers raises many types here; name the file
        raise CheckpointError(f"{path}: cannot build a tokenizer from GGUF metadata: {e}") from e
    check_tokenizer(tok, path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if getattr(tok, "chat_template", None) is None:
        tok.chat_template = CHATML_TEMPLATE
    return tok


PROBE_TEXT = "Hello, world. 123"
# Files an HF folder's tokenizer is built from: the fast tokenizer, its config, and the
# vocabularies of the slow ones (BPE vocab.json + merges.txt, SentencePiece, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
VOCAB_FILES = (("vocab.json", "merges.txt"), ("tokenizer.model",), ("vocab.txt",))


def missing_tokenizer_files(directory: str) -> list[str]:
    """Tokenizer files `directory` lacks (empty when a usable set is present)."""
    missing = [f for f in TOKENIZER_FILES if not os.path.isfile(os.path.join(directory, f))]
    has_vocab = os.path.isfile(os.path.join(directory, "tokenizer.json")) or any(
        all(os.path.isfile(os.path.join(directory, f)) for f in group) for group in VOCAB_FILES)
    if not has_vocab:
        missing.append("a vocabulary (" + " or ".join("+".join(g) for g in VOCAB_FILES) + ")")
    return missing


def check_tokenizer(tok, where: str, *, directory: str | None = None) -> None:
    """Raises TokenizerError unless `tok` round-trips a short text (≥ 2 tokens, decodes back).

    `AutoTokenizer` happily builds an empty (1-token) tokenizer for a folder without tokenizer
    files, which then encodes every text to []; training and evaluation would run on nothing.
    """
    try:
        ids = list(tok.encode(PROBE_TEXT, add_special_tokens=False))
        back = tok.decode(ids, skip_special_tokens=True)
    except Exception as e:  # a broken tokenizer can fail in many ways; name where it came from
        ids, back, failure = [], "", f"fails on a test text ({type(e).__name__}: {e})"
    else:
        failure = None
        if len(ids) < 2:
            failure = (f"encodes {PROBE_TEXT!r} to {ids} ({len(ids)} token{'s' * (len(ids) != 1)}; "
                       f"vocabulary of {len(tok)})")
        elif "".join(back.split()) != "".join(PROBE_TEXT.split()):
            failure = f"encodes {PROBE_TEXT!r} and decodes it back as {back!r}"
    if failure is None:
        return
    if directory is not None:
        missing = missing_tokenizer_files(directory)
        lacks = (f"the folder lacks {', '.join(missing)}" if missing
                 else "its tokenizer files are present but do not describe a working tokenizer")
        raise TokenizerError(
            f"{directory}: the tokenizer loaded from this folder {failure}: {lacks}. Copy the tokenizer "
            "files (tokenizer.json, tokenizer_config.json, and the vocabulary files) of the base model "
            "into the folder, e.g. `huggingface-cli download <hub id> tokenizer.json tokenizer_config.json "
            f"--local-dir {directory}`")
    raise TokenizerError(f"{where}: the tokenizer built from this file {failure}; the file's tokenizer "
                         "metadata is missing or broken. Use a GGUF converted with its tokenizer, or the "
                         "HF folder of the model")
