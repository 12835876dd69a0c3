"""Every registered initialiser on the packaged MiniLM (real pre-trained weights, real text).

The tiny-model tests check each init's mathematics; this file checks them on BERT's real 384 x 384 and 1536 x 384
layers with real calibration text: the function is kept at init where promised, `lx.disabled` and
`lx.unadapt_` give back the original model, and the PEFT file (a moved base written as the rank-2r plain LoRA)
loads in PEFT on a fresh copy of the original model with the same outputs.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import loraredux as lx
from loraredux import assets

pytestmark = pytest.mark.slow

TARGETS = ["query", "value", "intermediate.dense"]
TEXTS = [
    "a gripping, beautifully shot film",
    "two hours I will never get back",
    "the plot wanders but the actors hold it together",
    "flat, loud and far too long",
]


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    model, tokenizer = assets.load_minilm(num_labels=2)
    batch = tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    calibration = []
    for i in (0, 2):
        b = tokenizer(TEXTS[i : i + 2], return_tensors="pt", padding=True)
        calibration.append({**b, "labels": torch.tensor([1, 0])})
    return model.eval(), batch, calibration


def logits(model: torch.nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("name", lx.init.available())
def test_init_on_minilm(name: str, minilm, tmp_path: Path) -> None:
    base, batch, calibration = minilm
    spec = lx.init.get(name)
    model = copy.deepcopy(base)
    data = (
        {"calibration": calibration, "calibration_options": {"progress": False}}
        if spec.needs
        else {}
    )
    torch.manual_seed(0)
    lx.adapt_(model, lx.config("lora", rank=4, alpha=8, init=name), TARGETS, **data)
    before = logits(base, batch)
    if spec.identity:
        torch.testing.assert_close(logits(model, batch), before, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # as after training: every factor moved
        for p in lx.trainable_parameters(model).values():
            p.add_(0.01 * torch.randn_like(p))
    expected = logits(model, batch)
    assert not torch.allclose(expected, before, atol=1e-4)
    with lx.disabled(model):
        torch.testing.assert_close(logits(model, batch), before, rtol=1e-4, atol=1e-4)
    if not spec.moves_base or spec.exact:
        peft = pytest.importorskip("peft")
        lx.save_adapter(model, tmp_path, format="peft")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        torch.testing.assert_close(logits(theirs, batch), expected, rtol=1e-4, atol=1e-4)
    lx.unadapt_(model)
    torch.testing.assert_close(logits(model, batch), before, rtol=1e-5, atol=1e-5)
