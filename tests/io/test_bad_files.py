"""Bad adapter files and failed saves: each gives a clear, specific error and leaves the model and the files as
they were."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraredux as lx
from loraredux.io import AdapterFileError, atomic, files, read_adapter_config
from tiny_models import assert_unchanged as unchanged
from tiny_models import snapshot, tiny_llama

# Many tests here edit adapter_config.json by hand, which the config-hash check reports; the torn-save tests
# below assert that warning explicitly.
pytestmark = pytest.mark.filterwarnings("ignore:.*is not the config")


def assert_unchanged(model: torch.nn.Module, before: Any) -> None:
    unchanged(model, before)
    assert not list(lx.adapters(model))


def saved_adapter(directory: Path, format: str = "peft", **kwargs: Any) -> Path:
    model = lx.adapt_(tiny_llama(**kwargs), lx.config("lora", rank=4), ["q_proj", "v_proj"])
    return lx.save_adapter(model, directory, format=format)


def refused(
    directory: Path, error: type[Exception], match: str, model: torch.nn.Module | None = None
):
    model = model if model is not None else tiny_llama()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        lx.load_adapter(model, directory)
    assert_unchanged(model, before)


def edit_config(directory: Path, **changes: Any) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_tensors(directory: Path, drop: str = "", **extra: torch.Tensor) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if not (drop and k.endswith(drop))}
    save_file({**tensors, **extra}, path)


# ----------------------------------------------------------------------------------------------- reading


def test_pickle_only_is_never_unpickled(tmp_path: Path) -> None:
    saved_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04 not even a valid pickle")
    refused(tmp_path, AdapterFileError, r"adapter_model\.bin.*never unpickles.*save_pretrained")


@pytest.mark.parametrize("keep", [0.5, 0.0, 7])
def test_truncated_safetensors(tmp_path: Path, keep: float) -> None:
    saved_adapter(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    refused(tmp_path, AdapterFileError, "truncated or corrupt")


def test_not_json(tmp_path: Path) -> None:
    saved_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    refused(tmp_path, AdapterFileError, "not valid JSON")


def test_missing_files(tmp_path: Path) -> None:
    refused(tmp_path / "nowhere", FileNotFoundError, "no adapter directory")
    refused(tmp_path, FileNotFoundError, "no adapter_model.safetensors")
    saved_adapter(tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    refused(tmp_path, FileNotFoundError, "no adapter_config.json")


def test_read_adapter_config_reads_only_the_json(tmp_path: Path) -> None:
    saved_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    assert read_adapter_config(tmp_path)["peft_type"] == "LORA"
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterFileError, match="must hold a JSON object"):
        read_adapter_config(tmp_path)


def test_unknown_format(tmp_path: Path) -> None:
    saved_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    refused(tmp_path, AdapterFileError, "neither a PEFT config")


@pytest.mark.parametrize("format", ["peft", "native"])
def test_wrong_shapes(tmp_path: Path, format: str) -> None:
    saved_adapter(tmp_path, format, hidden=16)
    match = r"(?=.*shape mismatch)(?=.*q_proj).*file \(4, 16\) vs layer \(4, 24\)"
    refused(tmp_path, ValueError, match, model=tiny_llama(hidden=24))


@pytest.mark.parametrize("format", ["peft", "native"])
def test_modules_the_model_lacks(tmp_path: Path, format: str) -> None:
    saved_adapter(tmp_path, format, layers=2)
    refused(tmp_path, ValueError, r"layers\.1\.self_attn", model=tiny_llama(layers=1))


def test_unexpected_key(tmp_path: Path) -> None:
    saved_adapter(tmp_path)
    stranger = "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"
    edit_tensors(tmp_path, **{stranger: torch.zeros(4, 16)})
    refused(tmp_path, ValueError, r"does not adapt.*gate_proj\.lora_A")


def test_missing_key(tmp_path: Path) -> None:
    saved_adapter(tmp_path)
    edit_tensors(tmp_path, drop="layers.1.self_attn.v_proj.lora_B.weight")
    refused(tmp_path, ValueError, r"layers\.1\.self_attn\.v_proj.*missing \['lora_B\.weight'\]")


def test_unknown_peft_type(tmp_path: Path) -> None:
    saved_adapter(tmp_path)
    edit_config(tmp_path, peft_type="FOURIERFT_XL")
    refused(tmp_path, ValueError, r"unknown peft_type 'FOURIERFT_XL'.*LORA")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("use_qalora", True),
        ("use_bdlora", {"target_modules_bd_a": ["q_proj"]}),
        ("kasa_config", {"beta": 1e-4}),
        ("lora_bias", True),
        ("layers_to_transform", [0]),
        ("target_modules", None),
    ],
)
def test_peft_fields_we_do_not_read(tmp_path: Path, field: str, value: Any) -> None:
    saved_adapter(tmp_path)
    edit_config(tmp_path, **{field: value})
    refused(tmp_path, ValueError, field)


def test_a_lora_file_marked_dora_lacks_the_magnitudes(tmp_path: Path) -> None:
    """use_dora makes the file a DoRA adapter, whose per-layer magnitude tensors this LoRA file does not have."""
    saved_adapter(tmp_path)
    edit_config(tmp_path, use_dora=True)
    refused(tmp_path, ValueError, "lora_magnitude_vector")


def test_native_version_and_method(tmp_path: Path) -> None:
    saved_adapter(tmp_path, "native")
    edit_config(tmp_path, format_version=2)
    refused(tmp_path, ValueError, "format_version 2")
    edit_config(tmp_path, format_version=1, config={"method": "no-such-method"})
    refused(tmp_path, ValueError, "unknown method 'no-such-method'")


def test_cannot_load_onto_adapted_layers(tmp_path: Path) -> None:
    saved_adapter(tmp_path)
    model = lx.adapt_(tiny_llama(), lx.config("lora", rank=2), ["q_proj"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="already adapted"):
        lx.load_adapter(model, tmp_path)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------------- saving


def test_refuses_a_model_without_adapters(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no adapters to save"):
        lx.save_adapter(tiny_llama(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_an_unknown_format(tmp_path: Path) -> None:
    model = lx.adapt_(tiny_llama(), lx.config("lora", rank=2), ["q_proj"])
    with pytest.raises(ValueError, match="format must be"):
        lx.save_adapter(model, tmp_path, format="pickle")  # type: ignore[arg-type]


def test_refuses_layers_differing_beyond_rank_and_alpha(tmp_path: Path) -> None:
    model = lx.adapt_(tiny_llama(), lx.config("lora", rank=2), ["q_proj"])
    lx.adapt_(model, lx.config("lora", rank=2, dropout=0.1), ["layers.1.self_attn.v_proj"])
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.v_proj.*dropout=0\.1"):
        lx.save_adapter(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_adapter(tmp_path: Path, monkeypatch) -> None:
    saved_adapter(tmp_path)
    (tmp_path / "README.md").write_text("notes")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(files, "save_file", crash)
    model = lx.adapt_(tiny_llama(), lx.config("lora", rank=8), ["k_proj"])
    with pytest.raises(OSError, match="disk full"):
        lx.save_adapter(model, tmp_path)
    assert {
        p.name: p.read_bytes() for p in tmp_path.iterdir()
    } == before  # no temporary left either
    monkeypatch.undo()

    lx.save_adapter(model, tmp_path)  # a successful save replaces the adapter and keeps other files
    assert (tmp_path / "README.md").read_text() == "notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == [
        "k_proj"
    ]


def mixed_pair(directory: Path, model: torch.nn.Module) -> None:
    """Put the weights of a save of `model` beside the config already in `directory`: what a reader that opened the
    config before a save's swap and the weights after it reads, or files copied from two adapters (a save itself
    never leaves this on disk: tests/io/test_atomic_save.py kills it at every step)."""
    other = directory.parent / f"{directory.name}-other"
    lx.save_adapter(model, other)
    shutil.copyfile(other / "adapter_model.safetensors", directory / "adapter_model.safetensors")
    shutil.rmtree(other)


def test_a_failed_save_keeps_the_previous_adapter(tmp_path: Path, monkeypatch) -> None:
    directory = tmp_path / "adapter"
    saved_adapter(directory)
    (directory / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def power_cut(*args: Any) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(atomic, "_swap", power_cut)
    model = lx.adapt_(tiny_llama(), lx.config("lora", rank=8), ["q_proj", "v_proj"])
    with pytest.raises(OSError, match="power cut"):
        lx.save_adapter(model, directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no half-built sibling left


def test_a_mixed_pair_is_reported(tmp_path: Path) -> None:
    saved_adapter(tmp_path)
    mixed_pair(tmp_path, lx.adapt_(tiny_llama(), lx.config("lora", rank=8), ["q_proj", "v_proj"]))
    with pytest.warns(UserWarning, match="not the config"):
        refused(tmp_path, ValueError, r"shape mismatch.*\(8, 16\)")


def test_a_mixed_pair_with_equal_shapes_is_reported(tmp_path: Path) -> None:
    """Only alpha changes: keys and shapes fit, so the config hash in the weights' metadata is the only witness."""
    saved_adapter(tmp_path)
    model = lx.adapt_(tiny_llama(), lx.config("lora", rank=4, alpha=32), ["q_proj", "v_proj"])
    mixed_pair(tmp_path, model)
    with pytest.warns(UserWarning, match="two adapters"):
        lx.load_adapter(tiny_llama(), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lx.save_adapter(model, tmp_path)
        lx.load_adapter(tiny_llama(), tmp_path)  # a whole save loads without a word


# ----------------------------------------------------------------------------------------------- hostile files


def test_nan_is_refused_unless_allowed(tmp_path: Path) -> None:
    saved_adapter(tmp_path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors[key][1, 2] = float("nan")
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    refused(tmp_path, AdapterFileError, rf"adapter_model\.safetensors: tensor '{key}' holds 1 NaN")
    model = lx.load_adapter(tiny_llama(), tmp_path, allow_nonfinite=True)
    assert torch.isnan(model.model.layers[1].self_attn.v_proj.A[1, 2])


def test_a_duplicate_header_key_is_refused_not_resolved(tmp_path: Path) -> None:
    """safetensors' own parser keeps the last of two equal keys; the loader refuses the file."""
    saved_adapter(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    blob = path.read_bytes()
    length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + length])
    name = next(k for k in header if k.endswith("lora_B.weight"))
    text = json.dumps(header)[:-1] + f', "{name}": {json.dumps(header[name])}}}'
    path.write_bytes(len(text).to_bytes(8, "little") + text.encode() + blob[8 + length :])
    refused(
        tmp_path, AdapterFileError, rf"header\) is not valid JSON: the key '{name}' appears twice"
    )


def test_a_huge_claimed_header_is_refused_before_reading_it(tmp_path: Path) -> None:
    saved_adapter(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes((2**63).to_bytes(8, "little") + path.read_bytes()[8:])
    refused(
        tmp_path, AdapterFileError, r"header claims 9223372036854775808 bytes, but only \d+ follow"
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("r", "8", "'r' must be an integer, got str '8'"),
        ("lora_alpha", "16", "'lora_alpha' must be a number, got str '16'"),
        ("lora_alpha", [16], "'lora_alpha' must be a number, got list"),
        ("use_rslora", "false", "'use_rslora' must be true or false, got str 'false'"),
        ("target_modules", 3, "'target_modules' must be a regex string or a list of module names"),
    ],
)
def test_config_fields_of_the_wrong_type(
    tmp_path: Path, field: str, value: Any, message: str
) -> None:
    saved_adapter(tmp_path)
    edit_config(tmp_path, **{field: value})
    refused(tmp_path, AdapterFileError, rf"adapter_config\.json: {message}")


def test_native_config_malformed_is_named_and_does_not_suggest_upgrading(tmp_path: Path) -> None:
    saved_adapter(tmp_path, "native")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["layers"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = tiny_llama()
    with pytest.raises(AdapterFileError, match="'layers' must be an object") as info:
        lx.load_adapter(model, tmp_path)
    assert "upgrade" not in str(info.value) and "KeyError" not in str(info.value)


def test_a_fifo_is_named_and_never_opened(tmp_path: Path) -> None:
    """Opening a FIFO for reading blocks until a writer comes: the loader must only stat it."""
    saved_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    os.mkfifo(tmp_path / "adapter_model.safetensors")
    refused(tmp_path, AdapterFileError, r"adapter_model\.safetensors is a FIFO \(named pipe\)")


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_symlinks_are_followed_only_inside_the_directory(tmp_path: Path, name: str) -> None:
    adapter = saved_adapter(tmp_path / "adapter")
    (adapter / name).rename(tmp_path / name)
    (adapter / name).symlink_to(tmp_path / name)
    refused(
        adapter, AdapterFileError, rf"{name} is a symlink pointing outside the adapter directory"
    )
    (adapter / name).unlink()
    (tmp_path / name).rename(adapter / f"real-{name}")
    (adapter / name).symlink_to(f"real-{name}")
    assert list(lx.adapters(lx.load_adapter(tiny_llama(), adapter)))
    if name == "adapter_config.json":
        assert read_adapter_config(adapter)["peft_type"] == "LORA"


def test_a_symlink_to_a_device_is_named(tmp_path: Path) -> None:
    saved_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter_model.safetensors").symlink_to("/dev/zero")
    refused(tmp_path, AdapterFileError, r"\(to /dev/zero, a character device\), not a regular file")


# ----------------------------------------------------------------------------------------------- base tables

TABLE = "base_model.model.model.embed_tokens.base_layer.weight"


def embedding_adapter(directory: Path, table: torch.Tensor, **kwargs: Any) -> Path:
    """A PEFT-format adapter of the embedding and q_proj that also carries the embedding's table, as PEFT's
    `save_embedding_layers` writes it."""
    model = lx.adapt_(tiny_llama(**kwargs), lx.config("lora", rank=2), ["embed_tokens", "q_proj"])
    lx.save_adapter(model, directory, format="peft")
    edit_tensors(directory, **{TABLE: table})
    return directory


def shifted_table(**kwargs: Any) -> torch.Tensor:
    return tiny_llama(**kwargs).model.embed_tokens.weight.detach() + 1.0


@pytest.mark.parametrize("tied", [False, True])
def test_a_loaded_base_table_is_restored_by_unadapt(tmp_path: Path, tied: bool) -> None:
    """The table is written into the base (a tied head sees it, as in PEFT), and lx.unadapt_ brings back the
    original table bit for bit."""
    kwargs = {"tie_word_embeddings": tied}
    table = shifted_table(**kwargs)
    embedding_adapter(tmp_path, table, **kwargs)
    model = tiny_llama(**kwargs)
    before = snapshot(model)
    with pytest.warns(
        UserWarning, match=r"replaces the base weights model\.embed_tokens\.weight.*restores"
    ):
        lx.load_adapter(model, tmp_path)
    assert torch.equal(model.model.embed_tokens.base.weight, table)
    assert torch.equal(model.lm_head.weight, table) is tied
    assert not any("_kept_base" in k for k in model.state_dict())  # the kept table is not saved
    assert not any("_kept_base" in k for k in lx.adapter_state_dict(model))
    lx.unadapt_(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ("nan", AdapterFileError, rf"tensor '{TABLE}' holds 1 NaN"),
        ("int", ValueError, r"embed_tokens.*dtype mismatch.*weight: file torch\.int64"),
        ("shape", ValueError, r"embed_tokens.*shape mismatch.*weight: file \(63, 16\)"),
        ("later", ValueError, r"missing \['lora_B\.weight'\]"),
    ],
)
def test_a_refused_load_leaves_the_base_table_alone(
    tmp_path: Path, bad: str, error: type[Exception], match: str
) -> None:
    table = shifted_table()
    if bad == "nan":
        table[3, 4] = float("nan")
    elif bad == "int":
        table = table.long()
    elif bad == "shape":
        table = table[:63].clone()
    embedding_adapter(tmp_path, table)
    if (
        bad == "later"
    ):  # the table fits, a layer after it does not: the table must not be applied either
        edit_tensors(tmp_path, drop="layers.1.self_attn.q_proj.lora_B.weight")
    refused(tmp_path, error, match)


# ----------------------------------------------------------------------------------------------- PiSSA


def pissa_adapter(directory: Path) -> Path:
    model = lx.adapt_(tiny_llama(), lx.config("lora", rank=2, init="pissa"), ["q_proj", "v_proj"])
    return lx.save_adapter(model, directory, format="native")


def test_pissa_with_a_nan_b0_never_reaches_the_base(tmp_path: Path) -> None:
    """The worst case: NaN in B0 would move NaN into the base weight. Refused by default; with
    allow_nonfinite the adapter tensors may hold NaN, but the base move is still refused, the model unchanged."""
    pissa_adapter(tmp_path)
    key = "model.layers.1.self_attn.v_proj.B0"  # the last layer: every other one has loaded by then
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors[key][0, 0] = float("nan")
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    refused(tmp_path, AdapterFileError, rf"tensor '{key}' holds 1 NaN")
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"layers\.1\.self_attn\.v_proj': init 'pissa': the base weight"
    ):
        lx.load_adapter(model, tmp_path, allow_nonfinite=True)
    assert_unchanged(model, before)
