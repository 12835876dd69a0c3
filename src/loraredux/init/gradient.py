"""Gradient-based initialisers: `lora_ga` and `lora_one`, from the mean full-weight gradient G = dL/dW0.

Both read the layer's calibration gradient G (out, in) (`LayerData.grad`, the mean over the calibration batches of
dL/dW0 at the pretrained weights, gathered by `lx.init.gather`) and start the adapter in G's top singular subspaces:

    lora_ga    W0 = W_res + s B A,   B, A from singular vectors r+1..2r and 1..r of G   (W' = W0 at init)
    lora_one   W' = W0 + s B A,      s B A = (s / gamma) [-G]_r, one rank-r GD step     (W' != W0 at init)

SVDs run in float32 (float64 for a float64 base) on W0's device, exactly by default or, with `niter`, by the
randomized SVD that PEFT and the reference implementations use (`torch.svd_lowrank` with q = min(4r, min(out, in))
columns and `niter` subspace iterations; it draws from torch's global generator).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .registry import Factors, LayerData, register_init

__all__ = ["lora_ga", "lora_one"]

# LoRA-GA's splits of the top-2r singular triplets of G between A's rows and B's columns, named as in the reference
# code (Outsider565/LoRA-GA, peft/src/peft/tuners/lora/layer.py, `lora_ga_init`) and PEFT's `LoraGAConfig.direction`.
_DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
_FACTOR_SCALES = ("stable", "unit", "gd_scale")
_VARIANTS = ("paper", "peft")


def _indices(direction: str, rank: int) -> tuple[Tensor, Tensor]:
    """(r,), (r,): the indices into the top-2r triplets that give A's rows and B's columns."""
    if direction == "ArBr":
        return torch.arange(1, 2 * rank, 2), torch.arange(0, 2 * rank, 2)
    first, second = torch.arange(rank), torch.arange(rank, 2 * rank)
    return (first, second) if direction == "ArB2r" else (second, first)


def _work_dtype(W0: Tensor) -> torch.dtype:
    return torch.float64 if W0.dtype == torch.float64 else torch.float32


def _check_choice(init: str, option: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"init {init!r}: {option} must be one of {list(allowed)}, got {value!r}")


def _check_positive(init: str, option: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"init {init!r}: {option} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"init {init!r}: {option} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_niter(init: str, niter: object) -> None:
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, int) or niter < 0):
        raise ValueError(
            f"init {init!r}: niter must be None (exact SVD) or an integer >= 0 (randomized SVD), "
            f"got {niter!r}"
        )


def _check_rank(init: str, rank: int, needed: int, shape: tuple[int, ...]) -> None:
    """`needed` singular triplets (r or 2r) must exist in an (out, in) matrix."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"init {init!r}: rank must be an integer >= 1, got {rank!r}")
    if needed > min(shape):
        what, most = ("2 * rank", min(shape) // 2) if needed == 2 * rank else ("rank", min(shape))
        raise ValueError(
            f"init {init!r} uses {what} = {needed} singular vectors, but the weight {tuple(shape)} has only "
            f"min(out, in) = {min(shape)}: choose rank <= {most}"
        )


def _gradient(init: str, W0: Tensor, data: LayerData | None) -> Tensor:
    """G (out, in) from the calibration data, validated, in the working dtype on W0's device."""
    if data is None or data.grad is None:
        raise ValueError(
            f"init {init!r} needs the layer's mean gradient from calibration (LayerData.grad): pass "
            "lx.adapt_(..., calibration=batches, loss_fn=fn), or data=lx.init.gather(model, modules, "
            "['grad'], batches, loss_fn)[path]"
        )
    G = data.grad
    if tuple(G.shape) != tuple(W0.shape):
        raise ValueError(
            f"init {init!r}: the calibration gradient has shape {tuple(G.shape)}, but the weight is "
            f"{tuple(W0.shape)} (out, in); gather it for this layer"
        )
    G = G.detach().to(device=W0.device, dtype=_work_dtype(W0))
    if not torch.isfinite(G).all():
        raise ValueError(f"init {init!r}: the calibration gradient has non-finite entries")
    return G


def _top_svd(G: Tensor, k: int, rank: int, niter: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """U (out, k), S (k,), Vh (k, in): G's top-k singular triplets, exact or randomized (PEFT's q and niter)."""
    if niter is None:
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    else:
        U, S, V = torch.svd_lowrank(G, q=min(4 * rank, min(G.shape)), niter=niter)
        Vh = V.T
    return U[:, :k], S[:k], Vh[:k]


@register_init("lora_ga", needs=("grad",), moves_base=True)
def lora_ga(
    W0: Tensor,
    rank: int,
    scale: float,
    *,
    data: LayerData | None = None,
    direction: str = "ArB2r",
    factor_scale: str = "stable",
    stable_gamma: float = 16.0,
    variant: str = "paper",
    niter: int | None = None,
) -> Factors:
    """LoRA-GA: A and B from the singular vectors of the gradient, so LoRA's first step approximates full FT's.

    G = U S V^T (descending S); with c = d_out^{1/4} / sqrt(gamma) (the stable output scale) and the default
    direction "ArB2r":

        A = c V[:, 1:r]^T   (r, in),   B = c U[:, r+1:2r]   (out, r),   W_res = W0 - s B A,

    so W' = W_res + s B A = W0 at init. One SGD step of learning rate lr on (A, B) then moves W' by
    -lr s^2 (G A^T A + B B^T G) + O(lr^2) = -lr s^2 c^2 U[:, :2r] S[:2r] V[:, :2r]^T: the best rank-2r
    approximation of full fine-tuning's first step -lr G, for any split of the top 2r triplets between A and B.
    Wang, Yu, Li, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation", NeurIPS 2024, arXiv 2407.05000.
    The slices, the stable factor on both A and B, the sign (G, not -G) and the
    defaults (gamma = 16, "ArB2r") are confirmed against the authors' reference code (github.com/Outsider565/
    LoRA-GA, peft/src/peft/tuners/lora/layer.py, `lora_ga_init`); the paper's text beyond the abstract could not be
    retrieved here. The reading "A = V[:, :r]^T, B = U[:, r:2r]" is this default, 0-based.

    PEFT 0.21.2 (`init_lora_weights="lora_ga"`, `LoraGAConfig`) differs: its B also carries the singular values,
    B = c U[:, r+1:2r] diag(S[r+1:2r]), and its stable factor c multiplies B only. `variant="peft"` reproduces
    that; its first step is then -lr s^2 (G V_r V_r^T + c^2 U_B S_B^2 U_B^T G), no longer the rank-2r projection.

    Args:
        W0: (out, in) base weight.
        rank: r; 2r <= min(out, in).
        scale: s.
        data: the layer's calibration statistics; `data.grad` (out, in) is G.
        direction: which of the top 2r triplets go to A and to B: "ArB2r" (A: 1..r, B: r+1..2r), "A2rBr"
            (A: r+1..2r, B: 1..r) or "ArBr" (alternating: B the odd-numbered, A the even-numbered, 1-based).
        factor_scale: "stable" (c = d_out^{1/4} / sqrt(stable_gamma)), "unit" (orthonormal factors, c = 1) or
            "gd_scale" (A and B divided by s; the reference code's "gd", PEFT's "gd_scale").
        stable_gamma: gamma of the stable scale.
        variant: "paper" (the formula above) or "peft" (PEFT 0.21.2's weighting of B, see above).
        niter: None for the exact SVD; an integer k for the randomized SVD with k subspace iterations (PEFT and
            the reference code: q = min(4r, min(out, in)), niter = 4).

    Raises:
        ValueError: no calibration gradient, a gradient of another shape or with non-finite entries,
            2r > min(out, in), or an unknown / out-of-range option.
    """
    _check_choice("lora_ga", "direction", direction, _DIRECTIONS)
    _check_choice("lora_ga", "factor_scale", factor_scale, _FACTOR_SCALES)
    _check_choice("lora_ga", "variant", variant, _VARIANTS)
    gamma = _check_positive("lora_ga", "stable_gamma", stable_gamma)
    _check_niter("lora_ga", niter)
    _check_rank("lora_ga", rank, 2 * rank, tuple(W0.shape))
    G = _gradient("lora_ga", W0, data)  # (out, in)
    out_features = G.shape[0]

    U, S, Vh = _top_svd(G, 2 * rank, rank, niter)  # (out, 2r), (2r,), (2r, in)
    live = int((S[0] * max(G.shape) * torch.finfo(G.dtype).eps < S).sum()) if S[0] > 0 else 0
    if live < 2 * rank:
        warnings.warn(
            f"init 'lora_ga': the calibration gradient has numerical rank {live} < 2 rank = {2 * rank}, so "
            "some singular vectors LoRA-GA uses come from its null space (an arbitrary basis): more or "
            "larger calibration batches give a better-determined start",
            stacklevel=3,
        )
    rows_A, cols_B = _indices(direction, rank)
    A = Vh[rows_A]  # (r, in), orthonormal rows
    B = U[:, cols_B]  # (out, r), orthonormal columns
    if variant == "peft":
        B = B * S[cols_B]
    if factor_scale == "stable":
        c = out_features**0.25 / math.sqrt(gamma)
        B = B * c
        if variant == "paper":
            A = A * c
    elif factor_scale == "gd_scale":
        A, B = A / scale, B / scale
    A, B = A.contiguous().to(W0.dtype), B.contiguous().to(W0.dtype)
    # The residual from the factors as stored, so that base + s B A reproduces W0 in the adapter's precision.
    W = W0.detach().to(G.dtype)
    base = torch.addmm(W, B.to(G.dtype), A.to(G.dtype), alpha=-scale)  # (out, in)
    return Factors(A=A, B=B, base=base.to(W0.dtype))


@register_init("lora_one", needs=("grad",), identity=False)
def lora_one(
    W0: Tensor,
    rank: int,
    scale: float,
    *,
    data: LayerData | None = None,
    gamma: float = 128.0,
    normalize: bool = False,
    niter: int | None = None,
) -> Factors:
    """LoRA-One: the adapter starts as one rank-r gradient step, the best rank-r approximation of -G.

    -G = U S V^T (descending S); B = U_r S_r^{1/2} / sqrt(gamma), A = S_r^{1/2} V_r^T / sqrt(gamma), so

        W' = W0 + s B A = W0 - (s / gamma) [G]_r,

    full fine-tuning's first gradient step with learning rate s / gamma, truncated to rank r; the base is kept,
    so the function changes at init (identity=False). Zhang, Liu, Chen, "LoRA-One: One-Step Full Gradient Could
    Suffice for Fine-Tuning Large Language Models, Provably and Efficiently", ICML 2025, arXiv 2502.01235
    (https://yuanhez.github.io/loraoneofficial). The split, gamma and the unchanged base are confirmed against the
    authors' README and code (github.com/YuanheZ/LoRA-One, `run_exp.py`, direction "LoRA-One": SVD of -grad,
    no base offset); their A0 (d, r) B0 (r, k) is our B, A. The README's formula "A0 = U Diag(S) / sqrt(gamma),
    B0 = Diag(S) V^T / sqrt(gamma)" must read S^{1/2} for its stated equivalence to the GD step of learning rate
    alpha / (gamma sqrt(r)) to hold, and the code does take the square root. The released code also divides both
    factors by sqrt(sigma_1(G)) (`normalize=True`): s B A = (s / gamma) [-G]_r / sigma_1. The preconditioned
    optimiser of the paper (LoRA-One's second half) is an optimiser, not part of this init.

    Args:
        W0: (out, in) base weight (its shape, dtype and device are used).
        rank: r <= min(out, in).
        scale: s.
        data: the layer's calibration statistics; `data.grad` (out, in) is G.
        gamma: the paper's gamma (> 0); the README's recommended config uses 128.
        normalize: divide by G's top singular value, as the released code does.
        niter: None for the exact SVD; an integer k for `torch.svd_lowrank` with k subspace iterations.

    Raises:
        ValueError: no calibration gradient, a gradient of another shape, non-finite or all zero,
            rank > min(out, in), or an out-of-range option.

    Warns:
        UserWarning: G has fewer than r non-negligible singular values: those adapter directions start with
            both factors zero and receive no gradient.
    """
    g = _check_positive("lora_one", "gamma", gamma)
    if not isinstance(normalize, bool):
        raise ValueError(f"init 'lora_one': normalize must be True or False, got {normalize!r}")
    _check_niter("lora_one", niter)
    _check_rank("lora_one", rank, rank, tuple(W0.shape))
    G = _gradient("lora_one", W0, data)  # (out, in)

    U, S, Vh = _top_svd(-G, rank, rank, niter)  # (out, r), (r,), (r, in)
    top = S[0]
    if not top > 0:
        raise ValueError(
            "init 'lora_one': the calibration gradient is zero, so -G has no top subspace"
        )
    tol = top * max(G.shape) * torch.finfo(G.dtype).eps
    live = int((tol < S).sum())
    if live < rank:
        warnings.warn(
            f"init 'lora_one': the calibration gradient has numerical rank {live} < rank {rank}; the other "
            f"{rank - live} adapter direction(s) start with A and B both zero and never receive a gradient",
            stacklevel=2,
        )
    weights = S / g
    if normalize:
        weights = weights / top
    root = weights.sqrt()  # (r,)
    B = U * root[None, :]  # (out, r)
    A = root[:, None] * Vh  # (r, in)
    return Factors(A=A.contiguous().to(W0.dtype), B=B.contiguous().to(W0.dtype))
