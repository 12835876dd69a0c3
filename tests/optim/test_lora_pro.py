"""LoRA-Pro (Wang et al., ICLR 2025, arXiv 2407.18242): the equivalent gradient is the least-squares fit to the full
gradient, the X of Theorem 2.3 solves its Sylvester equation and is the closest to the LoRA gradients, the optimizer
against a literal transcription of the paper's Algorithm 1 (Adam on the full-size equivalent gradient, the authors'
`AdamW.step_full` in github.com/mrflogs/LoRA-Pro peta/optim.py), the first step from LoRA's B = 0, the gauge
(invariant to first order only), the full-size state, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from optim_cases import LAYERS, closure_for, data, loss_of, regauged, relative_gap, two_layer_model
from optim_cases import weights as effective_weights
from torch import nn

import loraredux as lx
from loraredux.optim import create
from loraredux.optim.functional import (
    equivalent_gradient,
    lora_pro_adam,
    lora_pro_gradients,
    lora_pro_x,
)
from loraredux.optim.lora_pro import state_bytes

f64 = torch.float64


def tiny(seed: int = 0, out: int = 5, inp: int = 4, r: int = 2, s: float = 1.7):
    """Random full-rank A (r, in), B (out, r), a full gradient G (out, in) and the LoRA gradients it induces."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, inp, generator=g, dtype=f64)
    B = torch.randn(out, r, generator=g, dtype=f64)
    G = torch.randn(out, inp, generator=g, dtype=f64)
    return A, B, G, s * B.T @ G, s * G @ A.T, s  # grad_A = s B^T G, grad_B = s G A^T (chain rule)


def fit_matrix(A, B, s):
    """The linear map (g^A, g^B) -> vec(s (B g^A + g^B A)) as a matrix over [vec(g^A); vec(g^B)] (row-major vec)."""
    out, _r = B.shape
    inp = A.shape[1]
    return s * torch.cat(
        [
            torch.kron(B, torch.eye(inp, dtype=f64)),
            torch.kron(torch.eye(out, dtype=f64), A.T.contiguous()),
        ],
        dim=1,
    )


# -- Theorem 2.1: the equivalent gradient --------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equivalent_gradient_is_the_least_squares_fit_to_the_full_gradient(seed):
    """Brute force: lstsq over all (g^A, g^B) of ||s (B g^A + g^B A) - G||_F; ours reaches the same fitted matrix,
    which is P_B G + (I - P_B) G P_A."""
    A, B, G, grad_A, grad_B, s = tiny(seed)
    M = fit_matrix(A, B, s)
    best = torch.linalg.lstsq(M, G.reshape(-1, 1), driver="gelsd").solution
    fitted = (M @ best).reshape(G.shape)
    ours = equivalent_gradient(grad_A, grad_B, A, B, s, delta=0.0)
    torch.testing.assert_close(ours, fitted, rtol=1e-10, atol=1e-12)
    P_B = B @ torch.linalg.inv(B.T @ B) @ B.T
    P_A = A.T @ torch.linalg.inv(A @ A.T) @ A
    I = torch.eye(B.shape[0], dtype=f64)
    torch.testing.assert_close(ours, P_B @ G + (I - P_B) @ G @ P_A, rtol=1e-10, atol=1e-12)
    # the factor gradients with the Sylvester X give the same equivalent gradient
    gA, gB = lora_pro_gradients(grad_A, grad_B, A, B, s, delta=0.0)
    torch.testing.assert_close(s * (B @ gA + gB @ A), fitted, rtol=1e-10, atol=1e-12)


def test_every_x_gives_the_same_equivalent_gradient():
    """Theorem 2.1's family: (g^A + Y A, g^B - B Y) moves W' identically to first order for any r x r Y."""
    A, B, _, grad_A, grad_B, s = tiny(3)
    gA, gB = lora_pro_gradients(grad_A, grad_B, A, B, s)
    Y = torch.randn(2, 2, generator=torch.Generator().manual_seed(9), dtype=f64)
    torch.testing.assert_close(
        s * (B @ (gA + Y @ A) + (gB - B @ Y) @ A), s * (B @ gA + gB @ A), rtol=1e-12, atol=1e-12
    )


# -- Theorem 2.3: the X ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 4])
def test_x_solves_the_sylvester_equation_and_is_closest_to_the_lora_gradients(seed):
    A, B, _, grad_A, grad_B, s = tiny(seed, out=6, inp=5, r=3)
    X = lora_pro_x(grad_A, grad_B, A, B, s)
    BtB, AAt = B.T @ B, A @ A.T
    rhs = -(1 / s**2) * torch.linalg.inv(BtB) @ grad_A @ A.T
    torch.testing.assert_close(BtB @ X + X @ AAt, rhs, rtol=1e-10, atol=1e-12)
    # brute force: g^A(X) = P + X A and g^B(X) = Q - B X are affine in X; lstsq of the distance to the LoRA gradients
    r = 3
    P = (1 / s**2) * torch.linalg.inv(BtB) @ grad_A
    Q = (
        (1 / s**2)
        * (torch.eye(6, dtype=f64) - B @ torch.linalg.inv(BtB) @ B.T)
        @ grad_B
        @ torch.linalg.inv(AAt)
    )
    # vec(X A) = kron(I, A^T) vec(X), vec(B X) = kron(B, I) vec(X) (row-major)
    M = torch.cat(
        [
            torch.kron(torch.eye(r, dtype=f64), A.T.contiguous()),
            -torch.kron(B, torch.eye(r, dtype=f64)),
        ]
    )
    target = torch.cat([(grad_A - P).reshape(-1), (grad_B - Q).reshape(-1)])
    X_best = torch.linalg.lstsq(M, target[:, None]).solution.reshape(r, r)
    torch.testing.assert_close(X, X_best, rtol=1e-9, atol=1e-12)
    gA, gB, X_returned = lora_pro_gradients(grad_A, grad_B, A, B, s, return_x=True)
    torch.testing.assert_close(X_returned, X, rtol=0, atol=0)
    torch.testing.assert_close(gA, P + X @ A, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gB, Q - B @ X, rtol=1e-10, atol=1e-12)


# -- Algorithm 1, transcribed ---------------------------------------------------------------------------------


def sylvester_by_kron(S1, S2, C):
    """X with S1 X + X S2 = C through the r^2 x r^2 system (I kron S1 + S2^T kron I) vec_col(X) = vec_col(C)."""
    r = S1.shape[0]
    eye = torch.eye(r, dtype=S1.dtype)
    K = torch.kron(eye, S1) + torch.kron(S2.T.contiguous(), eye)
    return torch.linalg.solve(K, C.T.reshape(-1)).reshape(r, r).T


def paper_step(A, B, grad_A, grad_B, s, m, v, t, lr, beta1, beta2, eps, wd, x="sylvester"):
    """One step of LoRA-Pro's Algorithm 1 (arXiv 2407.18242 v3; the authors' `step_full`), explicit inverses;
    x = "zero" is the authors' `X_mode="zero"`. Returns the new (A, B, m, v)."""
    inv = torch.linalg.inv
    I = torch.eye(B.shape[0], dtype=f64)
    BtB_inv, AAt_inv = inv(B.T @ B), inv(A @ A.T)
    # Theorem 2.1 (X = 0 suffices for the equivalent gradient)
    gA = (1 / s**2) * BtB_inv @ grad_A
    gB = (1 / s**2) * (I - B @ BtB_inv @ B.T) @ grad_B @ AAt_inv
    g_equiv = s * B @ gA + s * gB @ A
    # Adam on the full-size equivalent gradient
    m = beta1 * m + (1 - beta1) * g_equiv
    v = beta2 * v + (1 - beta2) * g_equiv**2
    g = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
    # back to the factors: the LoRA gradients g would induce, then Theorem 2.1 with the X of Theorem 2.3
    grad_A2, grad_B2 = s * B.T @ g, s * g @ A.T
    X = sylvester_by_kron(B.T @ B, A @ A.T, -(1 / s**2) * BtB_inv @ grad_A2 @ A.T)
    if x == "zero":
        X = torch.zeros_like(X)
    gA = (1 / s**2) * BtB_inv @ grad_A2 + X @ A
    gB = (1 / s**2) * (I - B @ BtB_inv @ B.T) @ grad_B2 @ AAt_inv - B @ X
    shrink = (1 - lr * wd) ** 0.5
    return shrink * A - lr * gA, shrink * B - lr * gB, m, v


@pytest.mark.parametrize(("wd", "x_mode"), [(0.0, "sylvester"), (0.3, "sylvester"), (0.3, "zero")])
def test_three_steps_match_a_literal_transcription_of_algorithm_1(wd, x_mode):
    x, y = data()
    model = two_layer_model()
    twin = copy.deepcopy(model)
    lr, betas, eps = 2e-2, (0.8, 0.95), 1e-8
    opt = create(
        "lora_pro", model, lr=lr, betas=betas, eps=eps, weight_decay=wd, delta=0.0, x=x_mode
    )
    moments = {name: (torch.zeros_like(effective_weights(twin)[name]),) * 2 for name in LAYERS}
    for t in (1, 2, 3):
        opt.step(closure_for(model, opt, x, y))
        for p in twin.parameters():
            p.grad = None
        loss_of(twin, x, y).backward()
        with torch.no_grad():
            for name in LAYERS:
                layer = twin.get_submodule(name)
                A, B, m, v = paper_step(
                    layer.A, layer.B, layer.A.grad, layer.B.grad, layer.scale, *moments[name], t, lr,
                    *betas, eps, wd, x_mode,
                )  # fmt: skip
                layer.A.copy_(A)
                layer.B.copy_(B)
                moments[name] = (m, v)
        for name in LAYERS:
            ours, theirs = model.get_submodule(name), twin.get_submodule(name)
            torch.testing.assert_close(ours.A, theirs.A, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(ours.B, theirs.B, rtol=1e-10, atol=1e-12)
            state = opt.state[ours.A]
            torch.testing.assert_close(state["exp_avg"], moments[name][0], rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(
                state["exp_avg_sq"], moments[name][1], rtol=1e-10, atol=1e-14
            )


def test_the_functional_sgd_rule_is_the_authors_sgd():
    """`lora_pro_gradients` on the LoRA gradients is the authors' `SGD` step direction (peta/optim.py)."""
    A, B, _, grad_A, grad_B, s = tiny(5, out=7, inp=6, r=3)
    inv = torch.linalg.inv
    X = sylvester_by_kron(B.T @ B, A @ A.T, -(1 / s**2) * inv(B.T @ B) @ grad_A @ A.T)
    gA = (1 / s**2) * inv(B.T @ B) @ grad_A + X @ A
    gB = (1 / s**2) * (torch.eye(7, dtype=f64) - B @ inv(B.T @ B) @ B.T) @ grad_B @ inv(
        A @ A.T
    ) - B @ X
    ours = lora_pro_gradients(grad_A, grad_B, A, B, s)
    torch.testing.assert_close(ours[0], gA, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1], gB, rtol=1e-10, atol=1e-12)


# -- LoRA's B = 0 at init ------------------------------------------------------------------------------------


def lora_init_model(seed: int = 0):
    torch.manual_seed(seed)
    return lx.adapt_(nn.Sequential(nn.Linear(10, 6)).double(), lx.config("lora", rank=3), ["0"])


def test_the_first_step_from_b_zero_is_the_authors_special_case():
    """B = 0: the authors' DeepSpeed path skips (B^T B)^{-1} and sets X = 0, so A does not move and
    B <- -lr (1/s) g^ A^T (A A^T)^{-1} with g^ = g~ / (|g~| + eps) (Adam's first step) and
    g~ = (1/s) grad_B (A A^T)^{-1} A. The default delta reproduces it."""
    x, y = data()
    model = lora_init_model()
    layer = model[0]
    assert torch.count_nonzero(layer.B) == 0
    A0 = layer.A.detach().clone()
    opt = create("lora_pro", model, lr=1e-2)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    s, grad_B = layer.scale, layer.B.grad.clone()
    AAt_inv = torch.linalg.inv(A0 @ A0.T)
    g_equiv = (1 / s) * grad_B @ AAt_inv @ A0
    g_hat = g_equiv / (g_equiv.abs() + 1e-8)
    opt.step()
    torch.testing.assert_close(layer.A, A0, rtol=0, atol=0)
    torch.testing.assert_close(
        layer.B, -1e-2 * (1 / s) * g_hat @ A0.T @ AAt_inv, rtol=1e-6, atol=1e-12
    )


def test_delta_zero_at_b_zero_is_a_clear_error_and_nothing_changes():
    x, y = data()
    model = lora_init_model()
    before = {k: v.clone() for k, v in lx.adapter_state_dict(model).items()}
    opt = create("lora_pro", model, lr=1e-2, delta=0.0)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    with pytest.raises(ValueError, match=r"0: .*B\^T B \+ delta I is singular.*delta > 0"):
        opt.step()
    for k, v in lx.adapter_state_dict(model).items():
        assert torch.equal(v, before[k]), k
    assert not opt.state


def test_a_singular_second_pair_leaves_the_first_unchanged():
    """Every pair's r x r matrices are factored before any parameter moves."""
    x, y = data()
    model = two_layer_model()
    with torch.no_grad():
        model.get_submodule("2").B.zero_()
    before = {k: v.clone() for k, v in lx.adapter_state_dict(model).items()}
    opt = create("lora_pro", model, lr=1e-2, delta=0.0)
    with pytest.raises(ValueError, match="2: "):
        opt.step(closure_for(model, opt, x, y))
    for k, v in lx.adapter_state_dict(model).items():
        assert torch.equal(v, before[k]), k


# -- the gauge -----------------------------------------------------------------------------------------------


def test_the_equivalent_gradient_is_gauge_invariant():
    """g~ = P_B g + (I - P_B) g P_A depends only on B's column space and A's row space (delta = 0)."""
    A, B, G, _, _, s = tiny(6, out=6, inp=5, r=3)
    Gmat = torch.eye(3, dtype=f64) + 0.5 * torch.randn(
        3, 3, generator=torch.Generator().manual_seed(1), dtype=f64
    )
    A2, B2 = Gmat @ A, B @ torch.linalg.inv(Gmat)
    ours = equivalent_gradient(s * B.T @ G, s * G @ A.T, A, B, s)
    theirs = equivalent_gradient(s * B2.T @ G, s * G @ A2.T, A2, B2, s)
    torch.testing.assert_close(theirs, ours, rtol=1e-10, atol=1e-12)


def test_a_step_is_gauge_invariant_to_first_order_only():
    """The W' change of one step from (A, B) and from (G A, B G^{-1}) differs by O(lr^2): the first-order part is the
    invariant equivalent gradient, the second-order lr^2 s g^B g^A depends on X, whose Sylvester equation lives in
    the factors' Euclidean metric. So the relative gap falls linearly with lr, and lora_pro is not in
    GAUGE_INVARIANT with its defaults (the paper makes no invariance claim); with x = "zero" (X = 0 transforms as
    G X G^{-1}) it is, and the contract checks that."""
    x, y = data()
    gaps = {}
    for lr in (5e-2, 5e-3, 5e-4):
        model = two_layer_model()
        other = regauged(model)
        start = effective_weights(model)
        for m in (model, other):
            opt = create("lora_pro", m, lr=lr, delta=0.0)
            opt.step(closure_for(m, opt, x, y))
        gaps[lr] = [
            relative_gap(
                effective_weights(model)[n] - start[n], effective_weights(other)[n] - start[n]
            )
            for n in LAYERS
        ]
    for i in range(len(LAYERS)):
        assert gaps[5e-2][i] > 1e-3  # not invariant
        assert 9 < gaps[5e-2][i] / gaps[5e-3][i] < 11  # ... but the gap is linear in lr
        assert 9 < gaps[5e-3][i] / gaps[5e-4][i] < 11


# -- state, options, other parameters ------------------------------------------------------------------------


def test_state_is_full_size_moments_per_pair():
    x, y = data()
    model = two_layer_model()
    opt = create("lora_pro", model, lr=1e-2)
    opt.step(closure_for(model, opt, x, y))
    total = 0
    for name in LAYERS:
        layer = model.get_submodule(name)
        state = opt.state[layer.A]
        out, inp = layer.B.shape[0], layer.A.shape[1]
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (out, inp)
        assert layer.B not in opt.state
        assert state_bytes(layer.A, layer.B) == 2 * out * inp * 8 + 4
        total += sum(t.numel() * t.element_size() for t in state.values())
    assert total == sum(
        state_bytes(model.get_submodule(n).A, model.get_submodule(n).B) for n in LAYERS
    )


def test_dora_magnitude_takes_plain_adamw_and_the_direction_lora_pro():
    x, y = data()
    torch.manual_seed(0)
    model = lx.adapt_(
        nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 6)).double(),
        lx.config("dora", rank=3),
        list(LAYERS),
    )
    with torch.no_grad():
        for name in LAYERS:
            model.get_submodule(name).B.normal_(0, 0.3)
    opt = create("lora_pro", model, lr=1e-2)
    assert [g["pair"] for g in opt.param_groups] == [*LAYERS, None]
    magnitude = model.get_submodule("0").magnitude.detach().clone()
    before = loss_of(model, x, y).item()
    for _ in range(20):
        opt.step(closure_for(model, opt, x, y))
    assert loss_of(model, x, y).item() < 0.9 * before
    assert not torch.equal(model.get_submodule("0").magnitude, magnitude)
    assert opt.state[model.get_submodule("0").magnitude]["exp_avg"].shape == magnitude.shape


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("delta", -1.0, "delta"),
        ("betas", (1.0, 0.9), "betas"),
        ("betas", (0.9,), "betas"),
        ("eps", -1e-8, "eps"),
        ("weight_decay", -0.1, "weight_decay"),
        ("x", "symmetry", "x must be one of"),
    ],
)
def test_bad_options_are_refused(option, value, match):
    with pytest.raises(ValueError, match=match):
        create("lora_pro", two_layer_model(), lr=1e-2, **{option: value})


def test_lr_times_weight_decay_above_one_is_refused_before_anything_changes():
    x, y = data()
    model = two_layer_model()
    opt = create("lora_pro", model, lr=2.0, weight_decay=0.9)
    before = {k: v.clone() for k, v in lx.adapter_state_dict(model).items()}
    with pytest.raises(ValueError, match="lr \\* weight_decay"):
        opt.step(closure_for(model, opt, x, y))
    for k, v in lx.adapter_state_dict(model).items():
        assert torch.equal(v, before[k]), k


def test_functional_input_is_checked():
    A, B, _, grad_A, grad_B, s = tiny(0)
    with pytest.raises(ValueError, match="same r"):
        equivalent_gradient(grad_A, grad_B, A, B[:, :1], s)
    with pytest.raises(ValueError, match="grad_A"):
        lora_pro_gradients(grad_A.T, grad_B, A, B, s)
    with pytest.raises(ValueError, match="scale"):
        lora_pro_x(grad_A, grad_B, A, B, 0.0)
    m = torch.zeros(3, 3, dtype=f64)
    with pytest.raises(ValueError, match="moments"):
        lora_pro_adam(grad_A, grad_B, A, B, s, m, m, 1)


def test_float32_factors_work_in_float32_and_keep_their_dtype():
    A, B, _, grad_A, grad_B, s = tiny(0)
    gA, gB = lora_pro_gradients(grad_A.float(), grad_B.float(), A.float(), B.float(), s)
    assert gA.dtype == gB.dtype == torch.float32
    ref = lora_pro_gradients(grad_A, grad_B, A, B, s)
    torch.testing.assert_close(gA.double(), ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gB.double(), ref[1], rtol=1e-4, atol=1e-5)
