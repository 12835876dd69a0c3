"""The advisor's measurements against their definitions and against known answers: spectra of planted matrices,
Gavish-Donoho's constants and rank recovery in noise, the noise level from batch halves, subspace overlap."""

from __future__ import annotations

import math

import pytest
import torch

from loraredux.advisor.measure import (
    energy_rank,
    gavish_donoho_rank,
    marchenko_pastur_median,
    noise_from_halves,
    optimal_threshold,
    singular_values,
    spectrum_stats,
    subspace_overlap,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def planted(m: int, n: int, values: list[float], seed: int = 0) -> torch.Tensor:
    g = gen(seed)
    U = torch.linalg.qr(torch.randn(m, len(values), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(values), generator=g, dtype=torch.float64)).Q
    return U @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ V.T


def test_spectrum_numbers_follow_their_definitions():
    s = singular_values(planted(30, 20, [4.0, 2.0, 1.0, 1.0]))
    stats = spectrum_stats(s, (30, 20))
    torch.testing.assert_close(
        stats.energy[:4], torch.tensor([16, 20, 21, 22], dtype=torch.float64) / 22
    )
    p = torch.tensor([4, 2, 1, 1], dtype=torch.float64) / 8
    assert stats.effective_rank == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-9)
    assert stats.stable_rank == pytest.approx(22 / 16, rel=1e-9)
    assert stats.condition == pytest.approx(
        4.0, rel=1e-9
    )  # the zeros beyond the rank are not counted
    assert stats.numerical_rank == 4
    assert energy_rank(s, 0.9) == 2 and energy_rank(s, 0.95) == 3 and energy_rank(s, 0.7) == 1
    assert energy_rank(s, 1.0) == 4
    flat = spectrum_stats(torch.ones(5, dtype=torch.float64))
    assert flat.effective_rank == pytest.approx(5.0) and flat.stable_rank == pytest.approx(5.0)
    zero = spectrum_stats(torch.zeros(3))
    assert zero.numerical_rank == 0 and zero.condition == math.inf
    with pytest.raises(ValueError, match="energy fraction must be in"):
        energy_rank(s, 1.5)


def test_randomized_top_singular_values_are_accurate_on_a_decaying_spectrum():
    W = planted(300, 200, [0.9**i for i in range(120)], seed=1)
    exact = torch.linalg.svdvals(W)[:16]
    torch.testing.assert_close(singular_values(W, k=16), exact, rtol=1e-6, atol=0)


def test_gavish_donoho_constants():
    # the paper's square case: 4/sqrt(3) sqrt(n) sigma with sigma known, 2.858 median(y) with sigma unknown
    assert optimal_threshold((100, 100), sigma=1.0) == pytest.approx(
        4 / math.sqrt(3) * 10, rel=1e-12
    )
    assert marchenko_pastur_median(1.0) == pytest.approx(0.6528, abs=1e-4)
    s = torch.ones(100, dtype=torch.float64)
    assert optimal_threshold((100, 100), s=s) == pytest.approx(2.858, abs=1e-3)
    # and the paper's cubic approximation of omega(beta) to within 0.01 elsewhere
    for beta in (0.1, 0.25, 0.5, 0.75):
        n = 1000
        omega = optimal_threshold((int(beta * n), n), s=torch.ones(int(beta * n)))
        assert omega == pytest.approx(
            0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43, abs=0.01
        )
    with pytest.raises(ValueError, match="needs all 50 singular values"):
        optimal_threshold((50, 80), s=torch.ones(10))


@pytest.mark.parametrize("known", [True, False])
def test_the_rank_of_a_noisy_low_rank_matrix_is_recovered_and_pure_noise_has_none(known):
    m, n, sigma = 120, 200, 0.05
    # signal singular values well above the noise edge sigma (sqrt(m) + sqrt(n)) = 1.25, and a weak one below it
    X = planted(m, n, [6.0, 5.0, 4.0, 3.0, 0.3], seed=2)
    Y = X + sigma * torch.randn(m, n, generator=gen(3), dtype=torch.float64)
    s = singular_values(Y)
    assert gavish_donoho_rank(s, (m, n), sigma if known else None) == 4
    noise = sigma * torch.randn(m, n, generator=gen(4), dtype=torch.float64)
    assert gavish_donoho_rank(singular_values(noise), (m, n), sigma if known else None) == 0


def test_noise_from_halves_recovers_the_noise_of_the_mean_gradient():
    signal = planted(64, 48, [1.0, 0.5], seed=5)
    sigma_half = 0.2  # per-entry noise of each half's mean
    G_a = signal + sigma_half * torch.randn(64, 48, generator=gen(6), dtype=torch.float64)
    G_b = signal + sigma_half * torch.randn(64, 48, generator=gen(7), dtype=torch.float64)
    estimate = noise_from_halves(G_a, G_b)
    assert estimate == pytest.approx(
        sigma_half / math.sqrt(2), rel=0.05
    )  # noise of (G_a + G_b) / 2
    assert noise_from_halves(signal, signal) == 0.0


def test_subspace_overlap_is_one_for_a_subspace_and_zero_for_its_complement():
    Q = torch.linalg.qr(torch.randn(20, 20, generator=gen(8), dtype=torch.float64)).Q
    U, V = Q[:, :4], Q[:, 4:8]
    R = (
        Q[:, :4] @ torch.linalg.qr(torch.randn(4, 4, generator=gen(9), dtype=torch.float64)).Q
    )  # rotated basis
    assert subspace_overlap(U, R) == pytest.approx(1.0)
    assert subspace_overlap(U, V) == pytest.approx(0.0, abs=1e-12)
    half = (Q[:, :4] + Q[:, 4:8]) / math.sqrt(2)  # every direction at 45 degrees
    assert subspace_overlap(U, half) == pytest.approx(0.5)


def layer_problem(
    subspace: str, batches: int = 8, signal=(3.0, 2.5), noise: float = 0.3, seed: int = 10
):
    """W0 (40, 30) with a decaying spectrum; per-batch gradients = a rank-2 signal in W0's principal or minor
    singular directions (or none) + i.i.d. noise of std `noise`."""
    g = gen(seed)
    U0 = torch.linalg.qr(torch.randn(40, 30, generator=g, dtype=torch.float64)).Q
    V0 = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64)).Q
    W0 = U0 @ torch.diag(torch.logspace(0, -2, 30, dtype=torch.float64)) @ V0.T
    cols = slice(0, 2) if subspace == "principal" else slice(28, 30)
    S = U0[:, cols] @ torch.diag(torch.tensor(signal, dtype=torch.float64)) @ V0[:, cols].T
    if subspace == "none":
        S = torch.zeros(40, 30, dtype=torch.float64)
    grads = [
        S + noise * torch.randn(40, 30, generator=g, dtype=torch.float64) for _ in range(batches)
    ]
    return W0, grads


@pytest.mark.parametrize(
    ("subspace", "principal", "minor"), [("principal", True, False), ("minor", False, True)]
)
def test_a_layer_measurement_finds_the_planted_rank_and_where_it_lies(subspace, principal, minor):
    from loraredux.advisor.measure import measure_layer

    W0, grads = layer_problem(subspace)
    m = measure_layer(W0, grads)
    assert m.needed_rank == 2
    assert m.noise == pytest.approx(
        0.3 / math.sqrt(8), rel=0.1
    )  # the noise of the mean of 8 batches
    assert (m.principal_alignment > 0.9) == principal and (m.minor_alignment > 0.9) == minor
    assert m.weight.condition == pytest.approx(100.0, rel=1e-9)


def test_pure_noise_gradients_need_no_rank_and_inputs_give_their_conditioning():
    from loraredux.advisor.measure import measure_layer

    W0, grads = layer_problem("none")
    m = measure_layer(W0, grads, input_covariance=torch.diag(torch.arange(1.0, 11.0)))
    assert m.needed_rank == 0
    assert m.input_condition == pytest.approx(10.0)
    single = measure_layer(W0, grads[:1])
    assert single.noise is None and single.needed_rank is None and single.gradient is not None
    with pytest.raises(ValueError, match="gradients of shape"):
        measure_layer(W0, [torch.zeros(3, 3)])
