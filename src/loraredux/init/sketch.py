"""Sketch-based initialisers: `nora`, a Nyström (random-sketch) start that needs no SVD and no data.

    nora   A = sigma Omega W0 / s,  B = 0,   Omega (r, out) with N(0, 1) entries   (W' = W0 at init)

The test matrix Omega is drawn from torch's global generator, on the CPU in float32 as the reference code draws it,
so a seeded run is reproducible on any device and dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .registry import Factors, register_init

__all__ = ["nora"]


@register_init("nora")
def nora(W0: Tensor, rank: int, scale: float, *, sigma: float = 0.02) -> Factors:
    """NoRA: A is a Gaussian sketch of the pretrained weight's row space, B = 0.

        A = sigma Omega W0 / s   (r, in),   Omega in R^{r x out}, [Omega]_ij ~ N(0, 1),   B = 0,

    so B A = 0 and W' = W0 at init. Li, Zhang, Mokhtari, He, "On the Crucial Role of Initialization for Matrix
    Factorization", ICLR 2025, arXiv 2410.18965: for asymmetric factorization min ||X Y^T - M||_F the Nyström
    initialization is X0 = M Omega (a random sketch of the target's range) with Y0 = 0, and ScaledGD from it
    converges fast (quadratically, or in one step when M has exact rank r, since the sketch already spans M's
    range and the zero factor's first scaled step solves the least-squares problem on it). NoRA carries this to
    LoRA with the pretrained weight as the sketched matrix, on the factor that LoRA keeps non-zero: A's rows span
    (a random r-dimensional piece of) W0's row space, and B starts at zero.

    Reading, confirmed from the authors' code (github.com/BingcongLi/NoRA, peft/src/peft/tuners/lora.py,
    `sketchy_A_init`, `lora_init="sketchy"`): sketch = nora_sigma * randn(r, out) @ W / scaling, written to A, with
    B zero; the launch scripts use nora_sigma = 0.02 (the config default is 0.1). The paper's text beyond the
    abstract could not be retrieved here. Two defects of that code are not reproduced: it computes the sketch in
    the layer's constructor, before the pretrained weight is copied in (so from a freshly initialised weight), and
    assigns it to `lora_A.data`, an attribute of the nn.Linear module rather than its weight. NoRA+ (ScaledGD-style
    preconditioning of the updates) is an optimiser, not part of this init.

    Args:
        W0: (out, in) base weight, the sketched matrix.
        rank: r <= min(out, in).
        scale: s (divided out, so the first update of B, s G A^T = sigma G W0^T Omega^T, does not depend on s).
        sigma: the sketch's scale (> 0).

    Raises:
        ValueError: rank outside 1..min(out, in) or sigma not a finite number > 0.
    """
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise ValueError(f"init 'nora': sigma must be a positive number, got {sigma!r}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"init 'nora': sigma must be a finite number > 0, got {sigma!r}")
    out_features = W0.shape[0]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(W0.shape):
        raise ValueError(
            f"init 'nora': rank must be an integer in 1..min(out, in) = {min(W0.shape)} for a weight "
            f"{tuple(W0.shape)}, got {rank!r}"
        )
    work = torch.float64 if W0.dtype == torch.float64 else torch.float32
    omega = torch.randn(rank, out_features).to(device=W0.device, dtype=work)  # (r, out)
    A = (sigma / scale) * (omega @ W0.detach().to(work))  # (r, in)
    B = torch.zeros(out_features, rank, dtype=W0.dtype, device=W0.device)
    return Factors(A=A.to(W0.dtype), B=B)
