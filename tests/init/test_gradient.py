"""LoRA-GA and LoRA-One (`loraredux.init.gradient`): the papers' formulas, LoRA-GA's first step and PEFT parity.

Reference transcriptions are written here with numpy's SVD (not the library's code path); singular vectors are
compared up to their sign, which an SVD leaves free.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import loraredux as lx
from loraredux.init import LayerData, gather
from loraredux.init.gradient import lora_ga, lora_one
from tiny_models import tiny_llama, token_ids

OUT, IN = 10, 12


def spectrum(values: list[float], out: int = OUT, inp: int = IN, seed: int = 3) -> torch.Tensor:
    """(out, in) float64 U diag(values) V^T with random orthonormal U, V: known, well-separated singular values."""
    g = torch.Generator().manual_seed(seed)
    k = len(values)
    U, _ = torch.linalg.qr(torch.randn(out, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(inp, k, generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ V.T


def weight(out: int = OUT, inp: int = IN, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g, dtype=torch.float64)


def full_gradient(out: int = OUT, inp: int = IN, seed: int = 4) -> torch.Tensor:
    """A generic full-rank gradient (distinct singular values almost surely)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g, dtype=torch.float64)


def np_svd(G: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    U, S, Vt = np.linalg.svd(G.numpy(), full_matrices=False)
    return U, S, Vt


def truncated(M: np.ndarray, k: int) -> np.ndarray:
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vt[:k]


def assert_rows_up_to_sign(
    X: torch.Tensor, Y: np.ndarray | torch.Tensor, rtol: float = 1e-10
) -> None:
    """Each row of X equals the same row of Y, or its negative."""
    Y = torch.as_tensor(Y, dtype=X.dtype)
    signs = torch.sign((X * Y).sum(dim=1, keepdim=True))
    assert bool((signs != 0).all())
    torch.testing.assert_close(X, signs * Y, rtol=rtol, atol=rtol * float(Y.abs().max()))


def cosines(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spaces of P and Q."""
    return torch.linalg.svdvals(torch.linalg.qr(P)[0].T @ torch.linalg.qr(Q)[0])


# -- LoRA-GA -------------------------------------------------------------------------------------------------------
# The paper's split of the top-2r triplets (0-based indices): A's rows from V, B's columns from U.
SPLITS = {
    "ArB2r": lambda r: (list(range(r)), list(range(r, 2 * r))),
    "A2rBr": lambda r: (list(range(r, 2 * r)), list(range(r))),
    "ArBr": lambda r: ([2 * i + 1 for i in range(r)], [2 * i for i in range(r)]),
}


@pytest.mark.parametrize("direction", sorted(SPLITS))
def test_lora_ga_is_the_papers_formula_and_keeps_w0(direction: str) -> None:
    W0, G, r, s, gamma = weight(), full_gradient(), 3, 0.7, 16.0
    f = lora_ga(W0, r, s, data=LayerData(grad=G), direction=direction)
    U, _, Vt = np_svd(G)
    rows_A, cols_B = SPLITS[direction](r)
    c = OUT**0.25 / math.sqrt(gamma)  # the stable output scale d_out^{1/4} / sqrt(gamma)
    assert f.A.shape == (r, IN) and f.B.shape == (OUT, r) and f.base.shape == (OUT, IN)
    assert_rows_up_to_sign(f.A, c * Vt[rows_A])
    assert_rows_up_to_sign(f.B.T, c * U[:, cols_B].T)
    # W' = W0 at init, exactly: the base moved by s B A.
    torch.testing.assert_close(f.base + s * f.B @ f.A, W0, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(f.base, W0)


def test_lora_ga_factor_scales() -> None:
    W0, G, r, s = weight(), full_gradient(), 2, 2.5
    U, _, Vt = np_svd(G)
    unit = lora_ga(W0, r, s, data=LayerData(grad=G), factor_scale="unit")
    eye = torch.eye(r, dtype=torch.float64)
    torch.testing.assert_close(unit.A @ unit.A.T, eye)  # orthonormal rows
    torch.testing.assert_close(unit.B.T @ unit.B, eye)  # orthonormal columns
    gd = lora_ga(W0, r, s, data=LayerData(grad=G), factor_scale="gd_scale")
    assert_rows_up_to_sign(gd.A, Vt[:r] / s)
    assert_rows_up_to_sign(gd.B.T, U[:, r : 2 * r].T / s)
    gamma = 4.0
    stable = lora_ga(W0, r, s, data=LayerData(grad=G), stable_gamma=gamma)
    torch.testing.assert_close(stable.A, unit.A * OUT**0.25 / 2.0)
    torch.testing.assert_close(stable.B, unit.B * OUT**0.25 / 2.0)


def test_lora_ga_peft_variant_weights_b_by_singular_values() -> None:
    W0, G, r, s, gamma = weight(), full_gradient(), 2, 1.5, 16.0
    f = lora_ga(W0, r, s, data=LayerData(grad=G), variant="peft")
    U, S, Vt = np_svd(G)
    c = OUT**0.25 / math.sqrt(gamma)
    assert_rows_up_to_sign(f.A, Vt[:r])  # A unscaled
    assert_rows_up_to_sign(f.B.T, (c * U[:, r : 2 * r] * S[r : 2 * r]).T)  # B = c U_B diag(S_B)
    torch.testing.assert_close(f.base + s * f.B @ f.A, W0, rtol=1e-12, atol=1e-12)


class Regression(nn.Module):
    """y = x W^T: a one-layer model whose full-weight gradient the calibration gathers."""

    def __init__(self, W0: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(W0.shape[1], W0.shape[0], bias=False, dtype=W0.dtype)
        with torch.no_grad():
            self.lin.weight.copy_(W0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def regression_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(20, IN, generator=g, dtype=torch.float64),
            torch.randn(20, OUT, generator=g, dtype=torch.float64),
        )
        for _ in range(2)
    ]


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(dim=1).mean()


def lora_step(
    base: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, lr: float
) -> torch.Tensor:
    """W'(after one SGD step on A, B) - W'(before), for the mean regression loss, by autograd."""
    A, B = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    batches = regression_data()
    loss = sum(mse(lambda x: x @ (base + s * B @ A).T, b) for b in batches) / len(batches)
    gA, gB = torch.autograd.grad(loss, (A, B))
    with torch.no_grad():
        return (base + s * (B - lr * gB) @ (A - lr * gA)) - (base + s * B @ A)


@pytest.mark.parametrize("direction", sorted(SPLITS))
def test_lora_ga_first_step_is_the_rank_2r_projection_of_the_gradient(direction: str) -> None:
    """The paper's claim: one SGD step moves W' by -lr s^2 c^2 [G]_{2r} + O(lr^2), G the full-weight gradient."""
    W0, r, s, gamma = weight(), 2, 1.3, 16.0
    model = Regression(W0)
    batches = regression_data()
    loss = sum(mse(model, b) for b in batches) / len(batches)
    (G,) = torch.autograd.grad(loss, model.lin.weight)  # float64, by autograd
    # `gather` finds the same G (float64 for a float64 model), and the init runs on what it found.
    gathered = gather(model, {"lin": model.lin}, ["grad"], batches, mse, progress=False)["lin"]
    torch.testing.assert_close(gathered.grad, G, rtol=1e-12, atol=1e-14)
    data = gathered
    f = lora_ga(W0, r, s, data=data, direction=direction, stable_gamma=gamma)
    c2 = math.sqrt(OUT) / gamma
    projection = torch.from_numpy(truncated(G.numpy(), 2 * r))
    lr = 1e-7
    unit = -lr * s**2 * c2  # the paper's first step is unit * [G]_{2r}
    step = lora_step(f.base, f.A, f.B, s, lr)
    # The step is a polynomial of degree 2 in lr: (step(lr) - step(-lr)) / 2 is its linear term exactly.
    linear = (step - lora_step(f.base, f.A, f.B, s, -lr)) / 2
    torch.testing.assert_close(linear / unit, projection, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(step / unit, projection, rtol=1e-4, atol=1e-5)
    # Negative control: PEFT's weighting of B does not give the projection.
    peft = lora_ga(W0, r, s, data=data, direction=direction, stable_gamma=gamma, variant="peft")
    other = lora_step(peft.base, peft.A, peft.B, s, lr)
    scale = torch.linalg.matrix_norm(other) / torch.linalg.matrix_norm(projection)
    assert torch.linalg.matrix_norm(other / scale - projection) > 0.1 * torch.linalg.matrix_norm(
        projection
    )


def test_lora_ga_float32_and_randomized_svd() -> None:
    W0, G, r, s = weight(), spectrum([5.0, 3.0, 2.0, 1.2, 0.7, 0.3]), 2, 2.0
    f64 = lora_ga(W0, r, s, data=LayerData(grad=G))
    f32 = lora_ga(W0.float(), r, s, data=LayerData(grad=G.float()))
    assert f32.A.dtype == f32.B.dtype == f32.base.dtype == torch.float32
    assert_rows_up_to_sign(f32.A.double(), f64.A, rtol=1e-5)
    torch.testing.assert_close(f32.base + s * f32.B @ f32.A, W0.float(), rtol=1e-6, atol=1e-6)
    # G has rank 6 <= q = 4r = 8: the randomized SVD finds the same triplets.
    torch.manual_seed(0)
    rand = lora_ga(W0, r, s, data=LayerData(grad=G), niter=4)
    assert_rows_up_to_sign(rand.A, f64.A, rtol=1e-9)
    assert_rows_up_to_sign(rand.B.T, f64.B.T, rtol=1e-9)


# -- LoRA-One ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [False, True])
def test_lora_one_is_the_truncated_gradient_step(normalize: bool) -> None:
    W0, G, r, s, gamma = weight(), full_gradient(), 3, 0.8, 5.0
    f = lora_one(W0, r, s, data=LayerData(grad=G), gamma=gamma, normalize=normalize)
    assert f.base is None and f.A.shape == (r, IN) and f.B.shape == (OUT, r)
    step = s / gamma * truncated(-G.numpy(), r)  # (s / gamma) [-G]_r
    if normalize:
        step = step / np.linalg.svd(G.numpy(), compute_uv=False)[0]
    torch.testing.assert_close(s * f.B @ f.A, torch.from_numpy(step), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f.B.T @ f.B, f.A @ f.A.T)  # the balanced split S^{1/2}, S^{1/2}
    U, _, Vt = np_svd(-G)
    assert torch.allclose(
        cosines(f.B, torch.from_numpy(U[:, :r])), torch.ones(r, dtype=torch.float64)
    )
    assert torch.allclose(
        cosines(f.A.T, torch.from_numpy(Vt[:r].T)), torch.ones(r, dtype=torch.float64)
    )


def test_lora_one_flags_and_warning_for_a_low_rank_gradient() -> None:
    spec = lx.init.get("lora_one")
    assert spec.needs == {"grad"} and not spec.moves_base and not spec.identity
    spec = lx.init.get("lora_ga")
    assert spec.needs == {"grad"} and spec.moves_base and spec.exact and spec.identity
    W0, G = weight(), spectrum([2.0])
    with pytest.warns(UserWarning, match="numerical rank 1 < rank 3"):
        f = lora_one(W0, 3, 1.0, data=LayerData(grad=G))
    assert torch.linalg.matrix_rank(f.B @ f.A) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora_one(W0, 1, 1.0, data=LayerData(grad=G))


# -- PEFT parity ---------------------------------------------------------------------------------------------------
class OneLinear(nn.Module):
    def __init__(self, W0: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(W0.shape[1], W0.shape[0], dtype=W0.dtype)
        with torch.no_grad():
            self.lin.weight.copy_(W0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def peft_lora_ga(model: nn.Module, targets: list[str], r: int, alpha: float, **ga: object):
    from peft import LoraConfig, LoraGAConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(**ga),
    )
    return get_peft_model(model, config)


def assert_peft_parity(f, layer, W0: torch.Tensor, s: float, rtol: float = 2e-5) -> None:
    """Same A rows and B columns up to sign, the same moved base (after aligning the signs) and W0 kept."""
    A_p = layer.lora_A["default"].weight.detach()
    B_p = layer.lora_B["default"].weight.detach()
    base_p = layer.base_layer.weight.detach()
    sign_A = torch.sign((f.A * A_p).sum(1))
    sign_B = torch.sign((f.B * B_p).sum(0))
    tol = {"rtol": rtol, "atol": rtol}
    torch.testing.assert_close(
        sign_A[:, None] * A_p, f.A, rtol=rtol, atol=rtol * float(f.A.abs().max())
    )
    torch.testing.assert_close(
        B_p * sign_B[None, :], f.B, rtol=rtol, atol=rtol * float(f.B.abs().max())
    )
    aligned = W0 - s * (f.B * sign_B[None, :]) @ (sign_A[:, None] * f.A)
    torch.testing.assert_close(base_p, aligned, **tol)
    torch.testing.assert_close(base_p + s * B_p @ A_p, W0, **tol)


@pytest.mark.parity
@pytest.mark.parametrize(
    ("direction", "scale"),
    [
        ("ArB2r", "stable"),
        ("A2rBr", "stable"),
        ("ArBr", "stable"),
        ("ArB2r", "unit"),
        ("ArB2r", "gd_scale"),
    ],
)
def test_lora_ga_parity_with_peft_on_a_given_gradient(direction: str, scale: str) -> None:
    """PEFT's layer init driven by the same gradient (set where `preprocess_loraga` leaves it)."""
    W0, r, alpha = weight(), 2, 6.0
    G = spectrum(
        [5.0, 3.0, 2.0, 1.2, 0.7, 0.3]
    )  # rank 6 <= 4r: PEFT's randomized SVD is exact here
    model = OneLinear(W0)
    model.lin._peft_loraga_grad = G.clone()
    peft = peft_lora_ga(model, ["lin"], r, alpha, direction=direction, scale=scale, stable_gamma=16)
    layer = peft.base_model.model.lin
    s = layer.scaling["default"]
    f = lora_ga(
        W0, r, s, data=LayerData(grad=G), direction=direction, factor_scale=scale, variant="peft"
    )
    assert_peft_parity(f, layer, W0, s)


@pytest.mark.parity
def test_lora_ga_parity_with_peft_preprocessing_on_a_tiny_llama() -> None:
    """PEFT's `preprocess_loraga` and our `gather` on the same model, batches and loss, then both inits."""
    from peft import LoraConfig, LoraGAConfig, preprocess_loraga

    ids = token_ids()
    batches = [{"input_ids": ids, "labels": ids}, {"input_ids": ids.flip(1), "labels": ids.flip(1)}]
    targets, r, alpha = (
        ["q_proj", "v_proj"],
        4,
        8.0,
    )  # 4r >= min(out, in): PEFT's randomized SVD is exact
    model = tiny_llama()
    modules = {n: m for n, m in model.named_modules() if n.endswith(tuple(targets))}
    ours = gather(model, modules, ["grad"], batches, progress=False)
    weights = {n: m.weight.detach().clone() for n, m in modules.items()}

    def train_step() -> None:
        for batch in batches:
            model(**batch).loss.backward()

    ga = LoraGAConfig()
    preprocess_loraga(model, LoraConfig(target_modules=targets, lora_ga_config=ga), train_step)
    for name, module in modules.items():
        torch.testing.assert_close(
            module._peft_loraga_grad.double(), ours[name].grad, rtol=1e-5, atol=1e-7
        )
    peft = peft_lora_ga(model, targets, r, alpha)
    for name in modules:
        layer = peft.base_model.model.get_submodule(name)
        s = layer.scaling["default"]
        f = lora_ga(weights[name], r, s, data=ours[name], variant="peft")
        assert_peft_parity(f, layer, weights[name], s, rtol=1e-4)


# -- errors --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [lora_ga, lora_one])
def test_missing_calibration_data_is_a_clear_error(fn) -> None:
    W0 = weight()
    for data in (None, LayerData()):
        with pytest.raises(ValueError, match="calibration"):
            fn(W0, 2, 1.0, data=data)
    name = fn.__name__
    with pytest.raises(ValueError, match="calibration"):
        lx.init.get(name)(W0, 2, 1.0)
    with pytest.raises(ValueError, match=r"shape \(12, 10\).*\(10, 12\)"):
        fn(W0, 2, 1.0, data=LayerData(grad=full_gradient().T))
    bad = full_gradient()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fn(W0, 2, 1.0, data=LayerData(grad=bad))


def test_rank_limits() -> None:
    W0, data = weight(), LayerData(grad=full_gradient())
    with pytest.raises(ValueError, match=r"2 \* rank = 12.*min\(out, in\) = 10: choose rank <= 5"):
        lora_ga(W0, 6, 1.0, data=data)
    lora_ga(W0, 5, 1.0, data=data)  # 2r = 10 fits
    with pytest.raises(ValueError, match=r"rank = 11.*choose rank <= 10"):
        lora_one(W0, 11, 1.0, data=data)
    for fn in (lora_ga, lora_one):
        for rank in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match="rank must be an integer >= 1"):
                fn(W0, rank, 1.0, data=data)
    with pytest.raises(ValueError, match="gradient is zero"):
        lora_one(W0, 2, 1.0, data=LayerData(grad=torch.zeros(OUT, IN, dtype=torch.float64)))


@pytest.mark.parametrize(
    ("fn", "option", "value", "message"),
    [
        (lora_ga, "direction", "random", "direction must be one of"),
        (lora_ga, "factor_scale", "weight_svd", "factor_scale must be one of"),
        (lora_ga, "variant", "original", "variant must be one of"),
        (lora_ga, "stable_gamma", 0, "stable_gamma must be a finite number > 0"),
        (lora_ga, "stable_gamma", float("nan"), "stable_gamma must be a finite number > 0"),
        (lora_ga, "stable_gamma", "16", "stable_gamma must be a positive number"),
        (lora_ga, "niter", -1, "niter must be None"),
        (lora_ga, "niter", True, "niter must be None"),
        (lora_one, "gamma", -2.0, "gamma must be a finite number > 0"),
        (lora_one, "normalize", 1, "normalize must be True or False"),
        (lora_one, "niter", 2.0, "niter must be None"),
    ],
)
def test_bad_options(fn, option: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fn(weight(), 2, 1.0, data=LayerData(grad=full_gradient()), **{option: value})


def test_unknown_option_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"no option\(s\) \['gamma'\].*'stable_gamma'"):
        lx.init.get("lora_ga")(weight(), 2, 1.0, data=LayerData(grad=full_gradient()), gamma=16.0)


def test_lora_ga_warns_when_the_gradient_has_rank_below_2r() -> None:
    """With rank(G) < 2r, some of LoRA-GA's singular vectors come from G's null space: an arbitrary basis."""
    W0 = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u, v = torch.ones(8, 1, dtype=torch.float64), torch.ones(1, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match="numerical rank 1 < 2 rank = 4"):
        lora_ga(W0, 2, 1.0, data=LayerData(grad=u @ v))
    G = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora_ga(W0, 2, 1.0, data=LayerData(grad=G))  # full rank: no warning
