"""The adapter loader against corrupt, hostile and odd adapter directories.

A fixed, named set of corruptions of valid adapters (PEFT's format, loraredux's own, and a PiSSA adapter in
loraredux's own, whose load moves the base) and a byte- and field-mutation fuzz. Every outcome is either a
loraredux error naming the file or field (and the model bit-identical to before), or a load of exactly what the
file holds, after which `lx.unadapt_` gives back the original weights bit for bit. Nothing may hang: each load
runs under an alarm, and a FIFO is never opened.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import loraredux as lx
from loraredux.io import AdapterFileError
from tiny_models import assert_unchanged, snapshot, tiny_llama

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
ERRORS = (AdapterFileError, ValueError, TypeError, FileNotFoundError)
SOURCES = ("peft", "native", "pissa")
Q_PATH = "model.layers.0.self_attn.q_proj"

# Hand-edited configs are reported by the config-hash check; that warning is not what these tests are about.
pytestmark = pytest.mark.filterwarnings("ignore:.*is not the config", "ignore:.*replaces the base")


def make_adapter(directory: Path, source: str) -> Path:
    init = {"init": "pissa"} if source == "pissa" else {}
    model = lx.adapt_(tiny_llama(), lx.config("lora", rank=4, **init), ["q_proj", "v_proj"])
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # nonzero B: an adapter that matters, so a wrong load cannot pass
        for p in lx.trainable_parameters(model).values():
            p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return lx.save_adapter(model, directory, format="peft" if source == "peft" else "native")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {source: make_adapter(root / source, source) for source in SOURCES}


@pytest.fixture(scope="module")
def references(sources: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter state each intact source loads as."""
    return {s: lx.adapter_state_dict(lx.load_adapter(tiny_llama(), d)) for s, d in sources.items()}


@contextlib.contextmanager
def alarm(seconds: int = 20) -> Iterator[None]:
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""

    def hung(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the loader was still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def load(
    directory: Path, allow_nonfinite: bool = False
) -> tuple[torch.nn.Module, Exception | None]:
    """Load into a fresh tiny Llama; on a failure, check the model is exactly as before."""
    model = tiny_llama()
    before = snapshot(model)
    try:
        with alarm():
            lx.load_adapter(model, directory, allow_nonfinite=allow_nonfinite)
    except ERRORS as err:
        assert_unchanged(model, before)
        assert not list(lx.adapters(model))
        assert str(directory) in str(err), f"the error does not name the adapter: {err}"
        return model, err
    return model, None


def assert_unadapt_restores(model: torch.nn.Module) -> None:
    lx.unadapt_(model)
    assert_unchanged(model, snapshot(tiny_llama()))


def assert_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = lx.adapter_state_dict(model)
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


# ----------------------------------------------------------------------------------------------- raw files


def read_raw(path: Path) -> tuple[dict[str, Any], bytes]:
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def write_raw(
    path: Path, header: dict[str, Any] | bytes, data: bytes, length: int | None = None
) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def edit_header(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def corrupt(d: Path) -> None:
        header, data = read_raw(d / WEIGHTS)
        edit(header)
        write_raw(d / WEIGHTS, header, data)

    return corrupt


def grow_last_tensor(header: dict[str, Any]) -> None:
    """The last tensor claims twice its rows, consistently with its data_offsets: it runs past the file."""
    entry = by_offset(header, -1)
    begin, end = entry["data_offsets"]
    entry["shape"][0] *= 2
    entry["data_offsets"] = [begin, begin + 2 * (end - begin)]


def first_tensor(header: dict[str, Any]) -> dict[str, Any]:
    return header[next(k for k in header if k != "__metadata__")]


def by_offset(header: dict[str, Any], index: int) -> dict[str, Any]:
    entries = sorted(
        (v for k, v in header.items() if k != "__metadata__"), key=lambda e: e["data_offsets"]
    )
    return entries[index]


def truncate(keep: Callable[[int, int], int]) -> Callable[[Path], None]:
    """Keep `keep(size, data_start)` bytes of the weights."""

    def corrupt(d: Path) -> None:
        blob = (d / WEIGHTS).read_bytes()
        start = 8 + struct.unpack("<Q", blob[:8])[0]
        (d / WEIGHTS).write_bytes(blob[: keep(len(blob), start)])

    return corrupt


def set_length(length: Callable[[int], int]) -> Callable[[Path], None]:
    def corrupt(d: Path) -> None:
        blob = (d / WEIGHTS).read_bytes()
        (real,) = struct.unpack("<Q", blob[:8])
        (d / WEIGHTS).write_bytes(struct.pack("<Q", length(real)) + blob[8:])

    return corrupt


def replace_header_bytes(raw: bytes) -> Callable[[Path], None]:
    def corrupt(d: Path) -> None:
        _, data = read_raw(d / WEIGHTS)
        write_raw(d / WEIGHTS, raw, data)

    return corrupt


def edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def corrupt(d: Path) -> None:
        tensors = load_file(d / WEIGHTS)
        edit(tensors)
        save_file(tensors, d / WEIGHTS)

    return corrupt


def key_like(tensors: dict[str, Any], suffix: str) -> str:
    return next(k for k in sorted(tensors) if Q_PATH in k and k.endswith(suffix))


def retype(suffix: str, dtype: torch.dtype) -> Callable[[Path], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        key = key_like(t, suffix)
        t[key] = (t[key] * 100).to(dtype)

    return edit_tensors(edit)


def poke(suffix: str, value: float) -> Callable[[Path], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[key_like(t, suffix)][0, 0] = value

    return edit_tensors(edit)


def scale(suffix: str, factor: float) -> Callable[[Path], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        key = key_like(t, suffix)
        t[key] = t[key] * factor

    return edit_tensors(edit)


def overflow_pissa(d: Path) -> None:
    """Finite A0, B0 whose product s B0 A0 overflows to Inf in the new base."""
    tensors = load_file(d / WEIGHTS)
    tensors[key_like(tensors, ".B0")][0, :2] = 1e308
    tensors[key_like(tensors, ".A0")][:2, 0] = 10.0
    save_file(tensors, d / WEIGHTS)


def duplicate_header_key(d: Path) -> None:
    """Two entries for one tensor: safetensors' parser keeps the second (which points at other bytes)."""
    header, data = read_raw(d / WEIGHTS)
    name = key_like(header, "lora_B.weight")
    other = dict(header[key_like(header, "lora_A.weight")])
    text = json.dumps(header)[:-1] + f", {json.dumps(name)}: {json.dumps(other)}}}"
    write_raw(d / WEIGHTS, text.encode(), data)


# ----------------------------------------------------------------------------------------------- configs


def edit_config(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def corrupt(d: Path) -> None:
        config = json.loads((d / CONFIG).read_text())
        edit(config)
        (d / CONFIG).write_text(json.dumps(config))

    return corrupt


def set_field(key: str, value: Any) -> Callable[[Path], None]:
    return edit_config(lambda c: c.__setitem__(key, value))


def drop_field(key: str) -> Callable[[Path], None]:
    return edit_config(lambda c: c.pop(key))


def set_layer_field(key: str, value: Any) -> Callable[[Path], None]:
    """In a native config: one field of every layer's config and of the shared one."""

    def edit(config: dict[str, Any]) -> None:
        for layer in [config["config"], *config["layers"].values()]:
            layer[key] = value

    return edit_config(edit)


def write_config(raw: bytes) -> Callable[[Path], None]:
    return lambda d: (d / CONFIG).write_bytes(raw)


def nested(levels: int) -> bytes:
    return b'{"r": ' + b"[" * levels + b"]" * levels + b"}"


def duplicate_config_key(d: Path) -> None:
    text = (d / CONFIG).read_text().rstrip()
    (d / CONFIG).write_text(text[:-1] + ', "r": 4}')


# ----------------------------------------------------------------------------------------------- entries


def replace_with_fifo(name: str) -> Callable[[Path], None]:
    def corrupt(d: Path) -> None:
        (d / name).unlink()
        os.mkfifo(d / name)

    return corrupt


def replace_with_link(name: str, target: Callable[[Path], str]) -> Callable[[Path], None]:
    def corrupt(d: Path) -> None:
        where = target(d)
        (d / name).unlink()
        os.symlink(where, d / name)

    return corrupt


def outside_copy(d: Path) -> str:
    """A valid copy of the weights beside (not inside) the adapter directory."""
    copy = d.parent / f"{d.name}-elsewhere.safetensors"
    shutil.copy(d / WEIGHTS, copy)
    return str(copy)


def inside_copy(d: Path) -> str:
    shutil.copy(d / WEIGHTS, d / "real.safetensors")
    return "real.safetensors"


def replace_with_directory(name: str) -> Callable[[Path], None]:
    def corrupt(d: Path) -> None:
        (d / name).unlink()
        (d / name).mkdir()

    return corrupt


def only_a_pickle(d: Path) -> None:
    (d / WEIGHTS).unlink()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04 a pickle that must never be opened")


# ----------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    corrupt: Callable[[Path], None]
    match: str | None  # a regex the error must hold; None: the load must succeed
    source: str = "peft"
    error: type[Exception] = AdapterFileError
    allow_nonfinite: bool = False


def refused(corrupt, match, source="peft", error=AdapterFileError, **kw) -> Case:
    return Case(corrupt, match, source, error, **kw)


def loads(corrupt, source="peft") -> Case:
    return Case(corrupt, None, source)


TRUNCATED = "truncated or corrupt"
NONFINITE = r"q_proj.*holds 1 NaN or infinite value.*allow_nonfinite=True"
B_ID = "lora_B.weight"

CASES: dict[str, Case] = {
    # -- truncation and the header length
    "truncated-empty": refused(truncate(lambda n, s: 0), TRUNCATED),
    "truncated-7-bytes": refused(truncate(lambda n, s: 7), TRUNCATED),
    "truncated-in-header": refused(truncate(lambda n, s: s // 2), "header claims .*" + TRUNCATED),
    "truncated-at-data": refused(truncate(lambda n, s: s), TRUNCATED),
    "truncated-half-data": refused(truncate(lambda n, s: (n + s) // 2), TRUNCATED),
    "truncated-last-byte": refused(truncate(lambda n, s: n - 1), TRUNCATED),
    "header-length-huge": refused(set_length(lambda n: 1 << 62), "claims 4611686018427387904"),
    "header-length-max": refused(set_length(lambda n: (1 << 64) - 1), "header claims"),
    "header-length-zero": refused(
        set_length(lambda n: 0), r"safetensors header\) is not valid JSON"
    ),
    # safetensors pads its header with spaces: one byte less still parses, then a byte is left over
    "header-length-short": refused(set_length(lambda n: n - 1), "header.*(not valid JSON|1 byte)"),
    "header-length-much-shorter": refused(set_length(lambda n: n // 2), "header.*not valid JSON"),
    "header-length-long": refused(set_length(lambda n: n + 1), r"header\) is not valid JSON"),
    # -- the header's JSON
    "header-garbage": refused(replace_header_bytes(b"{not json at all"), "header.*not valid JSON"),
    "header-not-object": refused(replace_header_bytes(b"[1, 2, 3]"), "must be a JSON object"),
    "header-not-utf8": refused(replace_header_bytes(b'{"\xff": 1}'), "header.*not UTF-8"),
    "header-nan-literal": refused(replace_header_bytes(b'{"a": NaN}'), "NaN is not JSON"),
    "header-nested-deep": refused(replace_header_bytes(nested(100_000)), "nests JSON too deeply"),
    "header-duplicate-key": refused(duplicate_header_key, r"'.*lora_B\.weight' appears twice"),
    "header-metadata-not-strings": refused(
        edit_header(lambda h: h.__setitem__("__metadata__", {"format": 1})), "__metadata__ must"
    ),
    "header-entry-extra-field": refused(
        edit_header(lambda h: first_tensor(h).__setitem__("crc", 0)), r"must be described by"
    ),
    "header-entry-not-object": refused(
        edit_header(lambda h: h.__setitem__(key_like(h, B_ID), [1])), "must be described by"
    ),
    # -- data_offsets, dtypes and shapes in the header
    "offsets-past-end": refused(
        edit_header(grow_last_tensor), r"lora_B\.weight' ends at byte \d+ of the data.*truncated"
    ),
    "offsets-overlapping": refused(
        edit_header(
            lambda h: by_offset(h, 1).__setitem__("data_offsets", by_offset(h, 0)["data_offsets"])
        ),
        "overlaps tensor",
    ),
    "offsets-gap": refused(
        edit_header(lambda h: h.pop(next(k for k, v in h.items() if v is by_offset(h, 0)))),
        r"bytes \[0, 512\) of the data belong to no tensor",
    ),
    "offsets-reversed": refused(
        edit_header(lambda h: first_tensor(h).__setitem__("data_offsets", [64, 0])), "need"
    ),
    "offsets-negative": refused(
        edit_header(lambda h: first_tensor(h).__setitem__("data_offsets", [-8, 0])), "data_offsets"
    ),
    "offsets-strings": refused(
        edit_header(lambda h: first_tensor(h).__setitem__("data_offsets", ["0", "8"])),
        "data_offsets",
    ),
    "trailing-bytes": refused(
        lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes() + b"\0" * 8),
        "after the last tensor",
    ),
    "header-dtype-unknown": refused(
        edit_header(lambda h: first_tensor(h).__setitem__("dtype", "F128")), "dtype 'F128'"
    ),
    "header-shape-negative": refused(
        edit_header(lambda h: first_tensor(h).__setitem__("shape", [-4, 16])), "shape"
    ),
    "header-shape-bigger": refused(
        edit_header(lambda h: first_tensor(h).__setitem__("shape", [8, 16])), "need"
    ),
    # -- tensors: dtypes, values, names and shapes against the model
    "dtype-int64": refused(retype(B_ID, torch.int64), r"dtype mismatch.*int64", error=ValueError),
    "dtype-int32": refused(retype(B_ID, torch.int32), r"dtype mismatch.*int32", error=ValueError),
    "dtype-uint8": refused(retype(B_ID, torch.uint8), r"dtype mismatch.*uint8", error=ValueError),
    "dtype-bool": refused(
        retype(B_ID, torch.bool), r"dtype mismatch.*torch\.bool", error=ValueError
    ),
    "dtype-complex64": refused(
        retype(B_ID, torch.complex64), r"dtype mismatch.*complex64", error=ValueError
    ),
    "dtype-int64-native": refused(
        retype("B", torch.int64), r"dtype mismatch.*int64", "native", ValueError
    ),
    "nan": refused(poke(B_ID, float("nan")), NONFINITE),
    "plus-inf": refused(poke(B_ID, float("inf")), NONFINITE),
    "minus-inf": refused(poke("lora_A.weight", float("-inf")), NONFINITE),
    "nan-native": refused(poke(".A", float("nan")), NONFINITE, "native"),
    "shape-transposed": refused(
        edit_tensors(
            lambda t: t.__setitem__(key_like(t, B_ID), t[key_like(t, B_ID)].T.contiguous())
        ),
        r"shape mismatch.*lora_B\.weight: file \(4, 16\) vs layer \(16, 4\)",
        error=ValueError,
    ),
    "shape-extra-dim": refused(
        edit_tensors(lambda t: t.__setitem__(key_like(t, B_ID), t[key_like(t, B_ID)][None])),
        "shape mismatch",
        error=ValueError,
    ),
    "shape-native": refused(
        edit_tensors(lambda t: t.__setitem__(key_like(t, ".A"), torch.zeros(3, 16))),
        r"shape mismatch.*q_proj\.A",
        "native",
        ValueError,
    ),
    "tensor-missing": refused(
        edit_tensors(lambda t: t.pop(key_like(t, B_ID))),
        r"q_proj.*missing \['lora_B\.weight'\]",
        error=ValueError,
    ),
    "tensor-missing-native": refused(
        edit_tensors(lambda t: t.pop(key_like(t, ".B"))),
        r"missing \[.*q_proj\.B'\]",
        "native",
        ValueError,
    ),
    "tensor-extra": refused(
        edit_tensors(
            lambda t: t.__setitem__(
                "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", torch.zeros(4, 16)
            )
        ),
        r"does not adapt.*up_proj",
        error=ValueError,
    ),
    "tensor-extra-native": refused(
        edit_tensors(lambda t: t.__setitem__("model.layers.0.mlp.up_proj.A", torch.zeros(4, 16))),
        r"unexpected \['model\.layers\.0\.mlp\.up_proj\.A'\]",
        "native",
        ValueError,
    ),
    # -- the config file itself
    "config-empty": refused(write_config(b""), "adapter_config.json is empty"),
    "config-whitespace": refused(write_config(b" \n\t"), "adapter_config.json is empty"),
    "config-garbage": refused(write_config(b"{not json"), "adapter_config.json is not valid JSON"),
    "config-array": refused(write_config(b"[1, 2]"), "must hold a JSON object, found an array"),
    "config-string": refused(write_config(b'"LORA"'), "must hold a JSON object, found a string"),
    "config-latin1": refused(write_config('{"r": "é"}'.encode("latin-1")), "not UTF-8"),
    "config-utf16": refused(write_config('{"r": 4}'.encode("utf-16")), "not UTF-8"),
    "config-nested-100000": refused(write_config(nested(100_000)), "nests JSON too deeply"),
    "config-nested-100": refused(write_config(nested(100)), "more than 64 levels"),
    "config-duplicate-key": refused(duplicate_config_key, "'r' appears twice"),
    "config-nan-literal": refused(
        lambda d: (d / CONFIG).write_text(
            (d / CONFIG).read_text().replace('"lora_dropout": 0.0', '"lora_dropout": NaN')
        ),
        "NaN is not JSON",
    ),
    # -- PEFT config fields
    "r-string": refused(
        set_field("r", "8"), "adapter_config.json: 'r' must be an integer, got str '8'"
    ),
    "r-float": refused(set_field("r", 4.0), "'r' must be an integer, got float 4.0"),
    "r-true": refused(set_field("r", True), "'r' must be an integer, got bool True"),
    "r-zero": refused(set_field("r", 0), "rank must be an integer >= 1", error=ValueError),
    "r-huge": refused(set_field("r", 10**30), r"rank 10{30} is above min", error=ValueError),
    "r-other": refused(
        set_field("r", 2), r"shape mismatch.*\(4, 16\) vs layer \(2, 16\)", error=ValueError
    ),
    "lora_alpha-string": refused(
        set_field("lora_alpha", "8"), "'lora_alpha' must be a number, got str"
    ),
    "lora_alpha-list": refused(
        set_field("lora_alpha", [8]), "'lora_alpha' must be a number, got list"
    ),
    "lora_alpha-zero": refused(
        set_field("lora_alpha", 0), "alpha must be a finite number > 0", error=ValueError
    ),
    "lora_alpha-negative": refused(
        set_field("lora_alpha", -1), "alpha must be a finite number > 0", error=ValueError
    ),
    "use_rslora-string": refused(
        set_field("use_rslora", "false"), "'use_rslora' must be true or false, got str 'false'"
    ),
    "use_rslora-int": refused(set_field("use_rslora", 0), "'use_rslora' must be true or false"),
    "lora_dropout-string": refused(
        set_field("lora_dropout", "0.1"), "'lora_dropout' must be a number"
    ),
    "target_modules-int": refused(
        set_field("target_modules", 7), "'target_modules' must be a regex string or a list"
    ),
    "target_modules-ints": refused(set_field("target_modules", [1, 2]), "'target_modules' must be"),
    "target_modules-empty": refused(
        set_field("target_modules", []), "no target_modules", error=ValueError
    ),
    "target_modules-unmatched": refused(
        set_field("target_modules", ["nope_proj"]),
        "targets.*nope_proj.*match no module",
        error=ValueError,
    ),
    "target_modules-bad-regex": refused(
        set_field("target_modules", "q_proj("), "not a valid regular expression", error=ValueError
    ),
    "modules_to_save-string": refused(
        set_field("modules_to_save", "lm_head"), "'modules_to_save' must be a list"
    ),
    "rank_pattern-list": refused(
        set_field("rank_pattern", [4]), "'rank_pattern' must be an object"
    ),
    "rank_pattern-string-rank": refused(
        set_field("rank_pattern", {"q_proj": "4"}),
        "q_proj.*rank must be an integer",
        error=ValueError,
    ),
    "peft_type-unknown": refused(
        set_field("peft_type", "LORA_XL"), "unknown peft_type 'LORA_XL'", error=ValueError
    ),
    "peft_type-int": refused(set_field("peft_type", 3), "'peft_type' must be a string, got int 3"),
    "peft_type-missing": refused(drop_field("peft_type"), "neither a PEFT config"),
    "task_type-list": refused(
        set_field("task_type", ["CAUSAL_LM"]), "'task_type' must be a string or null"
    ),
    "use_dora-true": refused(
        set_field("use_dora", True), "lora_magnitude_vector", error=ValueError
    ),
    "layers_to_transform": refused(
        set_field("layers_to_transform", [0]), "layers_to_transform", error=ValueError
    ),
    # -- loraredux's own config
    "native-version-newer": refused(
        set_field("format_version", 2), "format_version 2 is newer.*upgrade loraredux", "native"
    ),
    "native-version-zero": refused(
        set_field("format_version", 0),
        r"'format_version' must be the integer 1.*got int 0$",
        "native",
    ),
    "native-version-string": refused(
        set_field("format_version", "1"),
        r"'format_version' must be the integer 1 .*got str '1'$",
        "native",
    ),
    "native-version-missing": refused(
        drop_field("format_version"),
        "'format_version' must be the integer 1.*got nothing",
        "native",
    ),
    "native-config-missing": refused(
        drop_field("config"), "'config' must be an object.*got nothing", "native"
    ),
    "native-config-list": refused(
        set_field("config", [1]), "'config' must be an object.*got list", "native"
    ),
    "native-layers-missing": refused(drop_field("layers"), "'layers' must be an object", "native"),
    "native-layers-empty": refused(
        set_field("layers", {}), "'layers' must name at least one layer", "native"
    ),
    "native-layer-string": refused(
        edit_config(lambda c: c["layers"].__setitem__(next(iter(c["layers"])), "lora")),
        r"layers\['model.*'\] must be an object",
        "native",
    ),
    "native-rank-string": refused(
        set_layer_field("rank", "4"),
        r"'config': lora: rank must be an integer >= 1, got '4'",
        "native",
    ),
    "native-rslora-string": refused(
        set_layer_field("rslora", "false"),
        r"lora: rslora must be true or false, got str 'false'",
        "native",
    ),
    "native-init_options-list": refused(
        set_layer_field("init_options", [1]), r"init_options must be a dict", "native"
    ),
    "native-unknown-field": refused(
        set_layer_field("colour", "red"), r"no field\(s\) \['colour'\]", "native"
    ),
    "native-method-unknown": refused(set_field("method", "lorax"), "mixes methods", "native"),
    "native-method-int": refused(
        set_field("method", 1), "'method' must be a method name", "native"
    ),
    "native-method-in-config-int": refused(
        set_layer_field("method", 1), "'method' must be a string, got int 1", "native"
    ),
    "native-modules_to_save-string": refused(
        set_field("modules_to_save", "lm_head"), "'modules_to_save' must be a list", "native"
    ),
    "native-format-unknown": refused(
        set_field("format", "loraredux-2"), "neither a PEFT config", "native"
    ),
    # -- what is in place of the files
    "pickle-only": refused(only_a_pickle, r"adapter_model\.bin.*never unpickles"),
    "weights-missing": refused(
        lambda d: (d / WEIGHTS).unlink(), "no adapter_model.safetensors", error=FileNotFoundError
    ),
    "config-missing": refused(
        lambda d: (d / CONFIG).unlink(), "no adapter_config.json", error=FileNotFoundError
    ),
    "directory-missing": refused(shutil.rmtree, "no adapter directory", error=FileNotFoundError),
    "weights-fifo": refused(replace_with_fifo(WEIGHTS), r"adapter_model\.safetensors is a FIFO"),
    "config-fifo": refused(replace_with_fifo(CONFIG), r"adapter_config\.json is a FIFO"),
    "weights-directory": refused(
        replace_with_directory(WEIGHTS),
        "adapter_model.safetensors is a directory, not a regular file",
    ),
    "config-directory": refused(
        replace_with_directory(CONFIG), "adapter_config.json is a directory, not a regular file"
    ),
    "weights-link-dev-zero": refused(
        replace_with_link(WEIGHTS, lambda d: "/dev/zero"),
        r"symlink pointing outside the adapter directory \(to /dev/zero, a character device\)",
    ),
    "config-link-dev-zero": refused(
        replace_with_link(CONFIG, lambda d: "/dev/zero"),
        "adapter_config.json is a symlink pointing outside",
    ),
    "weights-link-outside": refused(
        replace_with_link(WEIGHTS, outside_copy), "symlink pointing outside.*a regular file"
    ),
    "weights-link-dangling": refused(
        replace_with_link(WEIGHTS, lambda d: "gone.safetensors"),
        "gone.safetensors, which cannot be read",
    ),
    "weights-link-inside": loads(replace_with_link(WEIGHTS, inside_copy)),
    # -- PiSSA, whose load moves the base weight
    "pissa-nan-B0": refused(poke(".B0", float("nan")), r"q_proj\.B0' holds 1 NaN", "pissa"),
    "pissa-nan-B0-allowed": refused(
        poke(".B0", float("nan")),
        r"layer 'model\.layers\.0\.self_attn\.q_proj': init 'pissa': the base weight .* NaN or infinite",
        "pissa",
        ValueError,
        allow_nonfinite=True,
    ),
    "pissa-inf-A0-allowed": refused(
        poke(".A0", float("inf")),
        r"q_proj': init 'pissa'.*NaN or infinite",
        "pissa",
        ValueError,
        allow_nonfinite=True,
    ),
    "pissa-overflowing-B0": refused(
        overflow_pissa, r"q_proj': init 'pissa'.*NaN or infinite", "pissa", ValueError
    ),
    "pissa-huge-B0": refused(
        scale(".B0", 1e200),
        r"q_proj': init 'pissa': the loaded A0, B0 are too large",
        "pissa",
        ValueError,
    ),
    "pissa-missing-B0": refused(
        edit_tensors(lambda t: t.pop(key_like(t, ".B0"))),
        r"missing \['model\.layers\.0\.self_attn\.q_proj\.B0'\]",
        "pissa",
        ValueError,
    ),
    "pissa-int-A0": refused(
        retype(".A0", torch.int64), r"dtype mismatch.*q_proj\.A0", "pissa", ValueError
    ),
    # -- odd but valid: loads exactly what the file holds
    "peft-unknown-field": loads(set_field("a_field_of_a_newer_peft", {"x": 1})),
    "peft-init-pissa-name": loads(set_field("init_lora_weights", "pissa")),
    "peft-edited-base-name": loads(set_field("base_model_name_or_path", "elsewhere/llama")),
    "peft-alpha-as-int": loads(set_field("lora_alpha", 8)),
    "native-intact": loads(lambda d: None, "native"),
}


def copy_source(sources: dict[str, Path], source: str, where: Path) -> Path:
    directory = where / "adapter"
    shutil.copytree(sources[source], directory)
    return directory


@pytest.mark.parametrize("name", list(CASES))
def test_corruption(
    name: str, sources: dict[str, Path], references: dict[str, Any], tmp_path: Path
) -> None:
    case = CASES[name]
    directory = copy_source(sources, case.source, tmp_path)
    case.corrupt(directory)
    model, err = load(directory, case.allow_nonfinite)
    if case.match is None:
        assert err is None, f"refused: {err}"
        assert_state(model, references[case.source])
        assert_unadapt_restores(model)
        return
    assert err is not None, "the corrupt adapter loaded"
    assert isinstance(err, case.error), f"{type(err).__name__}: {err}"
    assert re.search(case.match, str(err)), f"{case.match!r} not in: {err}"


def poke_last_layer(suffix: str, value: float) -> Callable[[Path], None]:
    """A bad value in the last adapted layer: every earlier layer has loaded (and computed its move) by then."""

    def edit(t: dict[str, torch.Tensor]) -> None:
        key = max(k for k in t if k.endswith(suffix))
        t[key][0, 0] = value

    return edit_tensors(edit)


CASES["pissa-nan-B0-last-layer-allowed"] = refused(
    poke_last_layer(".B0", float("nan")),
    r"layer 'model\.layers\.1\.self_attn\.v_proj': init 'pissa'.*NaN or infinite",
    "pissa",
    ValueError,
    allow_nonfinite=True,
)


@pytest.mark.parametrize("name", ["nan", "nan-native"])
def test_allow_nonfinite_loads_the_values_as_they_are(
    name: str, sources: dict[str, Path], references: dict[str, Any], tmp_path: Path
) -> None:
    """The escape hatch loads exactly the file (NaN where it has one), and unadapt_ still restores the base."""
    case = CASES[name]
    directory = copy_source(sources, case.source, tmp_path)
    case.corrupt(directory)
    model, err = load(directory, allow_nonfinite=True)
    assert err is None, err
    state = lx.adapter_state_dict(model)
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    assert len(bad) == 1 and Q_PATH in bad[0]
    for key, value in references[case.source].items():
        if key not in bad:
            assert torch.equal(state[key], value), key
    assert_unadapt_restores(model)


def test_a_pissa_load_moves_the_base_last_and_unadapt_gives_it_back(
    sources: dict[str, Path],
) -> None:
    """The base is moved (W_res = W0 - s B0 A0) only by the commit; unadapt_ computes W0 back from W_res, which
    is W0 up to rounding (as after lx.adapt_ with PiSSA: the original weight is not kept, to save memory)."""
    model = tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lx.load_adapter(model, sources["pissa"])
    layer = dict(lx.adapters(model))[Q_PATH]
    W0 = original[f"{Q_PATH}.weight"]
    expected = torch.addmm(W0, layer.B0, layer.A0, alpha=-layer.scale)
    assert torch.equal(layer.base.weight, expected)
    lx.unadapt_(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=1e-15, msg=key)


# ----------------------------------------------------------------------------------------------- fuzz

FUZZ_SOURCES = (
    "peft",
    "native",
)  # LoRA: a successful load is checked bit for bit, unadapt_ included
_PEFT_NAMES = {"lora_A.weight": "A", "lora_B.weight": "B"}


def file_state(directory: Path, source: str) -> dict[str, torch.Tensor]:
    """The file's tensors as safetensors' own reader gives them, under the adapter-state names: what a
    successful load must hold. If our reader accepted a file this one refuses, the test fails here."""
    tensors = load_file(directory / WEIGHTS)
    if source == "native":
        return tensors
    state = {}
    for key, value in tensors.items():
        path, _, name = key.removeprefix("base_model.model.").partition(".lora_")
        state[f"{path}.{_PEFT_NAMES['lora_' + name]}"] = value
    return state


def check_outcome(directory: Path, source: str) -> None:
    model, err = load(directory)
    if err is not None:
        return  # load() checked the model is untouched and the error names the adapter
    expected = file_state(directory, source)
    state = lx.adapter_state_dict(model)
    assert sorted(state) == sorted(expected)
    for key, value in state.items():
        assert torch.equal(value, expected[key].to(value.dtype)), key
    assert all(torch.isfinite(v).all() for v in state.values())
    assert_unadapt_restores(model)


def apply_edits(blob: bytes, edits: list[tuple[str, int, Any]]) -> bytes:
    data = bytearray(blob)
    for op, at, arg in edits:
        at = min(at, len(data))
        if op == "set" and data:
            data[min(at, len(data) - 1)] = arg
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = arg
        elif op == "delete":
            del data[at : at + arg]
    return bytes(data)


def byte_edits(hot: int, size: int) -> st.SearchStrategy[list[tuple[str, int, Any]]]:
    """Up to 3 byte edits, half of them in the first `hot` bytes (the length field and the header)."""
    at = st.one_of(st.integers(0, hot), st.integers(0, size))
    edit = st.one_of(
        st.tuples(st.just("set"), at, st.integers(0, 255)),
        st.tuples(st.just("truncate"), at, st.none()),
        st.tuples(st.just("insert"), at, st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("delete"), at, st.integers(1, 16)),
    )
    return st.lists(edit, min_size=1, max_size=3)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()  # NaN and Infinity too: json writes them, the loader refuses them
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def scratch(sources: dict[str, Path], source: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as root:
        yield copy_source(sources, source, Path(root))


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_bytes(sources: dict[str, Path], data: st.DataObject) -> None:
    source = data.draw(st.sampled_from(FUZZ_SOURCES), label="source")
    with scratch(sources, source) as directory:
        blob = (directory / WEIGHTS).read_bytes()
        header_end = 8 + struct.unpack("<Q", blob[:8])[0]
        edits = data.draw(byte_edits(header_end, len(blob)), label="edits")
        (directory / WEIGHTS).write_bytes(apply_edits(blob, edits))
        check_outcome(directory, source)


@FUZZ
@given(data=st.data())
def test_fuzz_config_bytes(sources: dict[str, Path], data: st.DataObject) -> None:
    source = data.draw(st.sampled_from(FUZZ_SOURCES), label="source")
    with scratch(sources, source) as directory:
        blob = (directory / CONFIG).read_bytes()
        edits = data.draw(byte_edits(len(blob), len(blob)), label="edits")
        (directory / CONFIG).write_bytes(apply_edits(blob, edits))
        check_outcome(directory, source)


def field_slots(config: dict[str, Any]) -> list[tuple[str, ...]]:
    """Where a field can be set: top-level keys and, in loraredux's format, the shared and a layer's config."""
    slots = [(k,) for k in config]
    if "layers" in config:
        layer = next(iter(config["layers"]))
        slots += [("config", k) for k in config["config"]]
        slots += [("layers", layer, k) for k in config["layers"][layer]]
    return slots


@FUZZ
@given(data=st.data())
def test_fuzz_config_fields(sources: dict[str, Path], data: st.DataObject) -> None:
    """One field set to any JSON value (or removed): refused by name, or loaded exactly."""
    source = data.draw(st.sampled_from(FUZZ_SOURCES), label="source")
    with scratch(sources, source) as directory:
        config = json.loads((directory / CONFIG).read_text())
        slot = data.draw(st.sampled_from(field_slots(config)), label="field")
        holder = config
        for key in slot[:-1]:
            holder = holder[key]
        if data.draw(st.booleans(), label="remove"):
            holder.pop(slot[-1])
        else:
            holder[slot[-1]] = data.draw(JSON_VALUES, label="value")
        (directory / CONFIG).write_text(json.dumps(config))
        check_outcome(directory, source)
