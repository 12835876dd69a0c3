"""NoRA (`loraredux.init.sketch.nora`): the Nyström sketch of W0, identity at init, the sketch's subspace, and the
one-step solution of an exact-rank factorization by a scaled step from it."""

from __future__ import annotations

import pytest
import torch

import loraredux as lx
from loraredux.init.sketch import nora

OUT, IN = 10, 12


def low_rank(rank: int, out: int = OUT, inp: int = IN, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(out, rank, generator=g, dtype=torch.float64)
    return left @ torch.randn(rank, inp, generator=g, dtype=torch.float64)


def cosines(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spaces of P and Q."""
    return torch.linalg.svdvals(torch.linalg.qr(P)[0].T @ torch.linalg.qr(Q)[0])


def test_nora_is_the_sketch_of_w0_and_keeps_w0() -> None:
    W0, r, s, sigma = low_rank(8), 3, 0.5, 0.1
    torch.manual_seed(11)
    f = nora(W0, r, s, sigma=sigma)
    torch.manual_seed(11)
    omega = torch.randn(
        r, OUT
    ).double()  # the test matrix, N(0, 1), drawn as the reference code draws it
    torch.testing.assert_close(f.A, sigma * omega @ W0 / s, rtol=1e-12, atol=1e-12)
    assert f.base is None
    assert torch.equal(f.B, torch.zeros(OUT, r, dtype=torch.float64))
    assert torch.equal(W0 + s * f.B @ f.A, W0)  # identity at init
    spec = lx.init.get("nora")
    assert spec.needs == frozenset() and spec.identity and not spec.moves_base
    assert spec.options == {"sigma": 0.02}


def test_nora_recovers_the_row_space_of_an_exact_rank_r_weight() -> None:
    r = 3
    W0 = low_rank(r)
    torch.manual_seed(0)
    A = nora(W0, r, 1.0).A
    _, _, Vh = torch.linalg.svd(W0)
    top = cosines(A.T, Vh[:r].T)
    torch.testing.assert_close(top, torch.ones(r, dtype=torch.float64), rtol=0, atol=1e-12)
    # Negative control: of a full-rank weight the sketch is only close to the top subspace, not in it.
    W_full = low_rank(10)
    torch.manual_seed(0)
    A = nora(W_full, r, 1.0).A
    _, _, Vh = torch.linalg.svd(W_full)
    assert cosines(A.T, Vh[:r].T).min() < 0.99


def test_a_scaled_step_from_the_sketch_solves_an_exact_rank_factorization() -> None:
    """min_B,A 1/2 ||s B A - M||^2 with rank(M) = r: from A0 = sketch of M, B0 = 0, one scaled (ScaledGD) step on
    B, B1 = B0 - (1/s^2) grad_B (A0 A0^T)^{-1}, gives s B1 A0 = M. A random A0 (LoRA's Kaiming) does not."""
    r, s = 3, 2.0
    M = low_rank(r)

    def one_step(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        grad_B = s * (s * B @ A - M) @ A.T  # (out, r)
        B1 = (
            B - torch.linalg.solve(A @ A.T, grad_B.T).T / s**2
        )  # the r x r preconditioner, by a solve
        return s * B1 @ A  # grad_A = s B^T (...) = 0 at B = 0: A stays

    torch.manual_seed(2)
    f = nora(M, r, s)
    torch.testing.assert_close(one_step(f.A, f.B), M, rtol=1e-10, atol=1e-10)
    torch.manual_seed(2)
    k = lx.init.get("kaiming")(M, r, s)
    gap = torch.linalg.matrix_norm(one_step(k.A, k.B) - M) / torch.linalg.matrix_norm(M)
    assert gap > 0.1


def test_nora_dtype_device_and_seeded_draws() -> None:
    W0 = low_rank(5).float()
    torch.manual_seed(4)
    a = nora(W0, 2, 1.0)
    torch.manual_seed(4)
    b = nora(W0.double(), 2, 1.0)
    assert a.A.dtype == a.B.dtype == torch.float32 and a.A.device == W0.device
    torch.testing.assert_close(
        a.A.double(), b.A, rtol=1e-6, atol=1e-7
    )  # the same Omega in any dtype


@pytest.mark.parametrize(
    ("rank", "sigma", "message"),
    [
        (11, 0.02, r"rank must be an integer in 1..min\(out, in\) = 10"),
        (0, 0.02, "rank must be an integer"),
        (2.0, 0.02, "rank must be an integer"),
        (2, 0.0, "sigma must be a finite number > 0"),
        (2, float("inf"), "sigma must be a finite number > 0"),
        (2, "0.1", "sigma must be a positive number"),
    ],
)
def test_bad_rank_and_options(rank: object, sigma: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        nora(low_rank(5), rank, 1.0, sigma=sigma)
