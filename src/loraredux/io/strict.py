"""Strict readers of the bytes of adapter files: JSON that every reader reads alike, and safetensors files parsed
here rather than by safetensors (whose parser keeps the last of two equal keys and trusts the header's sizes).

Everything refused raises `AdapterFileError`, naming the file and what is wrong in it.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["AdapterFileError", "json_kind", "parse_json", "read_all", "read_tensors"]


class AdapterFileError(ValueError):
    """A directory whose adapter files cannot be read (missing, corrupt, pickled or of an unknown format)."""


# Bounds on what a reader builds before it knows a file is sane: the deepest field of an adapter config (AdaLoRA's
# rank_pattern of masks) nests 3 levels.
_MAX_DEPTH = 64
# safetensors' dtype names: (torch dtype name, bytes per element)
_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1),
    "C64": ("complex64", 8),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
_DTYPES_BY_TORCH = {
    getattr(torch, name): width for name, width in _DTYPES.values() if hasattr(torch, name)
}


def read_all(fd: int, size: int) -> bytes:
    chunks = []
    while size > 0 and (chunk := os.read(fd, min(size, 1 << 24))):
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


class _JSONProblem(ValueError):
    """Raised from inside `json.loads` by the hooks below (a duplicate key, NaN / Infinity)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal keys silently; safetensors' own parser does the same, so a file whose
    # header or config says one thing to one reader and another to the next is refused.
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _JSONProblem(f"the key {key!r} appears twice in one object")
        seen[key] = value
    return seen


def _no_constant(name: str) -> Any:
    raise _JSONProblem(f"{name} is not JSON (Python's json reads it, other readers do not)")


def _depth(value: Any) -> int:
    """How deeply `value` nests lists and objects (iteratively: no recursion on a hostile file)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            if level <= _MAX_DEPTH:
                stack += [(x, level + 1) for x in item]
    return deepest


def parse_json(raw: bytes, where: str) -> Any:
    """JSON from `raw` (UTF-8), refusing duplicate keys, NaN / Infinity and deep nesting.

    Raises:
        AdapterFileError: naming `where` and the problem.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise AdapterFileError(
            f"{where} is not UTF-8 text (byte {err.start}: {err.reason}); expected JSON"
        ) from err
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except _JSONProblem as err:
        raise AdapterFileError(f"{where} is not valid JSON: {err}") from err
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{where} is not valid JSON: {err}") from err
    except RecursionError as err:
        raise AdapterFileError(
            f"{where} nests JSON too deeply to be an adapter file (at most {_MAX_DEPTH} levels)"
        ) from err
    if _depth(value) > _MAX_DEPTH:
        raise AdapterFileError(
            f"{where} nests JSON more than {_MAX_DEPTH} levels deep; an adapter file does not"
        )
    return value


def json_kind(value: Any) -> str:
    kinds = ((dict, "an object"), (list, "an array"), (str, "a string"), (bool, "a boolean"))
    kinds += (((int, float), "a number"),)
    return next((words for cls, words in kinds if isinstance(value, cls)), "null")


def _header_entry(name: str, entry: Any, where: str) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, begin, end) of one tensor's header entry, every field checked."""
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        got = sorted(entry) if isinstance(entry, dict) else json_kind(entry)
        raise AdapterFileError(
            f"{where}: tensor {name!r} must be described by {sorted(_ENTRY_KEYS)}, got {got}"
        )
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    known = {k: v for k, v in _DTYPES.items() if hasattr(torch, v[0])}
    if not isinstance(code, str) or code not in known:
        raise AdapterFileError(
            f"{where}: tensor {name!r} has dtype {code!r}; safetensors' dtypes are {sorted(known)}"
        )
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise AdapterFileError(
            f"{where}: tensor {name!r} has shape {shape!r}; expected a list of integers >= 0"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_size, offsets))):
        raise AdapterFileError(
            f"{where}: tensor {name!r} has data_offsets {offsets!r}; expected [begin, end], integers >= 0"
        )
    begin, end = offsets
    torch_name, size = known[code]
    need = math.prod(shape) * size
    if end < begin or end - begin != need:
        raise AdapterFileError(
            f"{where}: tensor {name!r} has data_offsets [{begin}, {end}], but its dtype {code} and shape "
            f"{shape} need {need} bytes"
        )
    return getattr(torch, torch_name), shape, begin, end


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


def _check_layout(
    entries: dict[str, tuple[Any, Any, int, int]], data_size: int, where: str
) -> None:
    """The tensors' byte ranges must tile the data exactly, as safetensors writes them: no range past the end,
    none overlapping another, no gap and nothing after the last."""
    past = [(n, e) for n, (_, _, _, e) in entries.items() if e > data_size]
    if past:
        name, end = past[0]
        raise AdapterFileError(
            f"{where}: tensor {name!r} ends at byte {end} of the data, but the file holds {data_size} bytes "
            "after its header: it is truncated or corrupt; save the adapter again"
        )
    at, previous = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin < at:
            raise AdapterFileError(
                f"{where}: tensor {name!r} (data_offsets [{begin}, {end}]) overlaps tensor {previous!r}"
            )
        if begin > at:
            raise AdapterFileError(
                f"{where}: bytes [{at}, {begin}) of the data belong to no tensor (before {name!r})"
            )
        at, previous = end, name
    if at != data_size:
        raise AdapterFileError(
            f"{where}: {data_size - at} byte(s) after the last tensor belong to no tensor"
        )


def _parse_header(buffer: Any, size: int, path: Path) -> tuple[dict[str, Any], dict[str, str], int]:
    """The checked header of a safetensors file: ({name: (dtype, shape, begin, end)}, metadata, where the
    data starts). The format is an 8-byte little-endian header length, a JSON header, then the data."""
    (length,) = struct.unpack("<Q", buffer[:8])
    if length > size - 8:
        raise AdapterFileError(
            f"{path}: its safetensors header claims {length} bytes, but only {size - 8} follow: the file is "
            "truncated or corrupt; save the adapter again"
        )
    where = f"{path} (safetensors header)"
    header = parse_json(bytes(buffer[8 : 8 + length]), where)
    if not isinstance(header, dict):
        raise AdapterFileError(f"{where} must be a JSON object, found {json_kind(header)}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise AdapterFileError(f"{where}: __metadata__ must map strings to strings")
    entries = {name: _header_entry(name, entry, where) for name, entry in header.items()}
    _check_layout(entries, size - 8 - length, where)
    return entries, metadata, 8 + length


def _decode(buffer: Any, entries: dict[str, Any], start: int, path: Path) -> dict[str, Tensor]:
    """The tensors, each copied out of `buffer` into its own memory."""
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        try:
            if begin == end:
                tensors[name] = torch.empty(shape, dtype=dtype)
                continue
            width = _DTYPES_BY_TORCH[dtype]
            flat = torch.frombuffer(
                buffer, dtype=torch.uint8, count=end - begin, offset=start + begin
            )
            if dtype == torch.bool and bool((flat > 1).any()):
                raise AdapterFileError(
                    f"{path}: bool tensor {name!r} holds bytes other than 0 and 1"
                )
            if sys.byteorder == "big" and width > 1:  # safetensors is little-endian
                flat = flat.view(-1, width).flip(1).reshape(-1)
            tensors[name] = flat.view(dtype).reshape(shape).clone()
            del flat
        except (RuntimeError, ValueError, OverflowError) as err:
            if isinstance(err, AdapterFileError):
                raise
            raise AdapterFileError(f"{path}: tensor {name!r} cannot be read ({err})") from err
    return tensors


def read_tensors(fd: int, path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of the safetensors file open as `fd`, parsed here (not by safetensors, whose
    parser keeps the last of two equal keys) and copied out of a private memory map."""
    size = os.fstat(fd).st_size
    if size < 8:
        raise AdapterFileError(
            f"{path} is {size} bytes long, shorter than a safetensors header: it is truncated or corrupt; "
            "save the adapter again"
        )
    try:  # ACCESS_COPY: writable for torch.frombuffer, never written back to the file
        buffer: Any = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):  # a file system without memory maps
        buffer = bytearray(read_all(fd, size))
    try:
        entries, metadata, start = _parse_header(buffer, size, path)
        return _decode(buffer, entries, start, path), metadata
    finally:
        if isinstance(buffer, mmap.mmap):
            # a view still alive (held by a traceback) forbids closing: the GC closes the map then
            with contextlib.suppress(BufferError):
                buffer.close()
