"""PEFT files for adapters on a quantized base, both ways: an adapter trained with loraredux on a 4-bit (or 8-bit)
base, saved in PEFT's format, loads in PEFT onto PEFT's own quantized model (transformers' BitsAndBytesConfig with
the same settings) with the same logits, and a QLoRA adapter trained with PEFT loads onto a loraredux quantized
model with the same logits.

Both sides run bitsandbytes' own layers on the same codes (`lx.quantize_` gives the codes transformers gives, see
tests/test_quant.py), so the logits agree to the last bit on these versions; the tolerance is 1e-6 absolute. What
the comparison needs on CPU, and why:
- BERT's head: transformers quantizes every linear layer but those in `llm_int8_skip_modules`, the classifier
  included, and PEFT cannot train a 4-bit module to save; a sequence classifier is loaded with
  `llm_int8_skip_modules=["classifier"]` (lx.quantize_'s "all-linear" leaves the head dense itself).
- eval mode: on CPUs with AVX512-BF16 a transformers-loaded `Linear4bit` repacks its codes for a bfloat16 kernel at
  its first call without autograd (outputs move by about 1e-2); the tests turn that off, as `lx.quantize_` does.
- int8: an `lx.quantize_` layer has no outlier threshold (bitsandbytes' default 0), transformers' default is 6.0,
  which changes inference (not training); PEFT's model is loaded with `llm_int8_threshold=0.0`.
"""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import BertForSequenceClassification, BitsAndBytesConfig, LlamaForCausalLM

import loraredux as lx
from tiny_models import tiny_bert, tiny_llama

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.parity

IDS = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))
LABELS = torch.tensor([0, 2, 1])
TOLERANCE = 1e-6


def bert() -> torch.nn.Module:
    dims = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128}
    return tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **dims).float()


MODELS = {
    "llama": (
        lambda: tiny_llama(hidden=64, intermediate_size=128, dtype=torch.float32),
        LlamaForCausalLM,
    ),
    "bert": (bert, BertForSequenceClassification),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each tiny model saved with save_pretrained, as a user's checkpoint folder."""
    out = {}
    for name, (make, _) in MODELS.items():
        out[name] = tmp_path_factory.mktemp(name)
        make().save_pretrained(out[name])
    return out


def bnb_config(name: str, fmt: str) -> BitsAndBytesConfig:
    """transformers' settings for the codes `lx.quantize_(model, fmt)` makes (QLoRA's NF4 by default)."""
    skip = ["classifier"] if name == "bert" else None
    if fmt == "int8":
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=0.0, llm_int8_skip_modules=skip
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=fmt,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=skip,
    )


def no_cpu_repacking(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def load(name: str, folder, fmt: str, source: str) -> torch.nn.Module:
    """The model quantized by loraredux (`lx.quantize_` after loading) or by transformers."""
    cls = MODELS[name][1]
    if source == "lx":
        return lx.quantize_(cls.from_pretrained(folder, dtype=torch.float32), fmt)
    model = cls.from_pretrained(
        folder, quantization_config=bnb_config(name, fmt), dtype=torch.float32
    )
    return no_cpu_repacking(model)


def loss(name: str, model: torch.nn.Module) -> torch.Tensor:
    if name == "llama":
        return model(input_ids=IDS, labels=IDS).loss
    return model(input_ids=IDS, labels=LABELS).loss


def train(name: str, model: torch.nn.Module, params) -> None:
    """Three AdamW steps, so B is far from 0 and every adapter tensor matters."""
    model.train()
    optimizer = torch.optim.AdamW(params, lr=3e-2)
    for _ in range(3):
        loss(name, model).backward()
        optimizer.step()
        optimizer.zero_grad()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


CASES = [
    ("llama", "nf4", "lx"),
    ("llama", "nf4", "bnb"),
    ("bert", "nf4", "lx"),
    ("bert", "nf4", "bnb"),
    ("llama", "fp4", "lx"),
    ("llama", "int8", "lx"),
    ("bert", "int8", "bnb"),
]


@pytest.mark.parametrize(("name", "fmt", "source"), CASES)
def test_an_adapter_trained_on_a_quantized_base_loads_in_peft(folders, tmp_path, name, fmt, source):
    ours = load(name, folders[name], fmt, source)
    saved = ["classifier"] if name == "bert" else None
    lx.adapt_(ours, lx.config("lora", rank=4, alpha=8), "all-linear", modules_to_save=saved)
    assert {a.view.format for _, a in lx.adapters(ours)} == {fmt}
    train(name, ours, lx.trainable_parameters(ours).values())
    expected = logits(ours)
    with lx.disabled(ours):
        assert (logits(ours) - expected).abs().max() > 1e-2  # the trained adapter matters
    lx.save_adapter(ours, tmp_path, format="peft")

    theirs = peft.PeftModel.from_pretrained(load(name, folders[name], fmt, "bnb"), tmp_path)
    torch.testing.assert_close(logits(theirs), expected, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize(("name", "fmt"), [("llama", "nf4"), ("bert", "nf4"), ("llama", "int8")])
def test_a_peft_qlora_adapter_loads_onto_a_loraredux_quantized_model(folders, tmp_path, name, fmt):
    task = "SEQ_CLS" if name == "bert" else "CAUSAL_LM"
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type=task)
    theirs = peft.get_peft_model(load(name, folders[name], fmt, "bnb"), config)
    train(name, theirs, [p for p in theirs.parameters() if p.requires_grad])
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path)

    ours = lx.load_adapter(load(name, folders[name], fmt, "lx"), tmp_path)
    assert {a.view.format for _, a in lx.adapters(ours)} == {fmt}
    torch.testing.assert_close(logits(ours), expected, rtol=0, atol=TOLERANCE)
    with lx.disabled(ours):
        assert (logits(ours) - expected).abs().max() > 1e-2
