"""Adapter files on disk: `adapter_config.json` + `adapter_model.safetensors`, written atomically, read safely.

Only JSON and safetensors are ever read: a pickle (`adapter_model.bin`, `.pt`, ...) can run code when loaded, so
we refuse it and say how to convert it. A save builds the new directory beside the target and swaps the two
atomically (`atomic.replace_directory_files`): wherever it is killed, the directory holds the old adapter or the
new one, never a mix, and the other files in it are kept. A read opens both files in the one directory it holds
open, so a save racing it cannot hand it a mixed pair either. The weights file's metadata holds the SHA-256 of the
config it was saved with, so a mixed pair that other tools made (files copied by hand from two adapters, a reader
without that care) is reported on load. The bytes themselves are parsed strictly in `strict.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from ..core import nonfinite_count
from . import atomic
from .strict import AdapterFileError, json_kind, parse_json, read_all, read_tensors

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


# ----------------------------------------------------------------------------------------------- writing


# Folders that earlier versions left inside an adapter directory when a save was killed (tempfile.mkdtemp's names).
_LEGACY_TMP = r"\.adapter-tmp-[a-z0-9_]{8}"


def write_adapter(
    directory: str | os.PathLike[str], config: Mapping[str, Any], tensors: Mapping[str, Tensor]
) -> Path:
    """Write the two adapter files into `directory` (created if needed): wherever the process is killed,
    `directory` holds the complete old adapter or the complete new one, never a mix, and everything else it held.

    The new directory is built as a hidden sibling, `.<name>.loraredux-save-<random>`, with the two new files and
    hard links to the other entries, then swapped with `directory` in one atomic `renameat2(RENAME_EXCHANGE)`
    (`atomic.replace_directory_files`, which states the guarantee and its limits). What a killed earlier save left
    is cleaned up first: hidden siblings, and the `.adapter-tmp-*` folders older versions left inside `directory`.
    A new directory gets the usual mode (0o777 less the umask), an existing one keeps its own; the two files get
    0o666 less the umask.

    A reader that opens the config before the swap and the weights after it still gets a mix (no save done through
    paths can prevent that); the weights' metadata holds the SHA-256 of their config, so `read_adapter` warns of
    such a pair, while PEFT, vLLM and llama.cpp do not check it. Without `RENAME_EXCHANGE` (not Linux, some network
    file systems) `directory` is briefly absent during a save instead.

    Args:
        directory: where the adapter goes.
        config: the JSON-ready contents of `adapter_config.json` (key order is kept).
        tensors: the contents of `adapter_model.safetensors`.

    Returns:
        The directory as a `Path`.
    """
    text = json.dumps(config, indent=2) + "\n"  # fails here, before anything is written
    raw = text.encode("utf-8")
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"format": "pt", _CONFIG_HASH: _sha256(raw)}

    def write_weights(path: Path) -> None:
        save_file(cpu, str(path), metadata=metadata)

    atomic.remove_stale_folders(directory, _LEGACY_TMP, (CONFIG_NAME, WEIGHTS_NAME))
    files = {WEIGHTS_NAME: write_weights, CONFIG_NAME: raw}
    return atomic.replace_directory_files(directory, files)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write `data` as JSON to `path` as `write_text_atomic` does."""
    text = json.dumps(data, indent=2) + "\n"  # fails here, before anything is written
    return write_text_atomic(path, text)


def write_text_atomic(path: str | os.PathLike[str], text: str | bytes) -> Path:
    """Write `text` (a str as UTF-8, or bytes as they are) to `path`: readers, and a kill at any point, see the old
    file or the new one.

    A temporary file in the same folder (`.<name>.<random>.tmp`) is written and fsynced, then renamed over `path`;
    one that a killed earlier write to `path` left is removed first (`atomic.replace_file`). The file gets the
    usual permissions (0o666 less the umask).
    """
    return atomic.replace_file(path, text.encode("utf-8") if isinstance(text, str) else bytes(text))


# ----------------------------------------------------------------------------------------------- reading

# A real adapter_config.json is a few KiB: a reader allocates no more than this before it knows a file is sane.
_CONFIG_LIMIT = 64 << 20


def _refuse_pickles(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise AdapterFileError(
            f"{directory} holds {pickles} but no {WEIGHTS_NAME}. loraredux never unpickles a file (loading a "
            "pickle can run arbitrary code). Convert it once, in an environment you trust, e.g. "
            "`peft.PeftModel.from_pretrained(base, DIR).save_pretrained(DIR)` (PEFT writes safetensors), or "
            f"`safetensors.torch.save_file(torch.load(PATH, weights_only=True), DIR + '/{WEIGHTS_NAME}')`."
        )


def _kind(mode: int) -> str:
    """What a file of this `st_mode` is, in words."""
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symlink"),
    )
    return next((words for test, words in kinds if test(mode)), "a special file")


def _target_kind(target: Path) -> str:
    try:
        return _kind(os.stat(target).st_mode)  # stat opens nothing, so a FIFO cannot block here
    except OSError:
        return "which does not exist"


def _open_regular(path: Path, directory: Path, dir_fd: int | None = None) -> int | None:
    """A read-only descriptor of `path` if it is a regular file; None if there is no such entry.

    The entry is inspected with lstat / stat before it is opened, so a FIFO (whose open would block) or a
    device (/dev/zero never ends) is named, never read. A symlink is followed only to a regular file inside
    `directory`. The open is non-blocking and must yield the very file inspected, so a swap in between is
    caught too. With `dir_fd` (the directory, open), the entry is looked up in that very directory, whatever
    `directory` names by then.

    Raises:
        AdapterFileError: not a regular file, a symlink leaving the directory, or a dangling symlink.
    """
    name: str | Path = path if dir_fd is None else path.name
    try:
        info = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        target = Path(os.path.realpath(path))
        if not target.is_relative_to(Path(os.path.realpath(directory))):
            raise AdapterFileError(
                f"{path} is a symlink pointing outside the adapter directory (to {target}, "
                f"{_target_kind(target)}), not a regular file; copy the file into {directory} instead"
            )
        try:
            info = os.stat(name, dir_fd=dir_fd)
        except OSError as err:
            raise AdapterFileError(
                f"{path} is a symlink to {target}, which cannot be read ({err.strerror})"
            ) from err
    if not stat.S_ISREG(info.st_mode):
        raise AdapterFileError(f"{path} is {_kind(info.st_mode)}, not a regular file")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(name, flags, dir_fd=dir_fd)
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
        os.close(fd)
        raise AdapterFileError(f"{path} was replaced while it was being opened; load it again")
    return fd


def _read_config(path: Path, dir_fd: int | None = None) -> tuple[dict[str, Any], bytes]:
    fd = _open_regular(path, path.parent, dir_fd)
    if fd is None:
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path.parent}")
    try:
        size = os.fstat(fd).st_size
        if size > _CONFIG_LIMIT:
            raise AdapterFileError(
                f"{path} is {size} bytes, too large for an adapter config (at most {_CONFIG_LIMIT})"
            )
        raw = read_all(fd, size)
    finally:
        os.close(fd)
    if not raw.strip():
        raise AdapterFileError(f"{path} is empty; expected a JSON object")
    config = parse_json(raw, str(path))
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, found {json_kind(config)}")
    return config, raw


def _refuse_nonfinite(tensors: Mapping[str, Tensor], path: Path) -> None:
    for key, tensor in tensors.items():
        bad = nonfinite_count(tensor)
        if bad:
            raise AdapterFileError(
                f"{path}: tensor {key!r} holds {bad} NaN or infinite value(s) of {tensor.numel()}; an "
                "adapter with them computes NaN or Inf. Load it with allow_nonfinite=True to inspect it anyway"
            )


_ATTEMPTS = 5  # reads of a directory that saves keep replacing under the reader


def _open_directory(directory: Path) -> int:
    """`directory` opened as a directory (a descriptor), or FileNotFoundError."""
    try:
        return os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"no adapter directory {directory}") from None


def _swapped(directory: Path, dir_fd: int, attempt: int) -> bool:
    """Whether `directory` now names another directory than `dir_fd` (a save replaced it) and another attempt
    is left; where a save has set it aside for an instant (where the system cannot swap directories
    atomically), wait a little for the new one."""
    if attempt + 1 >= _ATTEMPTS:
        return False
    held = os.fstat(dir_fd)
    for _ in range(100):
        try:
            now = os.stat(directory)
            return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)
        except FileNotFoundError:
            time.sleep(0.01)
    return False


def read_adapter(
    directory: str | os.PathLike[str], *, allow_nonfinite: bool = False
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The adapter config (JSON object) and tensors in `directory`; nothing else is read, nothing unpickled.

    Refused, each with an error naming the file and what is wrong in it:
    - a missing directory or file (FileNotFoundError), or only a pickled weights file (`adapter_model.bin`,
      never unpickled);
    - an entry that is not a regular file: a directory, FIFO (never opened, it would block), device, socket,
      or a symlink leaving the directory (a symlink to a regular file inside it is followed);
    - a config that is empty, over 64 MiB, not UTF-8, not JSON, not a JSON object, nested over 64 levels, or
      holds a duplicate key or NaN / Infinity;
    - a safetensors file that is truncated, whose header length runs past the file, whose header is not a JSON
      object of well-formed entries (known dtype, shape, data_offsets), holds a duplicate key, or whose
      tensors' byte ranges overlap, leave gaps or run past the file;
    - unless `allow_nonfinite`, a floating-point tensor holding NaN or Inf.

    Whether the tensors fit a model (names, shapes, dtypes) is checked by the loader.

    Args:
        directory: the adapter directory.
        allow_nonfinite: read NaN / Inf values too.

    Raises:
        FileNotFoundError: the directory, its config or its safetensors file is missing.
        AdapterFileError: any of the above.
    """
    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    for attempt in range(_ATTEMPTS):
        dir_fd = _open_directory(directory)
        fd = None
        try:
            # Both files are opened in one directory, held open: a save that swaps `directory` meanwhile
            # (`lx.save_adapter`) cannot pair this directory's weights with the next one's config.
            fd = _open_regular(weights, directory, dir_fd)
            if fd is None:
                if _swapped(directory, dir_fd, attempt):
                    continue
                _refuse_pickles(directory)
                raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
            try:
                config, raw = _read_config(directory / CONFIG_NAME, dir_fd)
            except FileNotFoundError:
                if _swapped(directory, dir_fd, attempt):  # emptied by the save that replaced it
                    continue
                raise
            tensors, metadata = read_tensors(fd, weights)
            break
        finally:
            if fd is not None:
                os.close(fd)
            os.close(dir_fd)
    if not allow_nonfinite:
        _refuse_nonfinite(tensors, weights)
    saved_with = metadata.get(_CONFIG_HASH)
    if saved_with is not None and saved_with != _sha256(raw):
        # A hand edit (say, of base_model_name_or_path) is legitimate, so this warns; keys and shapes are still
        # checked against the model, and a config that does not fit is refused there.
        warnings.warn(
            f"{directory / CONFIG_NAME} is not the config {WEIGHTS_NAME} was saved with: it was edited, read "
            "while a save replaced the directory, or the files come from two adapters",
            stacklevel=3,
        )
    return config, tensors


def read_adapter_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Only the adapter's `adapter_config.json` (either format), e.g. to find the base model it names.

    Raises:
        FileNotFoundError: the directory or its config is missing.
        AdapterFileError: the config is not a regular file or not a JSON object (see `read_adapter`).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no adapter directory {directory}")
    return _read_config(directory / CONFIG_NAME)[0]
