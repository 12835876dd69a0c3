"""Scaled (Riemannian-preconditioned) GD on LoRA pairs: gauge invariance with a negative control, the update
against a literal transcription, conditioning-independent convergence, and the optimizer's contract."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import loraredux as lx
from loraredux.optim import create, riemannian_precondition


def model_and_data(seed: int = 0, rank: int = 3):
    torch.manual_seed(seed)
    model = lx.adapt_(nn.Sequential(nn.Linear(10, 8)).double(), lx.config("lora", rank=rank), ["0"])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model[0].A.copy_(torch.randn(rank, 10, generator=g, dtype=torch.float64))
        model[0].B.copy_(torch.randn(8, rank, generator=g, dtype=torch.float64))
    x = torch.randn(32, 10, generator=g, dtype=torch.float64)
    y = torch.randn(32, 8, generator=g, dtype=torch.float64)
    return model, x, y


def loss_of(model, x, y):
    return ((model(x) - y) ** 2).mean()


def one_step(model, x, y, opt):
    opt.zero_grad()
    loss_of(model, x, y).backward()
    opt.step()
    return model[0].effective_weight().detach()


def regauged(model, seed: int = 5):
    """The same W' with (A, B) -> (G A, B G^{-1}) for a random well-conditioned G."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    r = model[0].A.shape[0]
    G = torch.eye(r, dtype=torch.float64) + 0.5 * torch.randn(
        r, r, generator=g, dtype=torch.float64
    )
    assert torch.linalg.cond(G) < 10
    with torch.no_grad():
        other[0].A.copy_(G @ model[0].A)
        other[0].B.copy_(model[0].B @ torch.linalg.inv(G))
    torch.testing.assert_close(other[0].effective_weight(), model[0].effective_weight())
    return other


def peft_twin(peft, ours):
    """PEFT's LoRA layer on the same base and factors as `ours` (r = 3, alpha = 8)."""
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=3, lora_alpha=8, target_modules=["0"]),
        nn.Sequential(nn.Linear(10, 8)).double(),
    )
    with torch.no_grad():
        theirs[0].base_layer.load_state_dict(ours[0].base.state_dict())
        theirs[0].lora_A["default"].weight.copy_(ours[0].A)
        theirs[0].lora_B["default"].weight.copy_(ours[0].B)
    return theirs


def three_steps(runs, x, y):
    """Three optimizer steps of each (model, optimizer), interleaved."""
    for _ in range(3):
        for model, o in runs:
            o.zero_grad()
            loss_of(model, x, y).backward()
            o.step()


def relative_gap(P, Q):
    return (torch.linalg.matrix_norm(P - Q) / torch.linalg.matrix_norm(P)).item()


@pytest.mark.parametrize(
    ("name", "options", "invariant"),
    [
        ("scaled_sgd", {"delta": 0.0}, True),
        ("adamw", {}, False),  # the negative controls: plain methods depend on the gauge
        ("sgd", {}, False),
    ],
)
def test_one_step_is_gauge_invariant_only_for_the_scaled_method(name, options, invariant):
    model, x, y = model_and_data()
    other = regauged(model)

    def make(m):
        if name == "sgd":
            return torch.optim.SGD(lx.trainable_parameters(m).values(), lr=0.05)
        return create(name, m, lr=0.05, **options)

    gap = relative_gap(one_step(model, x, y, make(model)), one_step(other, x, y, make(other)))
    if invariant:
        assert gap < 1e-10
    else:
        assert gap > 1e-3


def test_the_step_is_the_papers_update():
    """A - lr (B^T B + d I)^{-1} grad_A and B - lr grad_B (A A^T + d I)^{-1}, written with explicit inverses."""
    model, x, y = model_and_data()
    A, B = model[0].A.detach().clone(), model[0].B.detach().clone()
    loss_of(model, x, y).backward()
    gA, gB = model[0].A.grad.clone(), model[0].B.grad.clone()
    lr, d = 0.1, 0.3
    eye = torch.eye(3, dtype=torch.float64)
    expected_A = A - lr * torch.linalg.inv(B.T @ B + d * eye) @ gA
    expected_B = B - lr * gB @ torch.linalg.inv(A @ A.T + d * eye)
    create("scaled_sgd", model, lr=lr, delta=d).step()
    torch.testing.assert_close(model[0].A.detach(), expected_A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[0].B.detach(), expected_B, rtol=1e-12, atol=1e-12)


def iterations_to(kappa: float, scaled: bool, tol: float = 1e-6, limit: int = 20000) -> int:
    """Factorization min 1/2 ||B A - M||_F^2 with M of rank r and condition number kappa, from a perturbed
    spectral start; GD with step 0.5 / sigma_max (its stable range) against scaled GD with step 0.5."""
    g = torch.Generator().manual_seed(0)
    n, m, r = 20, 15, 3
    U, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), r, dtype=torch.float64)
    M = U @ torch.diag(s) @ V.T
    noise = (
        0.3 * s[-1]
    )  # a start close enough that both methods converge, off by the smallest scale
    B = U @ torch.diag(s.sqrt()) + noise * torch.randn(n, r, generator=g, dtype=torch.float64)
    A = torch.diag(s.sqrt()) @ V.T + noise * torch.randn(r, m, generator=g, dtype=torch.float64)
    lr = 0.5 if scaled else 0.5 / s[0].item()
    for t in range(limit):
        R = B @ A - M
        if torch.linalg.matrix_norm(R) <= tol * torch.linalg.matrix_norm(M):
            return t
        gA, gB = B.T @ R, R @ A.T
        if scaled:
            gA, gB = riemannian_precondition(gA, gB, A, B, 0.0)
        A, B = A - lr * gA, B - lr * gB
    return limit


def test_scaled_gd_iterations_do_not_grow_with_the_condition_number():
    scaled = [iterations_to(k, scaled=True) for k in (1, 10, 100)]
    plain = [iterations_to(k, scaled=False) for k in (1, 10, 100)]
    assert max(scaled) <= 2 * min(scaled) + 5  # nearly flat in kappa
    assert plain[2] > 20 * plain[0]  # gradient descent slows down with kappa
    assert plain[2] > 10 * scaled[2]


def test_state_dict_round_trip_closure_and_per_group_options():
    model, x, y = model_and_data()
    opt = create("scaled_sgd", model, lr=0.05, delta=0.1)
    assert [g["pair"] for g in opt.param_groups] == ["0"]
    twin = copy.deepcopy(model)
    twin_opt = create("scaled_sgd", twin, lr=1.0)
    twin_opt.load_state_dict(opt.state_dict())
    assert twin_opt.param_groups[0]["lr"] == 0.05 and twin_opt.param_groups[0]["delta"] == 0.1
    for m, o in ((model, opt), (twin, twin_opt)):
        o.param_groups[0]["lr"] = 0.02  # per-group options are read at every step

        def closure(m=m, o=o):
            o.zero_grad()
            loss = loss_of(m, x, y)
            loss.backward()
            return loss

        assert o.step(closure) is not None
    torch.testing.assert_close(
        model[0].effective_weight(), twin[0].effective_weight(), rtol=0, atol=0
    )


def test_other_parameters_take_plain_sgd_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 2)).double()
    lx.adapt_(model, lx.config("lora", rank=2), ["0"], modules_to_save=["1"])
    with torch.no_grad():
        model[0].B.normal_()
    x = torch.randn(4, 6, dtype=torch.float64)
    opt = create("scaled_sgd", model, lr=0.1, delta=1e-3)
    assert [g["pair"] for g in opt.param_groups] == ["0", None]
    head = model[1].module.weight
    before = head.detach().clone()
    model(x).sum().backward()
    grad = head.grad.clone()
    opt.step()
    torch.testing.assert_close(head.detach(), before - 0.1 * grad)


def test_bad_input_is_refused_and_changes_nothing():
    with pytest.raises(ValueError, match="no trainable parameter"):
        create("scaled_sgd", nn.Linear(3, 3).requires_grad_(False), lr=0.1)
    with pytest.raises(ValueError, match="unknown optimizer 'nosuch'"):
        create("nosuch", nn.Linear(3, 3), lr=0.1)
    with pytest.raises(ValueError, match="needs factor pairs"):
        create("scaled_sgd", nn.Linear(3, 3), lr=0.1)
    with pytest.raises(ValueError, match="delta must be >= 0"):
        create("scaled_sgd", model_and_data()[0], lr=0.1, delta=-1.0)
    with pytest.raises(ValueError, match="unexpected keyword argument 'damping'"):
        create("scaled_sgd", model_and_data()[0], lr=0.1, damping=1.0)
    # LoRA starts at B = 0: B^T B is singular, so delta = 0 cannot precondition A; the error says so
    torch.manual_seed(0)
    fresh = lx.adapt_(nn.Sequential(nn.Linear(4, 4)).double(), lx.config("lora", rank=2), ["0"])
    x = torch.randn(3, 4, dtype=torch.float64)
    fresh(x).sum().backward()
    before = {k: v.clone() for k, v in lx.adapter_state_dict(fresh).items()}
    with pytest.raises(ValueError, match="use delta > 0"):
        create("scaled_sgd", fresh, lr=0.1, delta=0.0).step()
    # a non-finite gradient: an error, and no parameter moved
    fresh[0].B.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        create("scaled_sgd", fresh, lr=0.1, delta=1e-3).step()
    for k, v in lx.adapter_state_dict(fresh).items():
        assert torch.equal(v, before[k]), k


def test_loraplus_puts_b_at_ratio_times_lr():
    model, _, _ = model_and_data()
    opt = create("loraplus", model, lr=1e-3, ratio=16)
    assert opt.param_groups[0]["params"][0] is model[0].A and opt.param_groups[0]["lr"] == 1e-3
    assert opt.param_groups[1]["params"][0] is model[0].B and opt.param_groups[1]["lr"] == 16e-3
    assert isinstance(create("adamw", model, lr=1e-3), torch.optim.AdamW)


def test_default_delta_is_pefts_and_steps_from_loras_init():
    """delta defaults to PEFT's reg = 1e-2, so the first step from B = 0 is defined (A still gets no update)."""
    torch.manual_seed(0)
    fresh = lx.adapt_(nn.Sequential(nn.Linear(4, 4)).double(), lx.config("lora", rank=2), ["0"])
    opt = create("scaled_sgd", fresh, lr=0.1)
    assert opt.param_groups[0]["delta"] == 1e-2
    fresh(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
    A = fresh[0].A.detach().clone()
    opt.step()
    assert torch.equal(fresh[0].A, A) and fresh[0].B.abs().sum() > 0


@pytest.mark.parity
@pytest.mark.parametrize("delta", [1e-2, 0.5])
def test_scaled_adamw_matches_pefts_riemannian_optimizer(delta):
    """Three steps of our scaled AdamW and PEFT's create_riemannian_optimizer(AdamW) on identical weights."""
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_riemannian_optimizer

    ours, x, y = model_and_data()
    theirs = peft_twin(peft, ours)
    opt = create("scaled_adamw", ours, lr=1e-2, delta=delta, weight_decay=0.01)
    ref = create_riemannian_optimizer(
        theirs, torch.optim.AdamW, lr=1e-2, reg=delta, weight_decay=0.01
    )
    three_steps(((ours, opt), (theirs, ref)), x, y)
    torch.testing.assert_close(ours[0].A, theirs[0].lora_A["default"].weight, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours[0].B, theirs[0].lora_B["default"].weight, rtol=1e-9, atol=1e-12)


def test_scaled_adamw_is_adamw_on_the_preconditioned_gradient():
    """One step equals torch's AdamW fed the scaled gradients by hand."""
    model, x, y = model_and_data()
    twin = copy.deepcopy(model)
    opt = create("scaled_adamw", model, lr=1e-2, delta=0.1)
    loss_of(model, x, y).backward()
    opt.step()
    loss_of(twin, x, y).backward()
    A, B = twin[0].A, twin[0].B
    gA, gB = riemannian_precondition(A.grad, B.grad, A, B, 0.1)
    A.grad, B.grad = gA, gB
    torch.optim.AdamW([A, B], lr=1e-2).step()
    torch.testing.assert_close(model[0].A, twin[0].A, rtol=0, atol=0)
    torch.testing.assert_close(model[0].B, twin[0].B, rtol=0, atol=0)


@pytest.mark.parity
def test_loraplus_matches_pefts_loraplus_optimizer():
    """Three AdamW steps with B at 16 x lr: ours and PEFT's create_loraplus_optimizer on identical weights."""
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    ours, x, y = model_and_data()
    theirs = peft_twin(peft, ours)
    opt = create("loraplus", ours, lr=1e-3, ratio=16)
    ref = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    three_steps(((ours, opt), (theirs, ref)), x, y)
    torch.testing.assert_close(
        ours[0].A, theirs[0].lora_A["default"].weight, rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(
        ours[0].B, theirs[0].lora_B["default"].weight, rtol=1e-12, atol=1e-14
    )
