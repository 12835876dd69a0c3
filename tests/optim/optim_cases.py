"""Shared problems for the optimizer tests: a float64 two-layer model with two LoRA pairs at random (full-rank)
factors, a least-squares loss, the gauge transform (A, B) -> (G A, B G^{-1}), and step helpers.

`CONTRACT_OPTIONS` and `GAUGE_INVARIANT` are the two tables every optimizer appears in (tests/optim/
test_optim_contract.py reads them).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import loraredux as lx

# Options for the contract suite where an optimizer's defaults do not suit the tiny problem (empty = defaults).
CONTRACT_OPTIONS: dict[str, dict[str, Any]] = {}

# The optimizers that claim gauge invariance, with the options under which they have it: one step from (A, B) and
# from (G A, B G^{-1}) gives the same W' (float64, relative gap < 1e-8). Every other optimizer must fail the same
# check (the negative control), so a claim cannot be missing and a wrong claim cannot pass.
GAUGE_INVARIANT: dict[str, dict[str, Any]] = {
    "altlora": {"delta": 0.0},
    "lora_rite": {"delta": 0.0},  # any betas, eps, weight_decay, escape
    "lora_pro": {"delta": 0.0, "x": "zero"},  # not the default x: Sylvester's X is 1st-order only
    "reflora": {"mode": "refactor", "delta": 0.0},  # not the default mode, "precondition"
    "scaled_sgd": {"delta": 0.0},
}

LAYERS = ("0", "2")  # the adapted layers of `two_layer_model`


def two_layer_model(seed: int = 0, rank: int = 3) -> nn.Module:
    """Linear(10 -> 8), Tanh, Linear(8 -> 6), both linears LoRA of rank 3 with random full-rank A and B."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 6)).double()
    lx.adapt_(model, lx.config("lora", rank=rank), list(LAYERS))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in LAYERS:
            layer = model.get_submodule(name)
            layer.A.copy_(torch.randn(layer.A.shape, generator=g, dtype=torch.float64) / 2)
            layer.B.copy_(torch.randn(layer.B.shape, generator=g, dtype=torch.float64) / 2)
    return model


def data(seed: int = 0, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 2)
    return (
        torch.randn(n, 10, generator=g, dtype=torch.float64),
        torch.randn(n, 6, generator=g, dtype=torch.float64),
    )


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def closure_for(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    return closure


def steps(model: nn.Module, opt: torch.optim.Optimizer, x, y, n: int = 1) -> None:
    """n steps, each: zero_grad, backward, step() without a closure."""
    for _ in range(n):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """W' of each adapted layer (detached)."""
    return {name: model.get_submodule(name).effective_weight().detach() for name in LAYERS}


def regauged(model: nn.Module, seed: int = 5) -> nn.Module:
    """A copy with the same W' and (A, B) -> (G A, B G^{-1}) for a random well-conditioned G per layer."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    for name in LAYERS:
        layer = other.get_submodule(name)
        r = layer.A.shape[0]
        G = torch.eye(r, dtype=torch.float64) + 0.5 * torch.randn(
            r, r, generator=g, dtype=torch.float64
        )
        assert torch.linalg.cond(G) < 10
        with torch.no_grad():
            layer.A.copy_(G @ layer.A)
            layer.B.copy_(layer.B @ torch.linalg.inv(G))
    for name, w in weights(model).items():
        torch.testing.assert_close(weights(other)[name], w)
    return other


def relative_gap(P: torch.Tensor, Q: torch.Tensor) -> float:
    return (torch.linalg.matrix_norm(P - Q) / torch.linalg.matrix_norm(P)).item()
