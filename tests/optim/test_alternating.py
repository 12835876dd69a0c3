"""Alternating solvers (AltLoRA, ALS): AltLoRA against a literal transcription of its update and its gauge
invariance over several steps; ALS's exact block solves against lstsq, its convergence on matrix sensing at
condition numbers 1, 10 and 100, its gradient-block mode, its guards on non-quadratic losses, and bad input."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from optim_cases import closure_for, data, loss_of, two_layer_model
from torch import nn

import loraredux as lx
from loraredux.optim import create
from loraredux.optim.functional import als_block_solve, als_matrix_sensing, conjugate_gradient

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- AltLoRA -----------------------------------------------------------------------------------------------------


def one_layer(
    seed: int = 0, rank: int = 3, alpha: float = 6.0
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Linear(10 -> 8) with LoRA of rank 3 (scale 2) at random full-rank factors, and least-squares data."""
    torch.manual_seed(seed)
    model = lx.adapt_(
        nn.Sequential(nn.Linear(10, 8)).double(), lx.config("lora", rank=rank, alpha=alpha), ["0"]
    )
    g = gen(seed + 1)
    with torch.no_grad():
        model[0].A.copy_(torch.randn(rank, 10, generator=g, dtype=F64))
        model[0].B.copy_(torch.randn(8, rank, generator=g, dtype=F64))
    return (
        model,
        torch.randn(32, 10, generator=g, dtype=F64),
        torch.randn(32, 8, generator=g, dtype=F64),
    )


def sq_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def plain_steps(model, opt, x, y, n):
    for _ in range(n):
        opt.zero_grad()
        sq_loss(model, x, y).backward()
        opt.step()


@pytest.mark.parametrize("first", ["A", "B"])
def test_altlora_is_the_papers_update(first):
    """Four steps against AltLoRA written out with explicit inverses (arXiv 2505.12455, §3): one factor per step,
    A~ = (1/s^2) (B^T B + d I)^{-1} g_A, M_A = beta (B^T B + d I)^{-1} B^T B_prev M_A + (1 - beta) A~, and the
    mirror image for B; decoupled weight decay."""
    model, x, y = one_layer()
    s = model[0].scale
    lr, beta, d, wd = 0.05, 0.8, 0.3, 0.1
    opt = create("altlora", model, lr=lr, beta=beta, delta=d, first=first, weight_decay=wd)
    A, B = model[0].A.detach().clone(), model[0].B.detach().clone()
    M_A, M_B = torch.zeros_like(A), torch.zeros_like(B)
    # the opposite factor at each factor's previous update (any basis will do while the momentum is zero)
    B_seen_by_A, A_seen_by_B = torch.zeros_like(B), torch.zeros_like(A)
    eye = torch.eye(3, dtype=F64)
    order = ["A", "B"] if first == "A" else ["B", "A"]
    for t in range(4):
        # the reference: the gradient at the current (A, B) by hand from a twin
        twin = copy.deepcopy(model)
        sq_loss(twin, x, y).backward()
        gA, gB = twin[0].A.grad, twin[0].B.grad
        if order[t % 2] == "A":
            K = torch.linalg.inv(B.T @ B + d * eye)
            M_A = beta * K @ B.T @ B_seen_by_A @ M_A + (1 - beta) * K @ gA / s**2
            B_seen_by_A = B.clone()
            A = A * (1 - lr * wd) - lr * M_A
        else:
            K = torch.linalg.inv(A @ A.T + d * eye)
            M_B = beta * M_B @ A_seen_by_B @ A.T @ K + (1 - beta) * gB @ K / s**2
            A_seen_by_B = A.clone()
            B = B * (1 - lr * wd) - lr * M_B
        plain_steps(model, opt, x, y, 1)
        torch.testing.assert_close(model[0].A.detach(), A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model[0].B.detach(), B, rtol=1e-10, atol=1e-12)


def test_altlora_moves_one_factor_per_step_and_alternates():
    model, x, y = one_layer()
    opt = create("altlora", model, lr=0.05)
    moved = []
    for _ in range(4):
        A, B = model[0].A.detach().clone(), model[0].B.detach().clone()
        plain_steps(model, opt, x, y, 1)
        changed = (not torch.equal(model[0].A, A), not torch.equal(model[0].B, B))
        moved.append(changed)
    assert moved == [(True, False), (False, True), (True, False), (False, True)]


def regauge(model: nn.Module, layers: list[str], seed: int = 5) -> nn.Module:
    other = copy.deepcopy(model)
    g = gen(seed)
    for name in layers:
        layer = other.get_submodule(name)
        r = layer.A.shape[0]
        G = torch.eye(r, dtype=F64) + 0.5 * torch.randn(r, r, generator=g, dtype=F64)
        assert torch.linalg.cond(G) < 10
        with torch.no_grad():
            layer.A.copy_(G @ layer.A)
            layer.B.copy_(layer.B @ torch.linalg.inv(G))
    return other


def gap(P: torch.Tensor, Q: torch.Tensor) -> float:
    return (torch.linalg.matrix_norm(P - Q) / torch.linalg.matrix_norm(P)).item()


@pytest.mark.parametrize(
    ("options", "invariant"),
    [({"delta": 0.0}, True), ({"delta": 0.5}, False), ({"delta": 0.0, "weight_decay": 0.5}, True)],
)
def test_altlora_stays_gauge_invariant_over_steps_with_its_carried_momentum(options, invariant):
    """Five steps (A, B, A, B, A: the momentum is carried across changed subspaces twice) from (A, B) and from
    (G A, B G^{-1}): the same W' with delta = 0, also with decoupled weight decay (a scalar factor commutes with
    G); damping breaks it."""
    model, x, y = one_layer()
    other = regauge(model, ["0"])
    start = model[0].effective_weight().detach()
    for m in (model, other):
        plain_steps(m, create("altlora", m, lr=0.1, **options), x, y, 5)
    g = gap(
        model[0].effective_weight().detach() - start, other[0].effective_weight().detach() - start
    )
    assert (g < 1e-8) if invariant else (g > 1e-3), g


def test_altlora_refuses_a_singular_metric_and_changes_nothing():
    """LoRA's B = 0 start with delta = 0: (B^T B)^{-1} does not exist; the error names the fix."""
    torch.manual_seed(0)
    fresh = lx.adapt_(nn.Sequential(nn.Linear(4, 4)).double(), lx.config("lora", rank=2), ["0"])
    opt = create("altlora", fresh, lr=0.1, delta=0.0)
    fresh(torch.randn(3, 4, dtype=F64)).sum().backward()
    before = {k: v.clone() for k, v in lx.adapter_state_dict(fresh).items()}
    with pytest.raises(ValueError, match="use delta > 0"):
        opt.step()
    for k, v in lx.adapter_state_dict(fresh).items():
        assert torch.equal(v, before[k]), k
    assert not opt.state_dict()["state"] or all(
        float(s.get("step", 0)) == 0 for s in opt.state_dict()["state"].values()
    )
    # starting with B is defined from B = 0 (A A^T > 0)
    create("altlora", fresh, lr=0.1, first="B", delta=0.0).step()
    assert fresh[0].B.abs().sum() > 0


def test_altlora_error_in_a_later_pair_leaves_every_pair_and_its_state_unchanged():
    """Two pairs; the second's B^T B turns singular at an A step: the first pair's momentum and basis must not
    have been written either."""
    x, y = data()
    model = two_layer_model()
    opt = create("altlora", model, lr=0.05, delta=0.0)
    for _ in range(2):
        opt.step(closure_for(model, opt, x, y))
    with torch.no_grad():
        model.get_submodule("2").B.zero_()
    params = {k: v.clone() for k, v in lx.adapter_state_dict(model).items()}
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="singular"):
        opt.step(closure_for(model, opt, x, y))
    for k, v in lx.adapter_state_dict(model).items():
        assert torch.equal(v, params[k]), k
    after = opt.state_dict()["state"]
    for key, per_param in state["state"].items():
        for field, value in per_param.items():
            assert torch.equal(after[key][field], value), (key, field)


# --- ALS: matrix sensing through the optimizer API ----------------------------------------------------------------

OUT, IN, R = 12, 10, 3


class Sensing(nn.Module):
    """y_i = <X_i, W'> for an adapted Linear(IN -> OUT) without bias, W0 = 0, so W' = s B A: the adapted layer
    applied to the rows of X_i gives X_i W'^T, whose trace is <X_i, W'>."""

    def __init__(self, scale_alpha: float = 6.0) -> None:
        super().__init__()
        self.layer = nn.Linear(IN, OUT, bias=False).double()
        with torch.no_grad():
            self.layer.weight.zero_()
        lx.adapt_(self, lx.config("lora", rank=R, alpha=scale_alpha), ["layer"])

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.layer(X).diagonal(dim1=-2, dim2=-1).sum(-1)  # (m,)


def sensing_problem(kappa: float, seed: int = 0, oversample: int = 8):
    """A rank-R target with singular values from 1 down to 1/kappa, Gaussian measurements (m = oversample R (OUT +
    IN)), and the spectral start: the best rank-R approximation of (1/m) sum_i y_i X_i."""
    g = gen(seed)
    U, _ = torch.linalg.qr(torch.randn(OUT, R, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(IN, R, generator=g, dtype=F64))
    sv = torch.logspace(0, -torch.log10(torch.tensor(float(kappa))).item(), R, dtype=F64)
    M = U @ torch.diag(sv) @ V.T
    m = oversample * R * (OUT + IN)
    X = torch.randn(m, OUT, IN, generator=g, dtype=F64)
    y = (X * M).sum((1, 2))
    Us, ss, Vs = torch.linalg.svd((y[:, None, None] * X).mean(0))
    return M, X, y, Us[:, :R] * ss[:R].sqrt(), ss[:R].sqrt()[:, None] * Vs[:R]


def sensing_model(A: torch.Tensor, B: torch.Tensor) -> Sensing:
    model = Sensing()
    s = model.layer.scale
    with torch.no_grad():
        model.layer.A.copy_(A)
        model.layer.B.copy_(B / s)  # so that s B A is the spectral estimate
    return model


def sensing_closure(model, opt, X, y):
    def closure():
        opt.zero_grad()
        loss = ((model(X) - y) ** 2).sum() / 2
        loss.backward()
        return loss

    return closure


def relative_error(model: Sensing, M: torch.Tensor) -> float:
    return (
        torch.linalg.matrix_norm(model.layer.effective_weight().detach() - M)
        / torch.linalg.matrix_norm(M)
    ).item()


@pytest.mark.parametrize("kappa", [1.0, 10.0, 100.0])
def test_als_converges_in_a_handful_of_sweeps_at_any_condition_number(kappa):
    """Matrix sensing from a spectral start: relative error 1e-6 within 10 sweeps (20 closure steps) for kappa = 1,
    10 and 100, and the iterates are those of the literal ALS (functional lstsq reference) sweep by sweep."""
    M, X, y, B0, A0 = sensing_problem(kappa)
    model = sensing_model(A0, B0)
    s = model.layer.scale
    opt = create("als", model, lr=1.0)
    A_ref, B_ref = model.layer.A.detach().clone(), model.layer.B.detach().clone()
    for _sweep in range(10):
        for _ in range(2):
            opt.step(sensing_closure(model, opt, X, y))
        A_ref, B_ref = als_matrix_sensing(X, y, A_ref, B_ref, sweeps=1, scale=s)
        torch.testing.assert_close(
            model.layer.effective_weight().detach(), s * B_ref @ A_ref, rtol=1e-7, atol=1e-9
        )
        if relative_error(model, M) <= 1e-6:
            break
    assert relative_error(model, M) <= 1e-6, (kappa, relative_error(model, M))


def test_gradient_descent_is_slowed_by_the_condition_number_on_the_same_problem():
    """The negative control: gradient descent on both factors from the same spectral start (step 0.5 / m, stable
    for sigma_max = 1) reaches machine precision in 1000 steps at kappa = 1 but is still far from 1e-6 at
    kappa = 100, where ALS needs a handful of sweeps."""
    errors = {}
    for kappa in (1.0, 100.0):
        M, X, y, B, A = sensing_problem(kappa)
        m = X.shape[0]
        Xf = X.reshape(m, -1)  # (m, OUT * IN)
        for _ in range(1000):
            G = ((Xf @ (B @ A).reshape(-1) - y) @ Xf).reshape(OUT, IN)  # the gradient in W
            A, B = A - 0.5 / m * B.T @ G, B - 0.5 / m * G @ A.T
        errors[kappa] = (torch.linalg.matrix_norm(B @ A - M) / torch.linalg.matrix_norm(M)).item()
    assert errors[1.0] < 1e-10 and errors[100.0] > 1e-4, errors


@pytest.mark.parametrize("first", ["A", "B"])
def test_als_half_step_is_the_exact_block_least_squares_solution(first):
    """From a random (A, B), the first closure step gives the lstsq solution for the first block, the second step
    the one for the other block (each checked against torch.linalg.lstsq through als_block_solve)."""
    _, X, y, _, _ = sensing_problem(10.0, seed=3)
    g = gen(4)
    model = sensing_model(
        torch.randn(R, IN, generator=g, dtype=F64), torch.randn(OUT, R, generator=g, dtype=F64)
    )
    s = model.layer.scale
    opt = create("als", model, lr=1.0, first=first)
    for factor in (first, "B" if first == "A" else "A"):
        A, B = model.layer.A.detach().clone(), model.layer.B.detach().clone()
        expected = als_block_solve(X, y, A, B, factor, scale=s)
        opt.step(sensing_closure(model, opt, X, y))
        moved, still = (
            (model.layer.A, model.layer.B) if factor == "A" else (model.layer.B, model.layer.A)
        )
        torch.testing.assert_close(moved.detach(), expected, rtol=1e-8, atol=1e-10)
        assert torch.equal(still.detach(), B if factor == "A" else A)


@pytest.mark.parametrize("factor", ["A", "B"])
def test_als_block_solve_is_a_stationary_point_of_the_least_squares_loss(factor):
    """The functional reference itself: at its solution the autograd gradient of the block's loss is zero."""
    _, X, y, _, _ = sensing_problem(10.0, seed=5)
    g = gen(6)
    A, B = torch.randn(R, IN, generator=g, dtype=F64), torch.randn(OUT, R, generator=g, dtype=F64)
    sol = als_block_solve(X, y, A, B, factor, scale=2.0).requires_grad_(True)
    AA, BB = (sol, B) if factor == "A" else (A, sol)
    loss = (((X * (2.0 * BB @ AA)).sum((1, 2)) - y) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, sol)
    assert torch.linalg.matrix_norm(grad) < 1e-8 * (torch.linalg.matrix_norm(X.flatten(0, 1)) ** 2)


def test_als_exact_block_solve_is_gauge_invariant_on_a_least_squares_loss():
    """The block minimizer is a property of W', so on a quadratic block the closure step does not depend on the gauge
    (als is not in GAUGE_INVARIANT: on non-quadratic losses its CG steps do)."""
    _, X, y, B0, A0 = sensing_problem(10.0, seed=7)
    model = sensing_model(A0 + 0.1, B0 - 0.1)
    other = regauge(model, ["layer"])
    for m in (model, other):
        opt = create("als", m, lr=1.0)
        opt.step(sensing_closure(m, opt, X, y))
    assert (
        gap(model.layer.effective_weight().detach(), other.layer.effective_weight().detach()) < 1e-8
    )


# --- ALS: the mode without closure, guards, state, bad input -------------------------------------------------------


def test_als_without_closure_is_block_sgd_one_block_per_step():
    """Each step is A <- A - lr grad_A with B frozen, then B <- B - lr grad_B with A frozen, and so on."""
    model, x, y = one_layer()
    opt = create("als", model, lr=0.03)
    for t in range(4):
        twin = copy.deepcopy(model)
        sq_loss(twin, x, y).backward()
        A, B = model[0].A.detach().clone(), model[0].B.detach().clone()
        plain_steps(model, opt, x, y, 1)
        if t % 2 == 0:
            torch.testing.assert_close(
                model[0].A.detach(), A - 0.03 * twin[0].A.grad, rtol=0, atol=1e-15
            )
            assert torch.equal(model[0].B.detach(), B)
        else:
            torch.testing.assert_close(
                model[0].B.detach(), B - 0.03 * twin[0].B.grad, rtol=0, atol=1e-15
            )
            assert torch.equal(model[0].A.detach(), A)


def test_als_closure_steps_decrease_a_non_quadratic_loss():
    """On the tanh model (not quadratic in a block) every closure step lowers the loss: the line search guards the
    CG direction."""
    x, y = data()
    model = two_layer_model()
    opt = create("als", model, lr=1e-2)
    losses = [loss_of(model, x, y).item()]
    for _ in range(6):
        opt.step(closure_for(model, opt, x, y))
        losses.append(loss_of(model, x, y).item())
    assert all(b < a for a, b in itertools.pairwise(losses)), losses


def test_als_on_negative_curvature_takes_the_gradient_direction():
    """A loss concave in the block: CG meets negative curvature at once and falls back to -g, whose full step
    already satisfies the sufficient-decrease test (a concave function lies below its tangent)."""
    model, x, _ = one_layer()
    opt = create("als", model, lr=1.0)

    def concave():
        opt.zero_grad()
        loss = -(model(x) ** 2).mean()
        loss.backward()
        return loss

    twin = copy.deepcopy(model)
    (-(twin(x) ** 2).mean()).backward()
    A = model[0].A.detach().clone()
    opt.step(concave)
    torch.testing.assert_close(model[0].A.detach(), A - twin[0].A.grad, rtol=1e-12, atol=1e-12)


def test_als_closure_mode_state_round_trips_and_per_group_lr_zero_holds_a_pair():
    x, y = data()
    model = two_layer_model()
    opt = create("als", model, lr=1e-2, cg_iters=20)
    opt.step(closure_for(model, opt, x, y))
    twin = copy.deepcopy(model)
    twin_opt = create("als", twin, lr=1.0)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert twin_opt.param_groups[0]["cg_iters"] == 20
    for m, o in ((model, opt), (twin, twin_opt)):
        o.param_groups[0]["lr"] = 0.0  # layer "0": held fixed
        before = m.get_submodule("0").effective_weight().detach().clone()
        for _ in range(2):  # the B block, then the A block again
            o.step(closure_for(m, o, x, y))
        assert torch.equal(m.get_submodule("0").effective_weight().detach(), before)
    for name in ("0", "2"):
        torch.testing.assert_close(
            model.get_submodule(name).effective_weight(),
            twin.get_submodule(name).effective_weight(),
            rtol=0,
            atol=0,
        )


def test_als_non_finite_gradient_inside_the_solve_changes_nothing():
    """A closure whose gradient turns NaN away from the start: the CG probe raises, the block is restored and the
    step counter does not move."""
    model, x, y = one_layer()
    opt = create("als", model, lr=1.0)
    A0 = model[0].A.detach().clone()

    def closure():
        opt.zero_grad()
        loss = sq_loss(model, x, y)
        loss.backward()
        if not torch.equal(model[0].A, A0):
            model[0].A.grad[0, 0] = float("nan")
        return loss

    params = {k: v.clone() for k, v in lx.adapter_state_dict(model).items()}
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step(closure)
    for k, v in lx.adapter_state_dict(model).items():
        assert torch.equal(v, params[k]), k
    assert all(float(s["step"]) == 0 for s in opt.state_dict()["state"].values())


def test_als_refuses_a_closure_that_returns_nothing_or_leaves_no_gradient():
    model, x, y = one_layer()
    opt = create("als", model, lr=1.0)

    def closure():
        opt.zero_grad()
        sq_loss(model, x, y).backward()

    with pytest.raises(ValueError, match="closure must return the loss"):
        opt.step(closure)

    def no_backward():
        opt.zero_grad()
        return sq_loss(model, x, y)

    with pytest.raises(ValueError, match=r"must call loss.backward\(\)"):
        opt.step(no_backward)


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [
        ("als", "first", "C"),
        ("als", "cg_tol", 0.0),
        ("als", "cg_iters", 0),
        ("als", "cg_iters", 2.5),
        ("als", "damping", -1.0),
        ("altlora", "first", "b"),
        ("altlora", "beta", 1.0),
        ("altlora", "delta", -1e-3),
        ("altlora", "weight_decay", -0.1),
    ],
)
def test_bad_options_are_named(name, option, value):
    with pytest.raises(ValueError, match=option):
        create(name, one_layer()[0], lr=0.1, **{option: value})


@pytest.mark.parametrize("name", ["als", "altlora"])
def test_dora_pairs_and_other_parameters_step(name):
    """DoRA's direction factors form the pair; its magnitude (an "other" parameter) moves every step."""
    torch.manual_seed(0)
    model = lx.adapt_(nn.Sequential(nn.Linear(10, 8)).double(), lx.config("dora", rank=3), ["0"])
    with torch.no_grad():
        model[0].B.normal_()
    x, _ = data()
    y = torch.randn(32, 8, generator=gen(9), dtype=F64)
    opt = create(name, model, lr=1e-2)
    assert [g["pair"] for g in opt.param_groups] == ["0", None]
    magnitude = model[0].magnitude.detach().clone()
    before = sq_loss(model, x, y).item()
    for _ in range(4):
        if name == "als":
            opt.step(closure_for_sq(model, opt, x, y))
        else:
            plain_steps(model, opt, x, y, 1)
    assert not torch.equal(model[0].magnitude, magnitude)
    assert sq_loss(model, x, y).item() < before


def closure_for_sq(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = sq_loss(model, x, y)
        loss.backward()
        return loss

    return closure


def test_conjugate_gradient_solves_spd_systems_and_stops_at_negative_curvature():
    g = gen(11)
    Q = torch.randn(20, 20, generator=g, dtype=F64)
    H = Q @ Q.T + 0.1 * torch.eye(20, dtype=F64)
    b = torch.randn(20, generator=g, dtype=F64)
    result = conjugate_gradient(lambda v: H @ v, b, tol=1e-12, max_iters=200)
    torch.testing.assert_close(result.solution, -torch.linalg.solve(H, b), rtol=1e-8, atol=1e-10)
    assert not result.negative_curvature
    damped = conjugate_gradient(lambda v: H @ v, b, tol=1e-12, max_iters=200, damping=2.0)
    torch.testing.assert_close(
        damped.solution, -torch.linalg.solve(H + 2 * torch.eye(20, dtype=F64), b)
    )
    flipped = conjugate_gradient(lambda v: -H @ v, b, tol=1e-12, max_iters=200)
    assert flipped.negative_curvature and flipped.iterations == 1
    torch.testing.assert_close(flipped.solution, -b)
