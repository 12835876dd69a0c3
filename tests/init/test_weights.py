"""The data-free initialisers against their papers' equations and against PEFT on identical weights (float64).

- PiSSA (arXiv 2404.02948, Eq. 2-4): s B A is W0's best rank-r approximation (Eckart-Young), the residual is the
  rest of the spectrum, and the factors are balanced (A A^T = B^T B = diag(S_r) / s).
- MiLoRA (arXiv 2406.09044, §3): the same with the r smallest singular triplets.
- OLoRA (arXiv 2406.01775): B has orthonormal columns and B A is the leading block of W0's QR decomposition.
- orthogonal, gaussian, kaiming: B A = 0 with PEFT's draws.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import loraredux as lx
from loraredux.init import get


def weight(out: int = 9, inp: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@settings(max_examples=30, deadline=None)
@given(
    out=st.integers(2, 9),
    inp=st.integers(2, 9),
    data=st.data(),
    scale=st.sampled_from([0.5, 1.0, 2.0, 16.0]),
)
def test_pissa_is_the_best_rank_r_approximation_with_balanced_factors(out, inp, data, scale):
    r = data.draw(st.integers(1, min(out, inp)))
    W0 = weight(out, inp, seed=out * 10 + inp)
    f = get("pissa")(W0, r, scale)
    U, S, Vh = torch.linalg.svd(W0)  # independent transcription: the truncated SVD
    best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    torch.testing.assert_close(scale * f.B @ f.A, best, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f.base, W0 - best, rtol=1e-10, atol=1e-10)
    # the residual's norm is the tail of the spectrum (Eckart-Young)
    torch.testing.assert_close(
        torch.linalg.matrix_norm(f.base), S[r:].norm(), rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(f.A @ f.A.T, torch.diag(S[:r]) / scale, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(f.B.T @ f.B, torch.diag(S[:r]) / scale, rtol=1e-9, atol=1e-9)


def test_pissa_randomized_svd_is_exact_on_a_low_rank_weight_and_close_on_a_decaying_one():
    g = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    S = 0.5 ** torch.arange(30, dtype=torch.float64)
    W0 = U[:, :30] @ torch.diag(S) @ V.T
    exact = get("pissa")(W0, 4, 1.0)
    torch.manual_seed(0)
    fast = get("pissa")(W0, 4, 1.0, niter=4)
    gap = torch.linalg.matrix_norm(fast.B @ fast.A - exact.B @ exact.A) / S[:4].norm()
    assert (
        gap < 1e-3
    )  # q = r, no oversampling (PEFT's call): close, not exact, on a decaying spectrum
    torch.testing.assert_close(fast.base + fast.B @ fast.A, W0, rtol=1e-12, atol=1e-12)
    torch.manual_seed(0)
    over = get("pissa")(
        W0, 4, 1.0, niter=4, oversample=8
    )  # a wider sketch: closer to the exact SVD
    gap_over = torch.linalg.matrix_norm(over.B @ over.A - exact.B @ exact.A) / S[:4].norm()
    assert gap_over < gap / 10
    torch.testing.assert_close(over.base + over.B @ over.A, W0, rtol=1e-12, atol=1e-12)
    low = U[:, :4] @ torch.diag(S[:4]) @ V[:, :4].T  # exactly rank 4: the sketch captures it all
    fast = get("pissa")(low, 4, 1.0, niter=2)
    torch.testing.assert_close(fast.B @ fast.A, low, rtol=1e-10, atol=1e-12)


def test_milora_takes_the_minor_triplets():
    W0 = weight()
    f = get("milora")(W0, 3, 2.0)
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    minor = U[:, -3:] @ torch.diag(S[-3:]) @ Vh[-3:]
    torch.testing.assert_close(2.0 * f.B @ f.A, minor, rtol=1e-10, atol=1e-10)
    # the base keeps the principal part: its top singular values are W0's
    torch.testing.assert_close(torch.linalg.svdvals(f.base)[:4], S[:4], rtol=1e-10, atol=1e-10)


def test_olora_b_is_orthonormal_and_ba_is_the_leading_qr_block():
    W0 = weight()
    f = get("olora")(W0, 3, 0.5)
    torch.testing.assert_close(f.B.T @ f.B, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    Q, R = torch.linalg.qr(W0)
    torch.testing.assert_close(f.B @ f.A, Q[:, :3] @ R[:3], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f.base + 0.5 * f.B @ f.A, W0, rtol=1e-12, atol=1e-12)
    assert torch.allclose(
        torch.triu(f.A[:, :3]), f.A[:, :3]
    )  # R's leading block is upper triangular


def test_orthogonal_gives_two_nonzero_factors_with_zero_product():
    torch.manual_seed(0)
    f = get("orthogonal")(weight(), 4, 1.0)
    assert f.A.abs().min() > 0 and f.B.abs().max() > 0
    torch.testing.assert_close(
        f.B @ f.A, torch.zeros(9, 7, dtype=torch.float64), rtol=0, atol=1e-15
    )
    with pytest.raises(ValueError, match="even rank"):
        get("orthogonal")(weight(), 3, 1.0)


def test_gaussian_and_kaiming_keep_b_zero():
    torch.manual_seed(0)
    g = get("gaussian")(weight(50, 400), 4, 1.0)
    assert torch.count_nonzero(g.B) == 0
    assert abs(g.A.std().item() - 0.25) < 0.01
    k = get("kaiming")(weight(50, 400), 4, 1.0)
    assert torch.count_nonzero(k.B) == 0
    assert k.A.abs().max() <= 1 / math.sqrt(400) + 1e-12  # a = sqrt(5): bound = 1 / sqrt(fan_in)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="niter must be an integer"):
        get("pissa")(weight(), 2, 1.0, niter=-1)
    with pytest.raises(ValueError, match="oversample must be an integer"):
        get("pissa")(weight(), 2, 1.0, niter=2, oversample=-1)
    with pytest.raises(ValueError, match="has no option"):
        get("olora")(weight(), 2, 1.0, niter=2)


# ------------------------------------------------------------------------------------------ PEFT parity


def peft_layer(init, rank: int = 4, alpha: float = 6.0, seed: int = 0):
    """PEFT's LoRA layer on a float32 nn.Linear(7 -> 9) (PEFT's SVD/QR inits compute in float32)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 9))
    W0 = model[0].weight.detach().clone()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], init_lora_weights=init)
    torch.manual_seed(seed + 1)
    ref = peft.inject_adapter_in_model(config, model)
    layer = ref[0]
    return W0, layer


@pytest.mark.parity
@pytest.mark.parametrize("name", ["pissa", "olora"])
def test_svd_and_qr_inits_match_peft(name):
    W0, layer = peft_layer(name)
    f = get(name)(W0, 4, layer.scaling["default"])
    torch.testing.assert_close(f.A, layer.lora_A["default"].weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.B, layer.lora_B["default"].weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.base, layer.base_layer.weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parity
def test_pissa_randomized_svd_matches_peft_with_the_same_draws():
    W0, layer = peft_layer(True)
    torch.manual_seed(7)
    layer.pissa_init("default", "pissa_niter_3")
    torch.manual_seed(7)
    f = get("pissa")(W0, 4, layer.scaling["default"], niter=3)
    torch.testing.assert_close(f.A, layer.lora_A["default"].weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.B, layer.lora_B["default"].weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.base, layer.base_layer.weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parity
def test_orthogonal_matches_peft_with_the_same_draws():
    W0, layer = peft_layer(True)
    torch.manual_seed(11)
    layer.orthogonal_init("default")
    torch.manual_seed(11)
    f = get("orthogonal")(W0, 4, 1.0)
    torch.testing.assert_close(f.A, layer.lora_A["default"].weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(f.B, layer.lora_B["default"].weight, rtol=1e-6, atol=1e-6)


@pytest.mark.parity
@pytest.mark.parametrize("name", ["kaiming", "gaussian"])
def test_random_inits_match_peft_with_the_same_draws(name):
    W0, layer = peft_layer(True)
    torch.manual_seed(5)
    layer.reset_lora_parameters("default", True if name == "kaiming" else "gaussian")
    torch.manual_seed(5)
    f = get(name)(W0, 4, 1.0)
    torch.testing.assert_close(f.A, layer.lora_A["default"].weight, rtol=0, atol=0)
    torch.testing.assert_close(f.B, layer.lora_B["default"].weight, rtol=0, atol=0)


@pytest.mark.parity
@pytest.mark.parametrize("name", ["pissa", "olora"])
def test_model_level_parity_with_peft(name):
    """The whole adapted model: PEFT's get_peft_model and lx.adapt_ with the same init agree."""
    peft = pytest.importorskip("peft")
    from tiny_models import logits, tiny_llama

    theirs = peft.get_peft_model(
        tiny_llama(dtype=torch.float32),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=name),
    )
    ours = lx.adapt_(
        tiny_llama(dtype=torch.float32),
        lx.config("lora", rank=2, alpha=4, init=name),
        targets="all-linear",
    )
    for path, a in lx.adapters(ours):
        ref = theirs.base_model.model.get_submodule(path)
        torch.testing.assert_close(a.A, ref.lora_A["default"].weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.B, ref.lora_B["default"].weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.base.weight, ref.base_layer.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-4, atol=1e-5)
