"""BAR (Li, Zhang, He, arXiv 2410.14802): the update against a transcription of the paper's rule, the regularizer's
gradient against autograd, the balancedness it pulls toward 0 (with gradient flow's conservation law as the
control), SAM and nBAR moving the balancedness the same way on the paper's toy problem, and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import loraredux as lx
from loraredux.optim import create
from loraredux.optim.functional import (
    balancedness,
    bar_coefficient,
    bar_gradient,
    bar_regularizer,
    bar_sign,
    gram_imbalance,
)


def model_and_data(seed: int = 0, a: float = 0.3, b: float = 2.0, n: int = 64):
    """One LoRA layer (10 -> 8, rank 3) with an imbalanced pair (||B|| >> ||A||), float64."""
    torch.manual_seed(seed)
    model = lx.adapt_(nn.Sequential(nn.Linear(10, 8)).double(), lx.config("lora", rank=3), ["0"])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model[0].A.copy_(a * torch.randn(3, 10, generator=g, dtype=torch.float64))
        model[0].B.copy_(b * torch.randn(8, 3, generator=g, dtype=torch.float64))
    x = torch.randn(n, 10, generator=g, dtype=torch.float64)
    y = torch.randn(n, 8, generator=g, dtype=torch.float64)
    return model, x, y


def loss_of(model, x, y):
    return ((model(x) - y) ** 2).mean()


def steps(model, opt, x, y, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()


def pair_balancedness(model) -> float:
    return balancedness(model[0].A, model[0].B).item()


# --- the update, transcribed -----------------------------------------------------------------------------------


def paper_bar_adamw(
    model, x, y, n, lr, mu0, variant, schedule, T, decoupled, betas=(0.9, 0.999), eps=1e-8, wd=0.01
):
    """n steps of BAR on AdamW written out in the paper's notation, independently of loraredux.optim.

    LoRA is W0 + s X Y^T (§5.1) with X = B (d1 x r), Y = A^T (d2 x r). Per step t (0-based):
        mu_t = mu0 | mu0 (1 - t/T) | mu0 (1 + cos(pi t/T)) / 2   (0 for t >= T)              (§5.2, schedule)
        nBAR: s = +1 if ||g_X||^2 < ||g_Y||^2 else -1;  oBAR: s = +1 if ||X|| >= ||Y|| else -1   (§5.2)
        regularizer (mu_t / 2) s (||X||^2 - ||Y||^2), gradient (mu_t s X, -mu_t s Y)
        decoupled (as AdamW's weight decay, App. A.6): X <- (1 - lr mu_t s) X, Y <- (1 + lr mu_t s) Y
        coupled: g_X <- g_X + mu_t s X, g_Y <- g_Y - mu_t s Y
        AdamW (Loshchilov & Hutter): X <- (1 - lr wd) X; m, v moments; X <- X - lr m_hat / (sqrt(v_hat) + eps)
    Returns the final (A, B).
    """
    layer = model[0]
    W0, b0, s_lora = layer.base.weight.detach(), layer.base.bias.detach(), layer.scale
    X = layer.B.detach().clone()  # (d1, r)
    Y = layer.A.detach().T.clone()  # (d2, r)
    m = {"X": torch.zeros_like(X), "Y": torch.zeros_like(Y)}
    v = {"X": torch.zeros_like(X), "Y": torch.zeros_like(Y)}
    for t in range(n):
        Xg, Yg = X.clone().requires_grad_(True), Y.clone().requires_grad_(True)
        W = W0 + s_lora * Xg @ Yg.T
        loss = ((x @ W.T + b0 - y) ** 2).mean()
        gX, gY = torch.autograd.grad(loss, (Xg, Yg))
        frac = min(t / T, 1.0) if T else 0.0
        mu_t = {
            "constant": mu0,
            "linear": mu0 * (1 - frac),
            "cosine": mu0 * (1 + math.cos(math.pi * frac)) / 2,
        }[schedule]
        if variant == "nbar":
            s = 1.0 if (gX**2).sum() < (gY**2).sum() else -1.0
        else:
            s = 1.0 if X.norm() >= Y.norm() else -1.0
        if decoupled:
            X, Y = (1 - lr * mu_t * s) * X, (1 + lr * mu_t * s) * Y
        else:
            gX, gY = gX + mu_t * s * X, gY - mu_t * s * Y
        new = {}
        for key, P, g in (("X", X, gX), ("Y", Y, gY)):
            m[key] = betas[0] * m[key] + (1 - betas[0]) * g
            v[key] = betas[1] * v[key] + (1 - betas[1]) * g**2
            m_hat = m[key] / (1 - betas[0] ** (t + 1))
            v_hat = v[key] / (1 - betas[1] ** (t + 1))
            new[key] = (1 - lr * wd) * P - lr * m_hat / (v_hat.sqrt() + eps)
        X, Y = new["X"], new["Y"]
    return Y.T, X


@pytest.mark.parametrize(
    "variant, schedule, T, decoupled",
    [
        ("nbar", "constant", None, True),
        ("obar", "constant", None, True),
        ("nbar", "linear", 2, True),  # mu_2 = 0: the third step is plain AdamW
        ("obar", "cosine", 4, True),
        ("nbar", "constant", None, False),
    ],
)
def test_three_steps_match_the_papers_update(variant, schedule, T, decoupled):
    model, x, y = model_and_data()
    want_A, want_B = paper_bar_adamw(model, x, y, 3, 1e-2, 0.5, variant, schedule, T, decoupled)
    opt = create(
        "bar",
        model,
        lr=1e-2,
        mu=0.5,
        variant=variant,
        schedule=schedule,
        total_steps=T,
        decoupled=decoupled,
    )
    steps(model, opt, x, y, 3)
    torch.testing.assert_close(model[0].A.detach(), want_A, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model[0].B.detach(), want_B, rtol=1e-10, atol=1e-12)


def test_the_regularizer_is_not_a_no_op_in_the_transcription():
    """The transcription's BAR term matters: mu = 0.5 and mu = 0 give different iterates (so the match above is not
    two copies of AdamW agreeing)."""
    model, x, y = model_and_data()
    with_bar = paper_bar_adamw(model, x, y, 3, 1e-2, 0.5, "nbar", "constant", None, True)
    without = paper_bar_adamw(model, x, y, 3, 1e-2, 0.0, "nbar", "constant", None, True)
    assert (with_bar[1] - without[1]).norm() > 1e-3 * without[1].norm()


# --- the regularizer ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_regularizer_gradient_matches_autograd(sign):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 10, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(8, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mu = 0.7
    written_out = mu / 2 * sign * ((B**2).sum() - (A**2).sum())
    torch.testing.assert_close(bar_regularizer(A, B, sign, mu), written_out, rtol=1e-14, atol=0)
    gA, gB = torch.autograd.grad(written_out, (A, B))
    rA, rB = bar_gradient(A.detach(), B.detach(), sign, mu)
    torch.testing.assert_close(rA, gA, rtol=1e-14, atol=0)
    torch.testing.assert_close(rB, gB, rtol=1e-14, atol=0)


def test_balancedness_is_half_the_trace_of_the_gram_imbalance():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(4, 9, generator=g, dtype=torch.float64)
    B = torch.randn(7, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(balancedness(A, B), 0.5 * ((B**2).sum() - (A**2).sum()))
    torch.testing.assert_close(balancedness(A, B), 0.5 * torch.trace(gram_imbalance(A, B)))
    # a balanced (SVD-split) pair of the same product has zero matrix imbalance
    U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
    Bb, Ab = U[:, :4] * S[:4].sqrt(), S[:4].sqrt()[:, None] * Vh[:4]
    torch.testing.assert_close(Bb @ Ab, B @ A)
    torch.testing.assert_close(gram_imbalance(Ab, Bb), torch.zeros(4, 4, dtype=torch.float64))


def test_sign_rules():
    """nBAR follows the gradients (SAM's Theorem 2), oBAR the factors' norms (|𝓑|'s subgradient)."""
    A, B = torch.ones(2, 3), 5 * torch.ones(4, 2)  # ||B|| > ||A||
    small_A, big_A = torch.full((2, 3), 0.1), torch.full((2, 3), 10.0)
    small_B, big_B = torch.full((4, 2), 0.1), torch.full((4, 2), 10.0)
    assert bar_sign("nbar", A, B, grad_A=big_A, grad_B=small_B) == 1.0  # shrink B, grow A
    assert bar_sign("nbar", A, B, grad_A=small_A, grad_B=big_B) == -1.0
    assert bar_sign("obar", A, B, grad_A=small_A, grad_B=big_B) == 1.0
    assert bar_sign("obar", 9 * A, B, grad_A=small_A, grad_B=big_B) == -1.0


def test_schedules():
    assert bar_coefficient(0.5, 7, None, "constant") == 0.5
    assert bar_coefficient(0.5, 0, 10, "linear") == 0.5
    assert bar_coefficient(0.5, 5, 10, "linear") == pytest.approx(0.25)
    assert bar_coefficient(0.5, 12, 10, "linear") == 0.0
    assert bar_coefficient(0.5, 5, 10, "cosine") == pytest.approx(0.25)
    assert bar_coefficient(0.5, 10, 10, "cosine") == pytest.approx(0.0)


# --- what it is for: balancedness ---------------------------------------------------------------------------------


def test_bar_pulls_the_balancedness_toward_zero_where_adamw_does_not():
    model, x, y = model_and_data()
    start = pair_balancedness(model)
    assert start > 10  # ||B|| >> ||A||
    ends = {}
    for name, opts in (("adamw", {}), ("bar", {"mu": 0.5}), ("bar_obar", {"variant": "obar"})):
        twin = copy.deepcopy(model)
        steps(twin, create(name.split("_")[0], twin, lr=1e-2, **opts), x, y, 100)
        ends[name] = pair_balancedness(twin)
    assert abs(ends["bar"]) < 0.4 * abs(ends["adamw"]), ends
    assert abs(ends["bar_obar"]) < 0.4 * abs(ends["adamw"]), ends
    assert abs(ends["bar"]) < 0.3 * start, ends


def test_gradient_flow_conserves_the_gram_imbalance():
    """The control (conservation law, Theorem 1; Arora et al. 2018): tiny-lr GD moves W' a lot but leaves
    B^T B - A A^T almost where it was (the drift is O(lr^2) per step)."""
    model, x, y = model_and_data()
    G0 = gram_imbalance(model[0].A, model[0].B).detach().clone()
    W0 = model[0].effective_weight().detach().clone()
    steps(model, torch.optim.SGD(lx.trainable_parameters(model).values(), lr=1e-3), x, y, 300)
    G1 = gram_imbalance(model[0].A, model[0].B).detach()
    moved = (model[0].effective_weight().detach() - W0).norm() / W0.norm()
    assert moved > 0.3
    assert (G1 - G0).norm() / G0.norm() < 2e-3


def test_from_loras_init_nbar_shrinks_A_as_sam_would():
    """At B = 0 the gradient of A is 0 and B's is not, so nBAR's sign is -1 (SAM's Theorem 2 raises 𝓑 < 0 toward
    0): A <- (1 - lr mu) A, then AdamW's decay (its own step on A is 0)."""
    model, x, y = model_and_data()
    with torch.no_grad():
        model[0].B.zero_()
    A0 = model[0].A.detach().clone()
    opt = create("bar", model, lr=1e-2, mu=0.5)
    steps(model, opt, x, y, 1)
    torch.testing.assert_close(model[0].A.detach(), (1 - 1e-2 * 0.01) * (1 - 1e-2 * 0.5) * A0)


# --- SAM and BAR on the paper's toy problem ------------------------------------------------------------------------

TRUTH = torch.diag(
    torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)
)  # App. A.4: A = diag(0.5, 0, 0)
NOISE = torch.diag(
    torch.tensor([1.0, 0.8, 0.5], dtype=torch.float64)
)  # N = diag(1, .8, .5) U, U iid N(0, 1)


def toy_grads(x, y, N):
    """Stochastic gradients of ||x y^T - (A + N)||^2 (the NOP example of Fig. 1(a), 2)."""
    x, y = x.detach().requires_grad_(True), y.detach().requires_grad_(True)
    return torch.autograd.grad(((x @ y.T - (TRUTH + N)) ** 2).sum(), (x, y))


def toy_step(method, x, y, N, lr=1e-3, rho=0.05, mu=1.0):
    """One step of GD, SAM (Alg. 1: ascend rho g / ||g||, descend the gradient there) or GD + nBAR, with LoRA's
    A = y^T (1, 3) and B = x (3, 1)."""
    gx, gy = toy_grads(x, y, N)
    if method == "sam":
        u = rho / torch.sqrt(gx.square().sum() + gy.square().sum())
        gx, gy = toy_grads(x + u * gx, y + u * gy, N)
    elif method == "nbar":
        sign = bar_sign("nbar", y.T, x, gy.T, gx)
        rA, rB = bar_gradient(y.T, x, sign, mu)
        gx, gy = gx + rB, gy + rA.T
    return x - lr * gx, y - lr * gy


def test_sam_and_nbar_move_the_balancedness_the_same_way_each_step():
    """Against plain GD from the same point, one SAM step and one nBAR step change 𝓑 in the same direction (the
    sign of ||g_X||^2 - ||g_Y||^2, Theorem 2), from random points of either imbalance."""
    g = torch.Generator().manual_seed(3)
    for k in range(20):
        x = torch.randn(3, 1, generator=g, dtype=torch.float64)
        y = torch.randn(3, 1, generator=g, dtype=torch.float64) * (3.0 if k % 2 else 1 / 3)
        N = NOISE @ torch.randn(3, 3, generator=g, dtype=torch.float64)
        after = {}
        for method in ("gd", "sam", "nbar"):
            x1, y1 = toy_step(method, x, y, N)
            after[method] = balancedness(y1.T, x1)
        sam, nbar = torch.sign(after["sam"] - after["gd"]), torch.sign(after["nbar"] - after["gd"])
        assert sam == nbar != 0, k


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_sam_and_nbar_balance_the_toy_problem_and_gd_does_not(alpha):
    """The paper's Fig. 1(a)/2(b) setting, shortened (x0 = [.2, -.1, .3], y0 = -3 x0, 3000 steps of lr 1e-3): GD
    keeps 𝓑 near 𝓑0 = -0.56; SAM (rho 0.1) and GD + nBAR (mu 1) shrink |𝓑| well below it."""
    x0 = torch.tensor([[0.2], [-0.1], [0.3]], dtype=torch.float64)
    ends = {}
    for method in ("gd", "sam", "nbar"):
        g = torch.Generator().manual_seed(0)
        x, y = x0, -3 * x0
        for _ in range(3000):
            N = alpha * NOISE @ torch.randn(3, 3, generator=g, dtype=torch.float64)
            x, y = toy_step(method, x, y, N, rho=0.1)
        ends[method] = balancedness(y.T, x).item()
    start = balancedness(-3 * x0.T, x0).item()
    assert abs(ends["gd"] - start) < 0.1 * abs(start), ends
    assert abs(ends["sam"]) < 0.5 * abs(ends["gd"]), ends
    assert abs(ends["nbar"]) < 0.5 * abs(ends["gd"]), ends


# --- options and bad input -------------------------------------------------------------------------------------------


def test_per_group_mu_is_honoured():
    """mu = 0 in layer "0"'s group: after one step (same gradients in both runs) that layer is exactly AdamW's,
    while layer "2" (mu = 0.5) is not. And mu = 0 everywhere is AdamW for every step."""
    from optim_cases import data, two_layer_model, weights
    from optim_cases import steps as case_steps

    x, y = data()
    model, twin = two_layer_model(), two_layer_model()
    opt = create("bar", model, lr=1e-2, mu=0.5)
    for group in opt.param_groups:
        if group["pair"] == "0":
            group["mu"] = 0.0
    case_steps(model, opt, x, y, n=1)
    case_steps(twin, create("adamw", twin, lr=1e-2), x, y, n=1)
    torch.testing.assert_close(weights(model)["0"], weights(twin)["0"], rtol=0, atol=0)
    assert (weights(model)["2"] - weights(twin)["2"]).norm() > 1e-6
    model, twin = two_layer_model(), two_layer_model()
    case_steps(model, create("bar", model, lr=1e-2, mu=0.0), x, y, n=3)
    case_steps(twin, create("adamw", twin, lr=1e-2), x, y, n=3)
    for layer, w in weights(twin).items():
        torch.testing.assert_close(weights(model)[layer], w, rtol=0, atol=0)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"mu": -0.1}, "mu"),
        ({"mu": float("nan")}, "mu"),
        ({"variant": "sbar"}, "variant"),
        ({"schedule": "step"}, "schedule"),
        ({"schedule": "linear"}, "total_steps"),
        ({"schedule": "cosine", "total_steps": 0}, "total_steps"),
        ({"total_steps": 2.5}, "total_steps"),
        ({"decoupled": "yes"}, "decoupled"),
        ({"delta": 0.1}, "delta"),
    ],
)
def test_bad_options_are_named(options, match):
    model, _, _ = model_and_data()
    with pytest.raises(ValueError, match=match):
        create("bar", model, lr=1e-2, **options)


def test_a_bad_option_edited_into_a_group_is_refused_before_anything_changes():
    model, x, y = model_and_data()
    opt = create("bar", model, lr=1e-2)
    opt.param_groups[0]["variant"] = "sbar"
    A = model[0].A.detach().clone()
    loss_of(model, x, y).backward()
    with pytest.raises(ValueError, match="variant"):
        opt.step()
    assert torch.equal(model[0].A, A)


def test_functional_bad_input():
    with pytest.raises(ValueError, match="same r"):
        balancedness(torch.zeros(3, 5), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="variant"):
        bar_sign("xbar", torch.zeros(2, 5), torch.zeros(4, 2), torch.zeros(2, 5), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="grad_A"):
        bar_sign("nbar", torch.zeros(2, 5), torch.zeros(4, 2), torch.zeros(5, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="total_steps"):
        bar_coefficient(0.5, 1, None, "linear")
    with pytest.raises(ValueError, match="schedule"):
        bar_coefficient(0.5, 1, 10, "exp")
