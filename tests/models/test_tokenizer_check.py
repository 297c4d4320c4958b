"""HF folders and GGUF files: a tokenizer that does not round-trip text is refused, unreadable
files say "permission denied", and every bad file gives a named CheckpointError."""

import builtins
import json
import os
import shutil

import pytest
import torch
import transformers

from sst_jax.errors import CheckpointError, PermissionDeniedError, SstJaxError, TokenizerError
from sst_jax.models import load_model
from sst_jax.models.tokenizer import check_tokenizer, tiny_tokenizer


def _qwen2_folder(d, *, tokenizer=True):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(d)
    if tokenizer:
        tiny_tokenizer().save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return _qwen2_folder(tmp_path_factory.mktemp("qwen2"))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_folder_without_tokenizer_files_is_refused_naming_the_missing_files(qwen_dir, tmp_path):
    d = _copy(qwen_dir, tmp_path / "no_tok")
    for f in os.listdir(d):
        if f.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            os.remove(os.path.join(d, f))
    with pytest.raises(TokenizerError) as info:
        load_model(d)
    msg = str(info.value)
    assert d in msg and "encodes 'Hello, world. 123' to []" in msg
    assert "tokenizer.json" in msg and "tokenizer_config.json" in msg and "vocab.json+merges.txt" in msg
    assert "huggingface-cli download" in msg  # what to do


def test_working_tokenizer_passes_the_round_trip(qwen_dir):
    m = load_model(qwen_dir)
    assert len(m.tokenizer.encode("Hello, world. 123")) >= 2
    check_tokenizer(tiny_tokenizer(), "tiny")


def test_tokenizer_that_loses_text_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({"[UNK]": 0, "Hello": 1, ",": 2}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")
    with pytest.raises(TokenizerError, match=r"some\.gguf: the tokenizer .* decodes it back as"):
        check_tokenizer(tok, "some.gguf")


def _deny(monkeypatch, denied_path):
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(os.fspath(file)) == os.path.abspath(denied_path):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)


@pytest.mark.parametrize("fname", ["config.json", "model.safetensors", "tokenizer.json"])
def test_unreadable_checkpoint_file_says_permission_denied(qwen_dir, monkeypatch, fname):
    target = os.path.join(qwen_dir, fname)
    _deny(monkeypatch, target)
    with pytest.raises(PermissionDeniedError, match=rf"cannot read .*{fname}: permission denied.*chmod u\+r"):
        load_model(qwen_dir)


def test_unreadable_gguf_says_permission_denied(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 60)
    _deny(monkeypatch, str(path))
    with pytest.raises(PermissionDeniedError, match=r"cannot read GGUF file .*m\.gguf: permission denied"):
        load_model(str(path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_chmod_000_safetensors_says_permission_denied(qwen_dir, tmp_path):
    d = _copy(qwen_dir, tmp_path / "locked")
    os.chmod(os.path.join(d, "model.safetensors"), 0)
    with pytest.raises(PermissionDeniedError, match="permission denied"):
        load_model(d)


# ------------------------------------------------------------------- table: HF folders and GGUF


def _gguf_from(hf_folder, path):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_loading import write_gguf

    write_gguf(hf_folder, path, arch="qwen2")
    return str(path)


def _fault(path, fault):
    data = open(path, "rb").read()
    if fault == "truncated":
        open(path, "wb").write(data[: len(data) // 2])
    elif fault == "empty":
        open(path, "wb").close()
    elif fault == "garbage":
        open(path, "wb").write(bytes(range(256)) * 8)


@pytest.mark.parametrize("fault", ["truncated", "empty", "garbage", "wrong-schema", "wrong-type"])
@pytest.mark.parametrize("which", ["config.json", "model.safetensors", "tokenizer.json", "gguf"])
def test_every_bad_checkpoint_file_gives_a_named_error(qwen_dir, tmp_path, which, fault):
    d = _copy(qwen_dir, tmp_path / "m")
    if which == "gguf":
        target = _gguf_from(d, tmp_path / "m.gguf")
        if fault == "wrong-schema":  # a GGUF of an architecture we do not read
            import gguf

            w = gguf.GGUFWriter(target, "gpt2")
            w.add_block_count(2)
            w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
        elif fault == "wrong-type":  # block_count stored as a string
            import gguf

            w = gguf.GGUFWriter(target, "qwen2")
            w.add_string("qwen2.block_count", "two")
            w.add_uint32("qwen2.attention.head_count", 4)
            w.add_uint32("qwen2.embedding_length", 32)
            w.add_uint32("qwen2.vocab_size", 512)
            w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
        else:
            _fault(target, fault)
        load = target
    else:
        target = os.path.join(d, which)
        load = d
        if fault == "wrong-schema":
            content = {"config.json": {"hello": "world"}, "tokenizer.json": {"version": "1.0", "model": {}}}
            if which == "model.safetensors":
                from safetensors.numpy import save_file
                import numpy as np

                save_file({"transformer.h.0.attn.weight": np.zeros((2, 2), np.float32)}, target)
            else:
                json.dump(content[which], open(target, "w"))
        elif fault == "wrong-type":
            if which == "config.json":
                cfg = json.load(open(target))
                cfg["hidden_size"] = "big"
                json.dump(cfg, open(target, "w"))
            elif which == "tokenizer.json":
                json.dump([1, 2, 3], open(target, "w"))
            else:
                from safetensors.numpy import load_file, save_file
                import numpy as np

                t = load_file(target)
                t["model.norm.weight"] = np.zeros((3, 3), np.float32)
                save_file(t, target)
        else:
            _fault(target, fault)
    with pytest.raises(SstJaxError) as info:
        load_model(load)
    assert isinstance(info.value, CheckpointError), repr(info.value)
    msg = str(info.value)
    assert (os.path.basename(target) in msg or d in msg), msg
