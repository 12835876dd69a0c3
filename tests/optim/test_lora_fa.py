"""LoRA-FA: A frozen, B's gradient projected onto A's row space; against the formula, the least-squares property
and PEFT's create_lorafa_optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loraredux as lx
from loraredux.optim import create, lora_fa_gradient


def model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = lx.adapt_(nn.Sequential(nn.Linear(10, 8)).double(), lx.config("lora", rank=3), ["0"])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model[0].A.copy_(torch.randn(3, 10, generator=g, dtype=torch.float64))
        model[0].B.copy_(torch.randn(8, 3, generator=g, dtype=torch.float64))
    x = torch.randn(32, 10, generator=g, dtype=torch.float64)
    y = torch.randn(32, 8, generator=g, dtype=torch.float64)
    return model, x, y


def test_projected_gradient_is_the_closest_low_rank_step_to_the_full_gradient():
    """s g A = G A^T (A A^T)^{-1} A: the projection of the full gradient G onto A's row space."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 10, generator=g, dtype=torch.float64)
    G = torch.randn(8, 10, generator=g, dtype=torch.float64)
    s = 2.5
    grad_B = s * G @ A.T  # the chain rule through W' = W0 + s B A
    step = s * lora_fa_gradient(grad_B, A, s, delta=0.0) @ A
    P = A.T @ torch.linalg.inv(A @ A.T) @ A  # projector onto A's row space
    torch.testing.assert_close(step, G @ P, rtol=1e-10, atol=1e-12)
    # least squares: no other g gives a step closer to G
    other = lora_fa_gradient(grad_B, A, s, 0.0) + 1e-3 * torch.randn(
        8, 3, generator=g, dtype=torch.float64
    )
    assert torch.linalg.matrix_norm(s * other @ A - G) > torch.linalg.matrix_norm(step - G)


def test_a_is_frozen_and_b_takes_adamw_on_the_projected_gradient():
    model, x, y = model_and_data()
    A = model[0].A.detach().clone()
    opt = create("lora_fa", model, lr=1e-2)
    assert not model[0].A.requires_grad
    ((model(x) - y) ** 2).mean().backward()
    assert model[0].A.grad is None
    twin_B = model[0].B.detach().clone().requires_grad_(True)
    twin_B.grad = lora_fa_gradient(model[0].B.grad, A, model[0].scale)
    torch.optim.AdamW([twin_B], lr=1e-2).step()
    opt.step()
    assert torch.equal(model[0].A, A)
    torch.testing.assert_close(model[0].B, twin_B, rtol=0, atol=0)


@pytest.mark.parity
def test_lora_fa_matches_peft(monkeypatch):
    """Three steps of ours and PEFT's create_lorafa_optimizer on identical weights (PEFT's projection run in
    float64, not under its CPU bfloat16 autocast; both with eps 1e-12, where the two AdamW forms agree)."""
    peft = pytest.importorskip("peft")
    import peft.optimizers.lorafa as lorafa

    monkeypatch.setattr(lorafa, "is_bf16_available", lambda: False)
    ours, x, y = model_and_data()
    theirs = peft.get_peft_model(
        nn.Sequential(nn.Linear(10, 8)).double(),
        peft.LoraConfig(r=3, lora_alpha=8, target_modules=["0"]),
    )
    inner = theirs.base_model.model[0]
    with torch.no_grad():
        inner.base_layer.load_state_dict(ours[0].base.state_dict())
        inner.lora_A["default"].weight.copy_(ours[0].A)
        inner.lora_B["default"].weight.copy_(ours[0].B)
    opt = create("lora_fa", ours, lr=1e-2, eps=1e-12, weight_decay=0.0)
    # PEFT 0.22 reads r and alpha from the LoraConfig (0.21 took them as arguments)
    ref = lorafa.create_lorafa_optimizer(theirs, lr=1e-2)
    ref.param_groups[0]["eps"] = 1e-12
    for _ in range(3):
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            o.step()
    torch.testing.assert_close(ours[0].A, inner.lora_A["default"].weight, rtol=0, atol=0)
    torch.testing.assert_close(ours[0].B, inner.lora_B["default"].weight, rtol=1e-8, atol=1e-10)


def test_bad_input():
    with pytest.raises(ValueError, match="needs factor pairs"):
        create("lora_fa", nn.Linear(3, 3), lr=0.1)
    with pytest.raises(ValueError, match="grad_B"):
        lora_fa_gradient(torch.zeros(4, 2), torch.zeros(3, 5), 1.0)
    model, x, y = model_and_data()
    opt = create("lora_fa", model, lr=0.1)
    ((model(x) - y) ** 2).mean().backward()
    model[0].B.grad[0, 0] = float("inf")
    B = model[0].B.detach().clone()
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    assert torch.equal(model[0].B, B)
