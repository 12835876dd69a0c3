"""PEFT's adapter format both ways, on tiny random transformers models: an adapter saved by loraredux loads in
PEFT with the same logits, and one saved by PEFT loads in loraredux with the same logits (float64)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

import loraredux as lx
from tiny_models import (
    assert_unchanged,
    logits,
    randomize,
    snapshot,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)

pytestmark = pytest.mark.parity


@dataclass
class Case:
    """One adapter, described once and spelled for both libraries."""

    model: object
    targets: str | list[str]
    rank: int = 4
    alpha: float = 8.0
    rslora: bool = False
    dropout: float = 0.0
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    task_type: str | None = None

    def adapt(self, model: torch.nn.Module) -> torch.nn.Module:
        config = lx.config(
            "lora", rank=self.rank, alpha=self.alpha, rslora=self.rslora, dropout=self.dropout
        )
        return lx.adapt_(
            model,
            config,
            self.targets,
            rank_pattern=self.rank_pattern or None,
            alpha_pattern=self.alpha_pattern or None,
            modules_to_save=self.modules_to_save,
        )

    def peft_config(self) -> peft.LoraConfig:
        # Copies: PEFT extends modules_to_save in place (SEQ_CLS adds "classifier" and "score").
        return peft.LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            use_rslora=self.rslora,
            lora_dropout=self.dropout,
            target_modules=copy.copy(self.targets),
            rank_pattern=dict(self.rank_pattern),
            alpha_pattern=dict(self.alpha_pattern),
            modules_to_save=copy.copy(self.modules_to_save),
            task_type=self.task_type,
        )


CASES = {
    "llama": Case(tiny_llama, ["q_proj", "v_proj"]),
    "llama-rslora": Case(tiny_llama, ["q_proj", "v_proj"], rank=8, alpha=4.0, rslora=True),
    "llama-patterns": Case(
        tiny_llama,
        ["q_proj", "v_proj", "down_proj"],
        rank_pattern={"layers.0.self_attn.q_proj": 2, "down_proj": 6},
        alpha_pattern={"v_proj": 3.0, "layers.1.mlp.down_proj": 5.0},
    ),
    "llama-dropout-in-eval": Case(tiny_llama, ["q_proj", "o_proj"], dropout=0.5),
    "llama-embedding": Case(tiny_llama, ["embed_tokens", "q_proj"]),
    "llama-all-linear": Case(tiny_llama, "all-linear", task_type="CAUSAL_LM"),
    "bert-classifier": Case(
        tiny_bert, ["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS"
    ),
    "bert-all-linear": Case(
        tiny_bert, "all-linear", modules_to_save=["classifier"], task_type="SEQ_CLS"
    ),
    "gpt2-conv1d": Case(tiny_gpt2, ["c_attn"], task_type="CAUSAL_LM"),
    "gpt2-all-linear": Case(tiny_gpt2, "all-linear", rslora=True),
    "gpt2-tied-embedding": Case(tiny_gpt2, ["wte", "c_attn"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_loraredux_adapter_loads_in_peft(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    base = case.model()
    fresh = copy.deepcopy(base)
    model = case.adapt(base)
    randomize(list(lx.trainable_parameters(model).values()))
    expected = logits(model)
    with lx.disabled(model):
        assert not torch.allclose(logits(model), expected)  # the adapter changes the outputs

    lx.save_adapter(model, tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()

    torch.testing.assert_close(logits(loaded), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(CASES))
def test_peft_adapter_loads_in_loraredux(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    base = case.model()
    fresh = copy.deepcopy(base)
    peft_model = peft.get_peft_model(base, case.peft_config())
    randomize([p for p in peft_model.parameters() if p.requires_grad])
    peft_model.eval()
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path)

    model = lx.load_adapter(fresh, tmp_path)

    assert not torch.allclose(logits(case.model()), expected)
    torch.testing.assert_close(logits(model), expected, rtol=1e-10, atol=1e-10)
    peft_layers = {
        n.removeprefix("base_model.model."): m.r["default"]
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert {path: a.config.rank for path, a in lx.adapters(model)} == peft_layers


def test_written_config_is_peft_shaped(tmp_path: Path) -> None:
    case = CASES["llama-patterns"]
    model = case.adapt(case.model())
    lx.save_adapter(model, tmp_path)  # auto: LoRA has a PEFT form
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["inference_mode"] is True
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    # The shared config is the most common layer config, (rank 4, alpha 3) of both v_proj layers.
    assert (config["r"], config["lora_alpha"]) == (4, 3.0)
    assert config["rank_pattern"] == {
        "model.layers.0.self_attn.q_proj": 2,
        "model.layers.0.mlp.down_proj": 6,
        "model.layers.1.mlp.down_proj": 6,
    }
    assert config["alpha_pattern"] == {
        "model.layers.0.self_attn.q_proj": 8.0,
        "model.layers.0.mlp.down_proj": 8.0,
        "model.layers.1.self_attn.q_proj": 8.0,
        "model.layers.1.mlp.down_proj": 5.0,
    }
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys


def test_conv1d_and_modules_to_save_fields(tmp_path: Path) -> None:
    gpt2 = CASES["gpt2-conv1d"]
    lx.save_adapter(gpt2.adapt(gpt2.model()), tmp_path / "gpt2")
    assert json.loads((tmp_path / "gpt2" / "adapter_config.json").read_text())["fan_in_fan_out"]

    bert = CASES["bert-classifier"]
    lx.save_adapter(bert.adapt(bert.model()), tmp_path / "bert")
    config = json.loads((tmp_path / "bert" / "adapter_config.json").read_text())
    assert (config["task_type"], config["modules_to_save"]) == ("SEQ_CLS", ["classifier"])
    keys = set(load_file(tmp_path / "bert" / "adapter_model.safetensors"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys


def test_target_modules_fall_back_to_full_paths(tmp_path: Path) -> None:
    """Only layer 0's q_proj is adapted: the leaf name "q_proj" would select layer 1 too."""
    model = lx.adapt_(tiny_llama(), lx.config("lora", rank=2), ["layers.0.self_attn.q_proj"])
    lx.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert [n for n, m in loaded.named_modules() if hasattr(m, "lora_A")] == [
        "base_model.model.model.layers.0.self_attn.q_proj"
    ]


def test_seq_cls_head_not_saved_leaves_task_type_out(tmp_path: Path) -> None:
    """PEFT's SEQ_CLS would wrap the classifier and then demand its weights; here it is part of the base."""
    case = CASES["bert-classifier"]
    model = lx.adapt_(case.model(), lx.config("lora", rank=2), ["query"])
    randomize(list(lx.trainable_parameters(model).values()))
    lx.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] is None
    loaded = peft.PeftModel.from_pretrained(case.model(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-10, atol=1e-10)


class Nested(torch.nn.Module):
    """Paths that are suffixes of each other: `a.b`, `x.a.b`, `y.a.b`."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.x, self.y = torch.nn.Module(), torch.nn.Module()
        for holder in (self, self.x, self.y):
            holder.a = torch.nn.Module()
            holder.a.b = torch.nn.Linear(8, 8, dtype=torch.float64)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.y.a.b(self.x.a.b(self.a.b(h)))


def test_nested_paths_stay_exact_both_ways(tmp_path: Path) -> None:
    """`a.b` must not also reach `x.a.b`: targets and pattern keys fall back to exact forms."""
    h = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model = lx.adapt_(
        Nested(), lx.config("lora", rank=2), r"a\.b|x\.a\.b", rank_pattern={"^a\\.b": 4}
    )
    randomize(list(lx.trainable_parameters(model).values()))
    lx.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str)  # neither leaf names nor paths select exactly
    assert config["rank_pattern"] == {"^a\\.b": 4}
    loaded = peft.PeftModel.from_pretrained(Nested(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(loaded(h), model(h), rtol=1e-10, atol=1e-10)

    peft_model = peft.get_peft_model(
        Nested(), peft.LoraConfig(r=2, target_modules=["b"], rank_pattern={"^a\\.b": 4})
    )
    randomize([p for p in peft_model.parameters() if p.requires_grad])
    peft_model.save_pretrained(tmp_path / "theirs")
    ours = lx.load_adapter(Nested(), tmp_path / "theirs")
    assert {p: a.config.rank for p, a in lx.adapters(ours)} == {"a.b": 4, "x.a.b": 2, "y.a.b": 2}
    with torch.no_grad():
        torch.testing.assert_close(ours(h), peft_model(h), rtol=1e-10, atol=1e-10)


def test_peft_embedding_table_is_loaded_as_peft_does(tmp_path: Path) -> None:
    """PEFT saves an adapted embedding's table (`save_embedding_layers`) and loads it into the base layer;
    lx.unadapt_ gives back the model's own table, bit for bit."""
    peft_model = peft.get_peft_model(tiny_llama(), CASES["llama-embedding"].peft_config())
    randomize([p for p in peft_model.parameters() if p.requires_grad])
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    other = tiny_llama()
    with torch.no_grad():
        other.model.embed_tokens.weight.add_(1.0)
    before = snapshot(other)
    with pytest.warns(UserWarning, match="replaces the base weights model.embed_tokens.weight"):
        model = lx.load_adapter(other, tmp_path)
    torch.testing.assert_close(logits(model), logits(peft_model), rtol=1e-10, atol=1e-10)
    lx.unadapt_(model)
    assert_unchanged(model, before)
