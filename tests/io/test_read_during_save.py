"""A load that races a save reads one adapter, never the weights of one beside the config of the other: both files
are opened in the one directory the reader holds open, and a reader whose directory a save replaced reads again."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import loraredux as lx
from loraredux.io import atomic, files
from tiny_models import tiny_llama

KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def adapter(alpha: float, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = lx.adapt_(tiny_llama(), lx.config("lora", rank=4, alpha=alpha), ["q_proj", "v_proj"])
    with torch.no_grad():
        for p in lx.trainable_parameters(model).values():
            p.normal_()
    return model


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename-aside"])
def test_a_save_between_the_two_opens_is_not_mixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:  # where directories cannot be swapped atomically
        monkeypatch.setattr(atomic, "_libc_renameat2", lambda: None)
    old, new = adapter(8.0, 0), adapter(32.0, 1)
    directory = lx.save_adapter(old, tmp_path / "adapter")
    expected = {
        8.0: lx.io.peft.to_files(old)[1][KEY],
        32.0: lx.io.peft.to_files(new)[1][KEY],
    }
    read_config = files._read_config
    saved = []

    def save_first(path: Path, dir_fd: int | None = None):
        if not saved:  # the weights are open: now the other adapter replaces the directory
            saved.append(lx.save_adapter(new, directory))
        return read_config(path, dir_fd)

    monkeypatch.setattr(files, "_read_config", save_first)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error"
        )  # a mixed pair would warn that the config is not the weights'
        config, tensors = files.read_adapter(directory)
    assert saved
    assert torch.equal(tensors[KEY], expected[config["lora_alpha"]])
    assert config["lora_alpha"] == 32.0  # the reader read again, in the new directory
