"""Bad adapter files and failed saves: each gives a clear, specific error and leaves the model and the files as
they were."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraredux as lx
from loraredux.io import AdapterFileError, files, read_adapter_config
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


def torn_save(directory: Path, model: torch.nn.Module, monkeypatch) -> None:
    """Save `model` over the adapter in `directory`, the power failing between the weights and the config."""
    real_replace = files.os.replace

    def crash_on_config(src: Any, dst: Any) -> None:
        if str(dst).endswith("adapter_config.json"):
            raise OSError("power cut")
        real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(files.os, "replace", crash_on_config)
        with pytest.raises(OSError, match="power cut"):
            lx.save_adapter(model, directory)


def test_failed_rename_keeps_the_previous_config(tmp_path: Path, monkeypatch) -> None:
    saved_adapter(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    torn_save(
        tmp_path,
        lx.adapt_(tiny_llama(), lx.config("lora", rank=8), ["q_proj", "v_proj"]),
        monkeypatch,
    )
    # Each file is whole (old config, new weights), and the loader names the mismatch instead of using it.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)
    assert (tmp_path / "adapter_config.json").read_bytes() == before["adapter_config.json"]
    with pytest.warns(UserWarning, match="not the config"):
        refused(tmp_path, ValueError, r"shape mismatch.*\(8, 16\)")


def test_a_torn_save_with_equal_shapes_is_reported(tmp_path: Path, monkeypatch) -> None:
    """Only alpha changes: keys and shapes fit, so the config hash in the weights' metadata is the only witness."""
    saved_adapter(tmp_path)
    model = lx.adapt_(tiny_llama(), lx.config("lora", rank=4, alpha=32), ["q_proj", "v_proj"])
    torn_save(tmp_path, model, monkeypatch)
    with pytest.warns(UserWarning, match="interrupted"):
        lx.load_adapter(tiny_llama(), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lx.save_adapter(model, tmp_path)
        lx.load_adapter(tiny_llama(), tmp_path)  # a whole save loads without a word
