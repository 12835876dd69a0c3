"""loraredux's own adapter format: a round trip gives the same outputs and the same adapter state."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import loraredux as lx
from loraredux import core
from tiny_models import assert_same_adapter, logits, randomize, tiny_bert, tiny_llama

ADAPTS = {
    "llama-patterns-embedding": (
        tiny_llama,
        {
            "targets": ["embed_tokens", "q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"layers.0.self_attn.q_proj": 2, "down_proj": 6},
            "alpha_pattern": {"v_proj": 3.0},
        },
    ),
    "bert-classifier": (tiny_bert, {"targets": "all-linear", "modules_to_save": ["classifier"]}),
}


@pytest.mark.parametrize("name", list(ADAPTS))
def test_native_round_trip(name: str, tmp_path: Path) -> None:
    factory, kwargs = ADAPTS[name]
    model = lx.adapt_(factory(), lx.config("lora", rank=4, alpha=8.0, rslora=True), **kwargs)
    randomize(model)

    assert lx.save_adapter(model, tmp_path, format="native") == tmp_path
    loaded = lx.load_adapter(factory(), tmp_path)

    assert_same_adapter(model, loaded)
    assert not torch.allclose(logits(factory()), logits(loaded))


def test_native_config_layout(tmp_path: Path) -> None:
    factory, kwargs = ADAPTS["llama-patterns-embedding"]
    model = lx.adapt_(factory(), lx.config("lora", rank=4), **kwargs)
    lx.save_adapter(model, tmp_path, format="native")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["format"], config["format_version"], config["method"]) == (
        "loraredux",
        1,
        "lora",
    )
    assert config["config"] == lx.config("lora", rank=4).to_dict()
    assert config["layers"]["model.layers.0.self_attn.q_proj"]["rank"] == 2
    assert list(config["layers"]) == [path for path, _ in lx.adapters(model)]
    assert config["modules_to_save"] == []


@pytest.fixture
def peftless_method(monkeypatch: pytest.MonkeyPatch) -> str:
    """A registered method without a PEFT form, registered for this test only (the contract suite never
    sees it)."""

    @dataclasses.dataclass(frozen=True)
    class PlainLowRankConfig(lx.LoRAConfig):
        peft_type: ClassVar[str | None] = None

    monkeypatch.setattr(PlainLowRankConfig, "method", "plain-low-rank")
    monkeypatch.setitem(core._REGISTRY, "plain-low-rank", PlainLowRankConfig)
    return "plain-low-rank"


def test_auto_picks_native_for_a_method_peft_lacks(peftless_method: str, tmp_path: Path) -> None:
    model = lx.adapt_(tiny_llama(), lx.config(peftless_method, rank=2), ["q_proj"])
    randomize(model)
    with pytest.raises(ValueError, match="no PEFT form"):
        lx.save_adapter(model, tmp_path, format="peft")
    lx.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["format"], config["method"]) == ("loraredux", peftless_method)
    assert_same_adapter(model, lx.load_adapter(tiny_llama(), tmp_path))


def test_auto_picks_peft_for_lora(tmp_path: Path) -> None:
    model = lx.adapt_(tiny_llama(), lx.config("lora", rank=2), ["q_proj"])
    lx.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_peft_round_trip_within_loraredux(tmp_path: Path) -> None:
    factory, kwargs = ADAPTS["bert-classifier"]
    model = lx.adapt_(factory(), lx.config("lora", rank=4, alpha=8.0), **kwargs)
    randomize(model)
    lx.save_adapter(model, tmp_path, format="peft")
    assert_same_adapter(model, lx.load_adapter(factory(), tmp_path))


@pytest.mark.parametrize(
    ("method", "fields"),
    [
        ("lora_xs", {"rank": 2}),
        ("svft", {"pattern": "banded", "off_diag": 1}),
        ("svft", {"pattern": "random", "off_diag": 1, "seed": 3}),
        ("abba", {"rank": 2}),
    ],
)
def test_loading_computes_no_svd_and_restores_exactly(method, fields, tmp_path, monkeypatch):
    """The file holds every adapter tensor, so loading builds the adapters without their SVD initialisation."""
    model = lx.adapt_(tiny_llama(), lx.config(method, **fields), ["q_proj", "down_proj"])
    randomize(model)
    lx.save_adapter(model, tmp_path)

    def no_svd(*args, **kwargs):
        raise AssertionError("an SVD was computed while loading")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    monkeypatch.setattr(torch, "svd_lowrank", no_svd)
    with pytest.raises(AssertionError, match="an SVD was computed"):  # building anew does need one
        lx.adapt_(tiny_llama(), lx.config(method, **fields), ["q_proj"])
    loaded = lx.load_adapter(tiny_llama(), tmp_path)
    assert_same_adapter(loaded, model)
