"""Every registered method on a real Hugging Face model: the packaged MiniLM (all-MiniLM-L6-v2) and its real weights.

The contract suite checks the mathematics on tiny layers; this file checks that each method builds on real
pre-trained weights (real spectra for the SVD-based methods, BERT's 384 x 384 and 1536 x 384 layers), trains (one
optimizer step changes the outputs), merges into a plain transformers model with the same outputs, and saves and
loads with the same outputs, in the format `lx.save_adapter` picks for it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import loraredux as lx
from loraredux import assets
from loraredux.core import config_class

pytestmark = pytest.mark.slow

METHODS = lx.available_methods()
# A small config for each method (fields as in `loraredux methods`), on query/value and the MLP's first layer.
FIELDS = {"adalora": {"init_r": 4, "target_r": 2, "total_step": 10}, "krona": {}, "svft": {}}
TARGETS = ["query", "value", "intermediate.dense"]


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    model, tokenizer = assets.load_minilm(num_labels=2)
    batch = tokenizer(
        ["a gripping, beautifully shot film", "two hours I will never get back"],
        return_tensors="pt",
        padding=True,
    )
    return model.eval(), batch


def config_for(method: str) -> lx.AdapterConfig:
    fields = FIELDS.get(
        method, {"rank": 4} if "rank" in config_class(method).__dataclass_fields__ else {}
    )
    return lx.config(method, **fields)


def logits(model: torch.nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_merges_and_round_trips_on_minilm(method, minilm, tmp_path: Path):
    base, batch = minilm
    model = lx.adapt_(copy.deepcopy(base), config_for(method), TARGETS)
    assert len(list(lx.adapters(model))) == 18  # 6 blocks x 3 targets
    before = logits(base, batch)
    if config_class(method).identity_at_init:
        torch.testing.assert_close(logits(model, batch), before, rtol=1e-5, atol=1e-5)

    # One training step with the loop users run: the outputs move.
    labels = torch.tensor([1, 0])
    loss_fn = lambda m, b: torch.nn.functional.cross_entropy(m(**b).logits, labels)  # noqa: E731
    lx.train.fit(model, [batch], loss_fn, lx.train.TrainConfig(steps=1, lr=1e-2), progress=False)
    model.eval()
    trained = logits(model, batch)
    assert (trained - before).abs().max() > 1e-6  # fp32 noise here is ~1e-9; AdaLoRA moves by ~4e-5

    lx.save_adapter(model, tmp_path)
    loaded = lx.load_adapter(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, batch), trained, rtol=1e-5, atol=1e-5)

    lx.merge_(model)
    assert not list(lx.adapters(model))
    torch.testing.assert_close(logits(model, batch), trained, rtol=1e-4, atol=1e-4)
