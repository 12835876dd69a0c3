"""The memory model counts what a real model holds: parameters from the config alone (built on the meta device),
the adapter's trainable parameters as lx.adapt_ makes them, and the quantized formats' bytes by their definitions."""

from __future__ import annotations

import pytest
from torch import nn

import loraredux as lx
from loraredux.advisor.memory import estimate_memory
from tiny_models import tiny_bert, tiny_llama


def real_parameters(model: nn.Module) -> int:
    return sum(
        p.numel() for p in model.parameters()
    )  # shared (tied) tensors once, as parameters() yields them


@pytest.mark.parametrize("tied", [True, False])
def test_base_and_adapter_counts_equal_the_real_models(tied):
    real = tiny_llama(tie_word_embeddings=tied)
    e = estimate_memory(real.config, base="bf16", method_fields={"rank": 3})
    assert e.base_parameters == real_parameters(real)
    assert e.base_bytes == 2 * real_parameters(real)
    lx.adapt_(real, lx.config("lora", rank=3), "all-linear", exclude=["lm_head"])
    trainable = sum(p.numel() for p in lx.trainable_parameters(real).values())
    assert e.trainable_parameters == trainable
    assert (e.adapter_bytes, e.gradient_bytes, e.optimizer_bytes) == (
        4 * trainable,
        4 * trainable,
        8 * trainable,
    )
    assert e.total_bytes == e.base_bytes + 16 * trainable
    assert e.fits(e.total_bytes) and not e.fits(e.total_bytes - 1)


def test_quantized_formats_follow_their_definitions():
    real = tiny_llama()
    linears = [
        m for n, m in real.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")
    ]
    quantized = sum(m.weight.numel() for m in linears)
    rows = sum(m.weight.shape[0] for m in linears)
    rest = real_parameters(real) - quantized
    e8 = estimate_memory(real.config, base="int8")
    assert (
        e8.base_bytes == quantized + 4 * rows + 2 * rest
    )  # a byte a weight, an fp32 scale a row, 16-bit rest
    e4 = estimate_memory(real.config, base="nf4")
    # QLoRA's 0.127 bit per weight for double-quantized block constants: 8/64 + 32/(64 * 256)
    assert abs(e4.base_bytes - (quantized * (4 + 8 / 64 + 32 / (64 * 256)) / 8 + 2 * rest)) <= 1
    assert pytest.approx(0.127, abs=5e-4) == 8 / 64 + 32 / (64 * 256)
    plain = estimate_memory(real.config, base="nf4", double_quant=False)
    assert (
        abs(plain.base_bytes - (quantized * 4.5 / 8 + 2 * rest)) <= 1
    )  # fp32 absmax per 64: 0.5 bit
    assert estimate_memory(real.config, base="fp32").base_bytes == 4 * real_parameters(real)


def test_a_classifier_counts_its_new_head_and_bad_choices_are_named():
    real = tiny_bert()
    e = estimate_memory(real.config, kind="classification", method_fields={"rank": 2},
                        targets=["query", "value"], modules_to_save=["classifier"])  # fmt: skip
    lx.adapt_(real, lx.config("lora", rank=2), ["query", "value"], modules_to_save=["classifier"])
    assert e.trainable_parameters == sum(p.numel() for p in lx.trainable_parameters(real).values())
    with pytest.raises(ValueError, match="base must be one of"):
        estimate_memory(real.config, base="fp8")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        estimate_memory(real.config, optimizer="lion")
    assert not any(
        p.device.type == "meta" for p in tiny_bert().parameters()
    )  # nothing leaked onto meta
