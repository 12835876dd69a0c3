"""Measuring a whole model: each layer's numbers are those of its own weight and of the per-batch gradients an
independent autograd loop computes; gathering in chunks changes nothing, and the model is left as it was."""

from __future__ import annotations

import pytest
import torch

from loraredux.advisor.measure import noise_from_halves, singular_values, spectrum_stats
from loraredux.advisor.model import measure_model
from tiny_models import snapshot, tiny_llama


def batches(n: int = 4):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (2, 8), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def test_each_layer_is_measured_from_its_own_weight_and_gradients():
    model = tiny_llama()
    found = measure_model(model, batches(), targets=["q_proj", "down_proj"])
    assert list(found) == [f"model.layers.{i}.{k}" for i in (0, 1)
                           for k in ("self_attn.q_proj", "mlp.down_proj")]  # fmt: skip
    # the same gradients by hand: one backward per batch
    for p in model.parameters():
        p.requires_grad_(False)
    for path, m in found.items():
        W = model.get_submodule(path).weight
        W.requires_grad_(True)
        grads = []
        for batch in batches():
            W.grad = None
            model(**batch).loss.backward()
            grads.append(W.grad.detach().clone())
        W.requires_grad_(False)
        W.grad = None
        G = torch.stack(grads).mean(0)
        torch.testing.assert_close(m.gradient.energy, spectrum_stats(singular_values(G)).energy)
        halves = ((grads[0] + grads[2]) / 2, (grads[1] + grads[3]) / 2)  # even and odd batches
        assert m.noise == pytest.approx(noise_from_halves(*halves), rel=1e-9)
        assert m.weight.stable_rank == pytest.approx(spectrum_stats(singular_values(W)).stable_rank)
        assert m.input_condition is not None and m.input_condition >= 1
    # gathered in chunks of one layer: the same numbers
    chunked = measure_model(tiny_llama(), batches(), targets=["q_proj", "down_proj"], max_bytes=1)
    for path, m in found.items():
        assert chunked[path].noise == pytest.approx(m.noise, rel=1e-12)
        assert chunked[path].needed_rank == m.needed_rank


def test_weights_only_and_the_model_is_left_alone():
    model = tiny_llama()
    before = snapshot(model)
    found = measure_model(model, targets=["v_proj"])
    assert all(m.gradient is None and m.noise is None for m in found.values())
    measure_model(model, batches(2), targets=["v_proj"])
    after = snapshot(model)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]) and before[2] == after[2]
    with pytest.raises(ValueError, match="match no module of LlamaForCausalLM"):
        measure_model(model, targets=["nothing_here"])
