"""Adapter folders: atomic replacement (also under SIGKILL), unreadable files, every bad
adapter file a named error, and base-model identity by architecture fingerprint."""

from __future__ import annotations

import builtins
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from lora_fixtures import peft_lora, tiny_llama, tiny_llama_config

from sst_jax.errors import AdapterError, AdapterMismatchError, OutputError, PermissionDeniedError, SstJaxError
from sst_jax.io_utils import atomic_directory
from sst_jax.lora.adapter import LoraAdapter, LoraFactors
from sst_jax.lora.check import FINGERPRINT_KEY, adapter_fingerprint, base_fingerprint, check_compatible
from sst_jax.lora.peft_io import CONFIG_NAME, WEIGHTS_NAME, load_peft, save_peft
from sst_jax.models.config import DecoderConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = DecoderConfig.from_hf(tiny_llama_config())


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    """A PEFT-saved adapter of the tiny Llama (the 'previous' folder of the swap tests)."""
    path = tmp_path_factory.mktemp("peft_saved")
    peft_lora(0).save_pretrained(path)
    return path


def _scaled(adapter: LoraAdapter, factor: float) -> LoraAdapter:
    return adapter.replace_factors({k: LoraFactors(f.a, f.b * factor) for k, f in adapter.factors.items()})


def _files(directory):
    return {p: (directory / p).read_bytes() for p in sorted(os.listdir(directory))}


def _siblings(path):
    return sorted(p for p in os.listdir(path.parent) if p.startswith(f".{path.name}."))


# ------------------------------------------------------------------- item 4: atomic folder swap


def test_failed_writer_leaves_previous_folder_and_no_temp_folder(peft_dir, tmp_path):
    target = tmp_path / "out"
    save_peft(load_peft(peft_dir), target)
    before = _files(target)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(target) as tmp:
            (tmp / WEIGHTS_NAME).write_bytes(b"partial")
            raise RuntimeError("disk full")
    assert _files(target) == before and _siblings(target) == []


def test_new_folder_gets_the_umask_mode(peft_dir, tmp_path):
    old = os.umask(0o027)
    try:
        save_peft(load_peft(peft_dir), tmp_path / "m")
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "m" / CONFIG_NAME).stat().st_mode & 0o777 == 0o640


def test_replacing_a_folder_that_is_not_an_earlier_output_is_refused(peft_dir, tmp_path):
    target = tmp_path / "home"
    (target / "Documents").mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"home already exists and holds 2 entries .*Documents/, notes\.txt.*"
                                          r"Choose a new or empty folder"):
        save_peft(load_peft(peft_dir), target)
    assert sorted(os.listdir(target)) == ["Documents", "notes.txt"] and _siblings(target) == []


_KILL_SCRIPT = textwrap.dedent("""
    import sys
    from sst_jax.lora.peft_io import load_peft, save_peft
    from sst_jax.lora.adapter import LoraFactors
    a = load_peft(sys.argv[1])
    a = a.replace_factors({k: LoraFactors(f.a, f.b * 2.0) for k, f in a.factors.items()})
    save_peft(a, sys.argv[2])
""")


def _export_in_subprocess(src, target, stage):
    env = dict(os.environ, SST_JAX_ATOMIC_PAUSE_AT=stage, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(src), str(target)], env=env,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 120
    for line in proc.stderr:  # wait until the writer sits at `stage`
        if line.startswith(f"SST_JAX_PAUSED {stage}"):
            break
        assert time.time() < deadline
    else:
        proc.wait()
        pytest.fail(f"writer never reached {stage!r} (exit {proc.returncode})")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("stage, expect", [("after-writer-0", "old"), ("before-swap", "old"),
                                           ("between-renames", "new"), ("before-cleanup", "new")])
def test_export_killed_at_any_stage_leaves_a_loadable_folder_and_rerun_is_identical(peft_dir, tmp_path, stage, expect):
    old_adapter = load_peft(peft_dir)
    reference = tmp_path / "reference"
    save_peft(_scaled(old_adapter, 2.0), reference)  # an uninterrupted write of the same export
    target = tmp_path / "adapter"
    save_peft(old_adapter, target)
    old_files = _files(target)

    _export_in_subprocess(target, target, stage)
    assert _siblings(target), "the kill should leave the swap's temporary folders behind"
    loaded = load_peft(target)  # recovers first
    assert _siblings(target) == []
    want = old_files if expect == "old" else _files(reference)
    assert _files(target) == want
    b = next(iter(loaded.factors.values())).b
    ref_b = next(iter((old_adapter if expect == "old" else _scaled(old_adapter, 2.0)).factors.values())).b
    np.testing.assert_array_equal(np.asarray(b), np.asarray(ref_b))

    save_peft(_scaled(old_adapter, 2.0), target)  # the rerun
    assert _files(target) == _files(reference) and _siblings(target) == []


# ------------------------------------------------------------------- item 11: unreadable files


@pytest.mark.parametrize("fname", [WEIGHTS_NAME, CONFIG_NAME])
def test_unreadable_adapter_file_says_permission_denied(peft_dir, monkeypatch, fname):
    denied = os.path.abspath(peft_dir / fname)
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(os.fspath(file)) == denied:
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(PermissionDeniedError, match=rf"cannot read adapter \w+ .*{fname}: permission denied"):
        load_peft(peft_dir)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_chmod_000_adapter_weights_say_permission_denied(peft_dir, tmp_path):
    import shutil

    d = tmp_path / "locked"
    shutil.copytree(peft_dir, d)
    os.chmod(d / WEIGHTS_NAME, 0)
    with pytest.raises(PermissionDeniedError, match="permission denied"):
        load_peft(d)


# ------------------------------------------------------------------- table: bad adapter files


def _break(d, which, fault):
    path = d / which
    data = path.read_bytes()
    if fault == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif fault == "empty":
        path.write_bytes(b"")
    elif fault == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    elif which == CONFIG_NAME:
        cfg = json.loads(data)
        if fault == "wrong-schema":
            path.write_text(json.dumps([cfg]))
        else:
            cfg.update(r="four", target_modules=[1, 2])
            path.write_text(json.dumps(cfg))
    else:
        from safetensors.numpy import load_file, save_file

        t = load_file(str(path))
        if fault == "wrong-schema":
            t = {"base_model.model.model.embed_tokens.weight": np.zeros((4, 4), np.float32)}
        else:
            t = {k: v.astype(np.int32) for k, v in t.items()}
        save_file(t, str(path))


@pytest.mark.parametrize("fault", ["truncated", "empty", "garbage", "wrong-schema", "wrong-type"])
@pytest.mark.parametrize("which", [WEIGHTS_NAME, CONFIG_NAME])
def test_every_bad_adapter_file_gives_a_named_error(peft_dir, tmp_path, which, fault):
    import shutil

    d = tmp_path / "bad"
    shutil.copytree(peft_dir, d)
    _break(d, which, fault)
    with pytest.raises(SstJaxError) as info:
        load_peft(d)
    assert isinstance(info.value, AdapterError), repr(info.value)
    assert which in str(info.value), str(info.value)


# ------------------------------------------------------------------- item 6: base identity


def test_fingerprint_is_saved_and_peft_still_loads_the_folder(peft_dir, tmp_path):
    from peft import PeftConfig, PeftModel

    save_peft(load_peft(peft_dir), tmp_path / "fp", base_config=CFG)
    cfg = json.loads((tmp_path / "fp" / CONFIG_NAME).read_text())
    assert cfg[FINGERPRINT_KEY] == base_fingerprint(CFG, hub_id=cfg["base_model_name_or_path"])
    assert PeftConfig.from_pretrained(tmp_path / "fp").r == 4
    PeftModel.from_pretrained(tiny_llama(0), tmp_path / "fp")
    reloaded = load_peft(tmp_path / "fp")
    assert adapter_fingerprint(reloaded) == cfg[FINGERPRINT_KEY]
    save_peft(reloaded, tmp_path / "again")  # the fingerprint survives a re-save
    assert json.loads((tmp_path / "again" / CONFIG_NAME).read_text())[FINGERPRINT_KEY] == cfg[FINGERPRINT_KEY]


def test_base_loaded_from_a_renamed_folder_accepts_its_adapter_with_a_warning(peft_dir, tmp_path, caplog):
    from sst_jax.models import load_model
    from sst_jax.models.tokenizer import tiny_tokenizer

    snapshot = tmp_path / "snapshots" / "8c2d9e7f0a1b3c4d5e6f"  # an HF-cache folder named by a commit
    tiny_llama(0).save_pretrained(snapshot)
    tiny_tokenizer().save_pretrained(snapshot)
    model = load_model(str(snapshot))
    adapter = load_peft(peft_dir)
    save_peft(adapter, tmp_path / "a", base_config=CFG, base_hub_id="acme/tiny-llama")
    adapter = load_peft(tmp_path / "a")
    with caplog.at_level(logging.WARNING):
        check_compatible(adapter, model.config, base_model_name=model.name)
    assert "trained on 'acme/tiny-llama' but is applied to '8c2d9e7f0a1b3c4d5e6f'" in caplog.text
    check_compatible(adapter, model.config)  # no name: the fingerprint is still checked, and matches


def test_different_architecture_is_refused_naming_both_unless_accepted(peft_dir, tmp_path, caplog):
    save_peft(load_peft(peft_dir), tmp_path / "a", base_config=CFG)
    adapter = load_peft(tmp_path / "a")
    deeper = CFG.replace(n_layers=4, vocab_size=1000)  # every targeted module still fits
    with pytest.raises(AdapterMismatchError, match=r"n_layers=2, .*vocab_size=96.* but the base model 'deep' "
                                                   r"has family=llama, n_layers=4, .*n_layers \(2 vs 4\), "
                                                   r"vocab_size \(96 vs 1000\).*accept_base_mismatch=True"):
        check_compatible(adapter, deeper, base_model_name="deep")
    with caplog.at_level(logging.WARNING):
        check_compatible(adapter, deeper, base_model_name="deep", accept_base_mismatch=True)
    assert "accepted: accept_base_mismatch=True" in caplog.text


def test_shape_mismatch_is_refused_before_any_compute_even_without_names(peft_dir):
    adapter = load_peft(peft_dir)  # a plain PEFT adapter: its shapes are its fingerprint
    wider = CFG.replace(d_model=64, n_heads=4)
    with pytest.raises(AdapterMismatchError, match=r"targets layers\.0\.mlp\.down_proj with B of shape \(32, 4\) "
                                                   r"\(A \(4, 48\)\) but the base model has down_proj output size 64"):
        check_compatible(adapter, wider)
    with pytest.raises(AdapterMismatchError, match="has 1 layers"):
        check_compatible(adapter, CFG.replace(n_layers=1), accept_base_mismatch=True)  # cannot be applied at all


def test_bad_fingerprint_in_adapter_config_is_a_named_error(peft_dir, tmp_path):
    import shutil

    d = tmp_path / "a"
    shutil.copytree(peft_dir, d)
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg[FINGERPRINT_KEY] = {"family": "llama", "n_layers": "two"}
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=rf"{CONFIG_NAME}: {FINGERPRINT_KEY} must be"):
        load_peft(d)
