"""LoRA-RITE (Yen et al., arXiv 2410.20625): three steps against a transcription of Algorithm 1 in the paper's
notation, gauge invariance of the whole trajectory and of the state, the r x r state, LoRA's B = 0 start, the other
parameters' AdamW step, a bf16 state round trip, and bad options. The shared contract is test_optim_contract.py."""

from __future__ import annotations

import copy

import pytest
import torch
from optim_cases import (
    LAYERS,
    data,
    loss_of,
    regauged,
    relative_gap,
    steps,
    two_layer_model,
    weights,
)
from torch import nn

import loraredux as lx
from loraredux.optim import create


def one_layer(seed: int = 0, rank: int = 3):
    """Linear(10 -> 8) with LoRA of rank 3 at random full-rank factors, and a least-squares problem."""
    torch.manual_seed(seed)
    model = lx.adapt_(nn.Sequential(nn.Linear(10, 8)).double(), lx.config("lora", rank=rank), ["0"])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model[0].A.copy_(torch.randn(rank, 10, generator=g, dtype=torch.float64))
        model[0].B.copy_(torch.randn(8, rank, generator=g, dtype=torch.float64))
    x = torch.randn(32, 10, generator=g, dtype=torch.float64)
    y = torch.randn(32, 8, generator=g, dtype=torch.float64)
    return model, x, y


def algorithm_1(A, B, grad_A, grad_B, memory, t, lr, beta1, beta2, eps, weight_decay, escape):
    """One step of LoRA-RITE in the paper's notation (Z = A B^T, A (m, r), B (n, r)), Algorithm 1 line by line, for
    both factors (the B update is the mirror image). QR, explicit inverses and the previous bases U_{t-1} kept, as
    printed; from the authors' code (github.com/gkevinyen5418/LoRA-RITE, lora_rite.py): the averages with beta2
    instead of Algorithm 1's sums, the bias-corrected decays, g^T g / m, eps after the square root and the decoupled
    weight decay. `memory` holds, per factor, U_prev (of the other factor), V, rho, M."""

    def decay(beta):
        return beta * (1 - beta ** (t - 1)) / (1 - beta**t)

    def d_lambda(X, Y):  # max_i lambda_i(X) - lambda_i(Y), eigenvalues in order
        return (torch.linalg.eigvalsh(X) - torch.linalg.eigvalsh(Y)).max().clamp_min(0)

    U_A, R_A = torch.linalg.qr(A)  # A = U_A R_A
    U_B, R_B = torch.linalg.qr(B)
    new = {}
    for name, X, grad, U, R in (("A", A, grad_A, U_B, R_B), ("B", B, grad_B, U_A, R_A)):
        mem = memory[name]
        r = X.shape[1]
        g = grad @ torch.linalg.inv(R)  # unmagnified gradient
        P = U.T @ mem["U_prev"] if t > 1 else torch.zeros(r, r, dtype=X.dtype)
        b1, b2 = decay(beta1), decay(beta2)
        PVP = P @ mem["V"] @ P.T
        rho = b2 * (mem["rho"] + d_lambda(mem["V"], PVP)) if escape else mem["rho"]
        V = b2 * PVP + (1 - b2) * g.T @ g / X.shape[0]
        w, Q = torch.linalg.eigh(V + rho * torch.eye(r, dtype=X.dtype))
        S = g @ Q @ torch.diag(1 / (w.sqrt() + eps)) @ Q.T  # g (V + rho I)^{-1/2}
        M = b1 * mem["M"] @ P.T + (1 - b1) * S
        new[name] = X - lr * (M @ torch.linalg.inv(R).T + weight_decay * X)
        memory[name] = {"U_prev": U, "V": V, "rho": rho, "M": M}
    return new["A"], new["B"]


@pytest.mark.parametrize(
    ("options", "escape_used"),
    [
        ({}, True),
        ({"betas": (0.5, 0.8), "eps": 0.0, "escape": True}, True),
        ({"betas": (0.9, 0.99), "eps": 1e-3, "escape": False, "weight_decay": 0.1}, False),
    ],
)
def test_three_steps_are_algorithm_1(options, escape_used):
    model, x, y = one_layer()
    lr = 0.05
    opt = create("lora_rite", model, lr=lr, **options)
    beta1, beta2 = options.get("betas", (0.9, 0.999))
    paper_options = {
        "lr": lr,
        "beta1": beta1,
        "beta2": beta2,
        "eps": options.get("eps", 1e-6),
        "weight_decay": options.get("weight_decay", 0.0),
        "escape": options.get("escape", True),
    }
    r = 3
    A_paper, B_paper = model[0].B.detach().clone(), model[0].A.detach().T.clone()  # ours: W0 + B A
    memory = {
        k: {"V": torch.zeros(r, r, dtype=torch.float64), "rho": 0.0, "M": torch.zeros_like(X)}
        for k, X in (("A", A_paper), ("B", B_paper))
    }
    for t in (1, 2, 3):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        grad_A_paper, grad_B_paper = model[0].B.grad.clone(), model[0].A.grad.T.clone()
        A_paper, B_paper = algorithm_1(
            A_paper, B_paper, grad_A_paper, grad_B_paper, memory, t, **paper_options
        )
        opt.step()
        torch.testing.assert_close(model[0].B.detach(), A_paper, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model[0].A.detach(), B_paper.T, rtol=1e-10, atol=1e-12)
    rho = memory["A"]["rho"] + memory["B"]["rho"]
    assert (float(rho) > 0) == escape_used  # the escaped-mass path was exercised (or off)


def spectra(opt, model, layer):
    """What of the state does not depend on the gauge: the spectra of the second moments, the escaped masses and
    the singular values of the first moments (each is only defined up to an orthogonal change of basis)."""
    out = []
    for p in (model.get_submodule(layer).A, model.get_submodule(layer).B):
        s = opt.state[p]
        out += [
            torch.linalg.eigvalsh(s["second_moment"]),
            s["escaped_mass"].reshape(1),
            torch.linalg.svdvals(s["first_moment"]),
        ]
    return torch.cat(out)


@pytest.mark.parametrize(
    "options", [{}, {"betas": (0.5, 0.9), "eps": 1e-3, "weight_decay": 0.2, "escape": False}]
)
def test_the_trajectory_and_the_state_are_gauge_invariant(options):
    """Six steps from (A, B) and from (G A, B G^{-1}): the same W' after every step, and the state agrees up to a
    rotation; AdamW (the negative control) drifts apart. Decoupled weight decay keeps the invariance: it scales both
    factors by 1 - lr wd, which commutes with G."""
    x, y = data()
    model = two_layer_model()
    other = regauged(model)
    opts = [create("lora_rite", m, lr=0.05, **options) for m in (model, other)]
    for _ in range(6):
        for m, opt in zip((model, other), opts, strict=True):
            steps(m, opt, x, y)
        for layer in LAYERS:
            assert relative_gap(weights(model)[layer], weights(other)[layer]) < 1e-10, layer
            torch.testing.assert_close(
                spectra(opts[1], other, layer),
                spectra(opts[0], model, layer),
                rtol=1e-8,
                atol=1e-12,
            )
    rho = float(opts[0].state[model.get_submodule("0").A]["escaped_mass"])
    assert (rho > 0) == options.get("escape", True)
    plain = [create("adamw", m, lr=0.05) for m in (model, other)]
    for m, opt in zip((model, other), plain, strict=True):
        steps(m, opt, x, y, n=3)
    assert relative_gap(weights(model)["0"], weights(other)["0"]) > 1e-4


def test_delta_breaks_the_invariance():
    """delta damps the factors' Gram matrices, a factor-space quantity (the negative control of the claim)."""
    x, y = data()
    model = two_layer_model()
    other = regauged(model)
    start = weights(model)
    for m in (model, other):
        steps(m, create("lora_rite", m, lr=0.05, delta=0.1), x, y, n=2)
    gap = relative_gap(weights(model)["0"] - start["0"], weights(other)["0"] - start["0"])
    assert gap > 1e-3


def test_the_state_is_r_by_r_besides_the_first_moment():
    x, y = data()
    model = two_layer_model(rank=3)
    opt = create("lora_rite", model, lr=0.05)
    steps(model, opt, x, y, n=2)
    for layer in LAYERS:
        for p in (model.get_submodule(layer).A, model.get_submodule(layer).B):
            state = opt.state[p]
            assert set(state) == {
                "step",
                "first_moment",
                "second_moment",
                "escaped_mass",
                "basis_overlap",
            }
            assert state["first_moment"].shape == p.shape
            for key in ("second_moment", "basis_overlap"):
                assert state[key].shape == (3, 3)
            assert state["escaped_mass"].numel() == state["step"].numel() == 1


def test_from_loras_init_b_moves_first_and_a_follows():
    """B = 0: R_B has no inverse, its pseudo-inverse is 0, so A's first step is zero (its gradient B^T G s is zero
    too) and B's is not; from the second step on both move, and nothing is non-finite (delta = 0)."""
    torch.manual_seed(0)
    fresh = lx.adapt_(nn.Sequential(nn.Linear(6, 5)).double(), lx.config("lora", rank=2), ["0"])
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 5, dtype=torch.float64)
    opt = create("lora_rite", fresh, lr=0.01)
    A0 = fresh[0].A.detach().clone()
    steps(fresh, opt, x, y)
    assert torch.equal(fresh[0].A, A0) and fresh[0].B.abs().sum() > 0
    before = loss_of(fresh, x, y).item()
    steps(fresh, opt, x, y, n=10)
    assert not torch.equal(fresh[0].A, A0)
    assert all(torch.isfinite(v).all() for s in opt.state.values() for v in s.values())
    assert loss_of(fresh, x, y).item() < before


def test_other_parameters_take_torchs_adamw_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 2)).double()
    lx.adapt_(model, lx.config("lora", rank=2), ["0"], modules_to_save=["1"])
    with torch.no_grad():
        model[0].B.normal_()
    head = model[1].module.weight
    reference = head.detach().clone().requires_grad_(True)
    ref_opt = torch.optim.AdamW([reference], lr=0.1, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    opt = create("lora_rite", model, lr=0.1, betas=(0.8, 0.9), weight_decay=0.1)
    assert [g["pair"] for g in opt.param_groups] == ["0", None]
    x = torch.randn(4, 6, dtype=torch.float64)
    for _ in range(2):
        opt.zero_grad()
        model(x).sum().backward()
        reference.grad = head.grad.clone()
        grads = [model[0].A.grad, model[0].B.grad]
        opt.step()
        ref_opt.step()
        assert (
            model[0].A.grad is grads[0] and model[0].B.grad is grads[1]
        )  # the pair's grads are left in place
    torch.testing.assert_close(head.detach(), reference.detach(), rtol=0, atol=0)


def test_bf16_factors_keep_a_float32_state_through_save_and_load():
    x, y = data()
    model = two_layer_model().to(torch.bfloat16)
    xb, yb = x.to(torch.bfloat16), y.to(torch.bfloat16)
    opt = create("lora_rite", model, lr=1e-2)
    steps(model, opt, xb, yb, n=2)
    A = model.get_submodule("0").A
    assert opt.state[A]["second_moment"].dtype == torch.float32
    twin = copy.deepcopy(model)
    twin_opt = create("lora_rite", twin, lr=1.0)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert twin_opt.state[twin.get_submodule("0").A]["second_moment"].dtype == torch.float32
    steps(model, opt, xb, yb, n=2)
    steps(twin, twin_opt, xb, yb, n=2)
    for layer, w in weights(model).items():
        torch.testing.assert_close(weights(twin)[layer], w, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("betas", (1.0, 0.9), "betas"),
        ("betas", (0.9,), "betas"),
        ("eps", -1e-8, "eps must be >= 0"),
        ("weight_decay", -0.1, "weight_decay must be >= 0"),
        ("delta", -1.0, "delta must be >= 0"),
        ("damping", 1.0, "damping"),
    ],
)
def test_bad_options_are_refused(option, value, message):
    with pytest.raises(ValueError, match=message):
        create("lora_rite", two_layer_model(), lr=0.1, **{option: value})


def test_a_pair_without_gradients_is_skipped():
    """Only layer "2" takes part in the loss: layer "0"'s factors and state stay as they were."""
    model = two_layer_model()
    opt = create("lora_rite", model, lr=0.05)
    A0 = model.get_submodule("0").A.detach().clone()
    opt.zero_grad()
    model.get_submodule("2")(torch.randn(4, 8, dtype=torch.float64)).sum().backward()
    opt.step()
    assert torch.equal(model.get_submodule("0").A, A0)
    assert not opt.state[model.get_submodule("0").A]
    assert opt.state[model.get_submodule("2").A]["step"].item() == 1
