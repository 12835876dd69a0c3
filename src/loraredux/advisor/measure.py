"""What the advisor measures: pure functions over tensors, no model and no decisions.

Spectra of a weight or a gradient:
    energy fractions   E_r = Σ_{i<=r} σ_i² / Σ_i σ_i²
    effective rank     erank = exp(-Σ p_i log p_i),  p_i = σ_i / Σ_j σ_j         (Roy and Vetterli, 2007)
    stable rank        sr = ‖M‖_F² / ‖M‖_2² = Σ σ_i² / σ_1²
    condition number   κ = σ_1 / σ_min (the smallest singular value above the matrix's numerical-rank tolerance)

The rank a noisy matrix supports: Y = X + σ Z (m x n, Z i.i.d. N(0, 1)), hard-thresholding Y's singular values at
the AMSE-optimal level (Gavish and Donoho, "The Optimal Hard Threshold for Singular Values is 4/√3", IEEE Trans.
Inf. Theory 2014, arXiv 1305.5870). With β = min(m, n) / max(m, n):
    σ known:    τ = λ*(β) √max(m, n) σ,  λ*(β) = sqrt(2(β + 1) + 8β / ((β + 1) + sqrt(β² + 14β + 1)))
    σ unknown:  τ = ω(β) median(σ_i(Y)),  ω(β) = λ*(β) / sqrt(μ_β)
where μ_β is the median of the Marchenko-Pastur law of ratio β (computed here numerically; for a square matrix
λ* = 4/√3 and ω ≈ 2.858). The rank is the number of singular values above τ.

The noise level of a mean gradient from two halves of the calibration batches: with G_a, G_b the means over the
halves, D = G_a - G_b holds no signal and its entries have variance 2 σ_h², while the overall mean G = (G_a + G_b)/2
has noise of variance σ_h² / 2; so the per-entry noise of G is σ = rms(D) / 2.

Subspace alignment: for orthonormal U (n, k) and V (n, k), overlap = ‖U^T V‖_F² / k, the mean squared cosine of
their principal angles: 1 for one subspace, k/n on average for independent random ones.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "LayerMeasurement",
    "SpectrumStats",
    "energy_rank",
    "gavish_donoho_rank",
    "marchenko_pastur_median",
    "measure_layer",
    "noise_from_halves",
    "optimal_threshold",
    "singular_values",
    "spectrum_stats",
    "subspace_overlap",
]


def singular_values(M: Tensor, k: int | None = None, niter: int = 4) -> Tensor:
    """The singular values of M (2-D) in float64, descending: all of them, or the top k from a randomized SVD
    (`torch.svd_lowrank` with k + 10 columns and `niter` power iterations; the tests bound its error)."""
    if M.ndim != 2:
        raise ValueError(f"singular_values needs a matrix, got shape {tuple(M.shape)}")
    M = M.detach().double()
    if k is None or k + 10 >= min(M.shape):
        return torch.linalg.svdvals(M)
    _, s, _ = torch.svd_lowrank(M, q=k + 10, niter=niter)
    return s[:k]


@dataclass(frozen=True)
class SpectrumStats:
    """Summary numbers of a spectrum (see the module docstring).

    Attributes:
        energy: (len,) cumulative energy fractions E_1 .. E_n.
        effective_rank: Roy-Vetterli's exp-entropy rank.
        stable_rank: ‖M‖_F² / ‖M‖_2².
        condition: σ_1 / σ_min over the numerically non-zero singular values (inf for a zero matrix).
        numerical_rank: the singular values above max(m, n) eps σ_1 (numpy's matrix_rank tolerance).
    """

    energy: Tensor
    effective_rank: float
    stable_rank: float
    condition: float
    numerical_rank: int


def spectrum_stats(s: Tensor, shape: tuple[int, int] | None = None) -> SpectrumStats:
    """Summary numbers of singular values `s` (descending, non-negative); `shape` (m, n) sets the numerical-rank
    tolerance (default: len(s) for both)."""
    s = s.detach().double()
    if s.ndim != 1 or (s < 0).any():
        raise ValueError("spectrum_stats needs a 1-D tensor of non-negative singular values")
    total2 = float((s**2).sum())
    if total2 == 0.0:
        zero = torch.zeros_like(s)
        return SpectrumStats(zero, 0.0, 0.0, math.inf, 0)
    energy = torch.cumsum(s**2, 0) / total2
    p = s / s.sum()
    p = p[p > 0]
    erank = math.exp(float(-(p * p.log()).sum()))
    size = max(shape) if shape is not None else len(s)
    tol = size * torch.finfo(torch.float64).eps * float(s[0])
    kept = s[s > tol]
    return SpectrumStats(
        energy=energy,
        effective_rank=erank,
        stable_rank=total2 / float(s[0]) ** 2,
        condition=float(kept[0] / kept[-1]),
        numerical_rank=len(kept),
    )


def energy_rank(s: Tensor, fraction: float) -> int:
    """The smallest r with E_r >= fraction (0 < fraction <= 1); 0 for a zero spectrum."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"energy fraction must be in (0, 1], got {fraction!r}")
    energy = spectrum_stats(s).energy
    if not len(energy) or float(energy[-1]) == 0.0:
        return 0
    return int((energy < fraction - 1e-12).sum()) + 1


def _lambda_star(beta: float) -> float:
    return math.sqrt(2 * (beta + 1) + 8 * beta / ((beta + 1) + math.sqrt(beta**2 + 14 * beta + 1)))


@functools.lru_cache(maxsize=64)
def marchenko_pastur_median(beta: float) -> float:
    """The median of the Marchenko-Pastur law with ratio 0 < beta <= 1 and unit variance (support
    [(1 - √β)², (1 + √β)²], density sqrt((b - x)(x - a)) / (2π β x)), by integrating the density on a fine grid."""
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta!r}")
    a, b = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    # x = a + (b - a) sin²(t/2) puts more points at the edges, where the density has square-root behaviour
    t = torch.linspace(0.0, math.pi, 200_001, dtype=torch.float64)
    x = a + (b - a) * torch.sin(t / 2) ** 2
    dx_dt = (b - a) * torch.sin(t / 2) * torch.cos(t / 2)
    density = torch.sqrt(((b - x) * (x - a)).clamp(min=0)) / (
        2 * math.pi * beta * x.clamp(min=1e-300)
    )
    integrand = density * dx_dt
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64),
                     torch.cumsum((integrand[1:] + integrand[:-1]) / 2 * (t[1] - t[0]), 0)])  # fmt: skip
    cdf = cdf / cdf[-1]  # the law has mass 1 on its support for beta <= 1
    i = int(torch.searchsorted(cdf, torch.tensor(0.5, dtype=torch.float64)))
    w = float((0.5 - cdf[i - 1]) / (cdf[i] - cdf[i - 1]))
    return float(x[i - 1] + w * (x[i] - x[i - 1]))


def optimal_threshold(
    shape: tuple[int, int], sigma: float | None = None, s: Tensor | None = None
) -> float:
    """Gavish-Donoho's optimal hard threshold for an (m, n) matrix: from the noise level `sigma` when known,
    else from the median of its singular values `s` (all min(m, n) of them)."""
    m, n = sorted(shape)
    beta = m / n
    if sigma is not None:
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma!r}")
        return _lambda_star(beta) * math.sqrt(n) * sigma
    if s is None or len(s) != m:
        raise ValueError(
            f"without sigma, the threshold needs all {m} singular values of the matrix (the median estimates "
            "the noise)"
        )
    omega = _lambda_star(beta) / math.sqrt(marchenko_pastur_median(beta))
    return omega * float(s.double().median())


def gavish_donoho_rank(s: Tensor, shape: tuple[int, int], sigma: float | None = None) -> int:
    """The number of singular values above the optimal hard threshold (see `optimal_threshold`)."""
    return int((s.double() > optimal_threshold(shape, sigma, s)).sum())


def noise_from_halves(G_a: Tensor, G_b: Tensor) -> float:
    """The per-entry noise level of the mean gradient (G_a + G_b) / 2, from the means of two halves of the
    calibration batches: rms(G_a - G_b) / 2 (see the module docstring)."""
    if G_a.shape != G_b.shape:
        raise ValueError(f"the halves differ in shape: {tuple(G_a.shape)} vs {tuple(G_b.shape)}")
    D = G_a.double() - G_b.double()
    return float(D.pow(2).mean().sqrt()) / 2


def subspace_overlap(U: Tensor, V: Tensor) -> float:
    """‖U^T V‖_F² / k for orthonormal U, V (n, k): 1 when they span one subspace, 0 when orthogonal."""
    if U.shape != V.shape:
        raise ValueError(f"the bases differ in shape: {tuple(U.shape)} vs {tuple(V.shape)}")
    return float((U.double().T @ V.double()).pow(2).sum()) / U.shape[1]


@dataclass(frozen=True)
class LayerMeasurement:
    """What the advisor knows about one target layer.

    Attributes:
        weight: W0's spectrum numbers.
        gradient: the mean calibration gradient's spectrum numbers (None without gradients).
        noise: the per-entry noise level of the mean gradient, from two halves of the batches (None without at
            least two batches).
        needed_rank: the Gavish-Donoho rank of the mean gradient at that noise level (None without it).
        principal_alignment: overlap of the gradient's top-k left and right singular subspaces with W0's top-k
            (mean of the two), k = max(needed_rank, 1); 1: the update lives where W0 is strong (PiSSA's case).
        minor_alignment: the same with W0's bottom-k singular subspaces (MiLoRA's case).
        input_condition: the condition number of the input covariance (None without input statistics).
        weight_values: W0's singular values, descending.
        gradient_values: the mean gradient's singular values, descending (None without gradients).
        threshold: the Gavish-Donoho threshold the gradient's singular values were held against (None without a
            noise level).
    """

    weight: SpectrumStats
    gradient: SpectrumStats | None = None
    noise: float | None = None
    needed_rank: int | None = None
    principal_alignment: float | None = None
    minor_alignment: float | None = None
    input_condition: float | None = None
    weight_values: Tensor | None = None
    gradient_values: Tensor | None = None
    threshold: float | None = None


def measure_layer(
    W0: Tensor,
    grads: Sequence[Tensor] = (),
    input_covariance: Tensor | None = None,
) -> LayerMeasurement:
    """Measure one layer: W0 (out, in), its per-batch calibration gradients dL/dW0 (each (out, in)), and the
    covariance of its inputs (in, in), any of the last two optional.

    The mean gradient's noise comes from the halves of the batches (even and odd ones, `noise_from_halves`), the
    rank it supports from Gavish-Donoho at that noise, and its alignment from its top singular vectors.
    """
    W0 = W0.detach().double()
    weight_values = singular_values(W0)
    weight = spectrum_stats(weight_values, tuple(W0.shape))
    out: dict[str, object] = {"weight_values": weight_values}
    if grads:
        stack = torch.stack([g.detach().double() for g in grads])  # (batches, out, in)
        if stack.shape[1:] != W0.shape:
            raise ValueError(
                f"gradients of shape {tuple(stack.shape[1:])} for a weight of {tuple(W0.shape)}"
            )
        G = stack.mean(0)
        U, s, Vh = torch.linalg.svd(G, full_matrices=False)
        out["gradient"] = spectrum_stats(s, tuple(G.shape))
        out["gradient_values"] = s
        if len(grads) >= 2:
            halves = len(grads) // 2 * 2  # an odd batch out, so the halves weigh the same
            noise = noise_from_halves(stack[:halves:2].mean(0), stack[1:halves:2].mean(0))
            out["noise"] = noise
            out["threshold"] = optimal_threshold(tuple(G.shape), noise)
            out["needed_rank"] = int((s > out["threshold"]).sum())
        k = max(int(out.get("needed_rank") or 1), 1)  # type: ignore[call-overload]
        U0, _, V0h = torch.linalg.svd(W0, full_matrices=False)

        def overlap(cols: slice) -> float:
            left = subspace_overlap(U[:, :k], U0[:, cols])
            right = subspace_overlap(Vh[:k].T, V0h[cols].T)
            return (left + right) / 2

        n = U0.shape[1]
        out["principal_alignment"] = overlap(slice(0, k))
        out["minor_alignment"] = overlap(slice(n - k, n))
    if input_covariance is not None:
        eig = torch.linalg.eigvalsh(input_covariance.detach().double())
        out["input_condition"] = float(eig[-1] / eig[0]) if float(eig[0]) > 0 else math.inf
    return LayerMeasurement(weight=weight, **out)  # type: ignore[arg-type]
