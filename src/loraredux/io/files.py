"""Adapter files on disk: `adapter_config.json` + `adapter_model.safetensors`, written atomically, read safely.

Only JSON and safetensors are ever read: a pickle (`adapter_model.bin`, `.pt`, ...) can run code when loaded, so
we refuse it and say how to convert it. A save writes both files into a temporary directory beside the target and
then renames each into place (`os.replace`, atomic on one file system): an interrupted save leaves either the old
file or the new one, never a partial file, and other files in the directory are left alone. The weights file's
metadata holds the SHA-256 of the config it was saved with, so a save torn between the two renames (new weights
beside the old config) is reported on load instead of silently mixing two adapters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "AdapterFileError",
    "read_adapter",
    "read_adapter_config",
    "write_adapter",
    "write_json_atomic",
    "write_text_atomic",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_CONFIG_HASH = "loraredux_config_sha256"  # safetensors metadata key; PEFT and vLLM ignore it


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class AdapterFileError(ValueError):
    """A directory whose adapter files cannot be read (missing, corrupt, pickled or of an unknown format)."""


# ----------------------------------------------------------------------------------------------- writing


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_adapter(
    directory: str | os.PathLike[str], config: Mapping[str, Any], tensors: Mapping[str, Tensor]
) -> Path:
    """Write the two adapter files into `directory` (created if needed), replacing an earlier adapter only on
    success.

    Args:
        directory: where the adapter goes.
        config: the JSON-ready contents of `adapter_config.json` (key order is kept).
        tensors: the contents of `adapter_model.safetensors`.

    Returns:
        The directory as a `Path`.
    """
    text = json.dumps(config, indent=2) + "\n"  # fails here, before anything is written
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-tmp-", dir=directory))
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(tmp / WEIGHTS_NAME),
            metadata={"format": "pt", _CONFIG_HASH: _sha256(text.encode("utf-8"))},
        )
        (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            _fsync(tmp / name)
        # Each rename is atomic, the pair is not. A crash in between leaves the old config beside the new
        # weights, whose config hash then disagrees: `read_adapter` warns of such a pair.
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(tmp / name, directory / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):  # only removes it if still empty
                directory.rmdir()
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return directory


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write `data` as JSON to `path` through a temporary file in the same folder and a rename."""
    text = json.dumps(data, indent=2) + "\n"  # fails here, before anything is written
    return write_text_atomic(path, text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike[str], text: str | bytes) -> Path:
    """Write `text` (a str as UTF-8, or bytes as they are) to `path` through a temporary file in the same folder
    and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8") if isinstance(text, str) else text
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        # mkstemp makes 0600; a written file gets the usual permissions
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------------------------- reading


def _refuse_pickles(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise AdapterFileError(
            f"{directory} holds {pickles} but no {WEIGHTS_NAME}. loraredux never unpickles a file (loading a "
            "pickle can run arbitrary code). Convert it once, in an environment you trust, e.g. "
            "`peft.PeftModel.from_pretrained(base, DIR).save_pretrained(DIR)` (PEFT writes safetensors), or "
            f"`safetensors.torch.save_file(torch.load(PATH, weights_only=True), DIR + '/{WEIGHTS_NAME}')`."
        )


def _read_config(path: Path) -> tuple[dict[str, Any], bytes]:
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path.parent}")
    raw = path.read_bytes()
    try:
        config = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, found {type(config).__name__}")
    return config, raw


def _read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
            return tensors, f.metadata() or {}
    except SafetensorError as err:
        raise AdapterFileError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated or corrupt: "
            "save the adapter again"
        ) from err


def read_adapter(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The adapter config (JSON object) and tensors in `directory`; nothing else is read.

    Raises:
        FileNotFoundError: the directory, its config or its safetensors file is missing.
        AdapterFileError: only a pickled weights file is present, or a file is not valid JSON / safetensors.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no adapter directory {directory}")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        _refuse_pickles(directory)
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    config, raw = _read_config(directory / CONFIG_NAME)
    tensors, metadata = _read_tensors(weights)
    saved_with = metadata.get(_CONFIG_HASH)
    if saved_with is not None and saved_with != _sha256(raw):
        # A hand edit (say, of base_model_name_or_path) is legitimate, so this warns; keys and shapes are still
        # checked against the model, and a config that does not fit is refused there.
        warnings.warn(
            f"{directory / CONFIG_NAME} is not the config {WEIGHTS_NAME} was saved with: it was edited, a save "
            "was interrupted between its two files, or the files come from two adapters",
            stacklevel=3,
        )
    return config, tensors


def read_adapter_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Only the adapter's `adapter_config.json` (either format), e.g. to find the base model it names.

    Raises:
        FileNotFoundError: the directory or its config is missing.
        AdapterFileError: the config is not a JSON object.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no adapter directory {directory}")
    return _read_config(directory / CONFIG_NAME)[0]
