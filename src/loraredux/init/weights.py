"""Data-free initialisers from the base weight's own spectrum: `pissa`, `milora` and `olora`.

Each puts a rank-r piece of W0 into the adapter and moves the base to the rest, so W' = W0 at init:

    W0 = W_res + s B A,   the adapter trains the piece s B A, W_res stays frozen.

The factorisation is computed in float32 (float64 for a float64 base) and the results are cast back to W0's dtype,
as PEFT does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import Factors, register_init

__all__ = ["milora", "olora", "pissa", "split_spectrum"]


def _work(W0: Tensor) -> Tensor:
    return W0.detach().to(torch.float64 if W0.dtype == torch.float64 else torch.float32)


def split_spectrum(W0: Tensor, U: Tensor, S: Tensor, Vh: Tensor, scale: float) -> Factors:
    """A = diag(sqrt(S / s)) Vh, B = U diag(sqrt(S / s)), base = W0 - s B A (in W0's dtype).

    Args:
        W0: (out, in) the base weight.
        U: (out, r) left singular vectors of the chosen piece.
        S: (r,) its singular values.
        Vh: (r, in) its right singular vectors.
        scale: s, divided out so that s B A = U diag(S) Vh.
    """
    root = torch.sqrt(S / scale)  # (r,)
    A = root[:, None] * Vh  # (r, in)
    B = U * root[None, :]  # (out, r)
    W = _work(W0)
    base = W - scale * (B @ A)  # (out, in)
    return Factors(A=A.to(W0.dtype), B=B.to(W0.dtype), base=base.to(W0.dtype))


@register_init("pissa", moves_base=True)
def pissa(
    W0: Tensor, rank: int, scale: float, *, niter: int | None = None, oversample: int = 0
) -> Factors:
    """PiSSA: the adapter starts as W0's principal rank-r part, the base keeps the residual.

    W0 = U S V^T; A = S_r^{1/2} V_r^T / sqrt(s), B = U_r S_r^{1/2} / sqrt(s), W_res = W0 - s B A
    (= U_[r:] S_[r:] V_[r:]^T). Meng, Wang, Zhang, "PiSSA: Principal Singular Values and Singular Vectors
    Adaptation of Large Language Models", NeurIPS 2024, arXiv 2404.02948, Eq. (2)-(4); the division by s so that
    any alpha works is PEFT's (`pissa_init`).

    Args:
        W0: (out, in) base weight.
        rank: r.
        scale: s.
        niter: None for the exact SVD; an integer k for the randomized SVD with k subspace iterations
            (Halko, Martinsson, Tropp 2011; `torch.svd_lowrank`, PEFT's `"pissa_niter_k"`): much faster for
            r << min(out, in), and close to exact on weights whose spectrum decays.
        oversample: with `niter`, sketch r + p columns and keep the top r (Halko et al.'s oversampling): on
            SmolLM2's slowly decaying spectra p = 8 halves the gap to the exact SVD for about 0.3 s more
            (BENCHMARKS.md). 0, PEFT's choice, keeps PEFT's numbers.
    """
    W = _work(W0)
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    else:
        if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
            raise ValueError(f"init 'pissa': niter must be an integer >= 0 or None, got {niter!r}")
        if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
            raise ValueError(
                f"init 'pissa': oversample must be an integer >= 0, got {oversample!r}"
            )
        q = min(rank + oversample, *W.shape)
        U, S, V = torch.svd_lowrank(W, q=q, niter=niter)
        U, S, Vh = U[:, :rank], S[:rank], V[:, :rank].T
    return split_spectrum(W0, U, S, Vh, scale)


@register_init("milora", moves_base=True)
def milora(W0: Tensor, rank: int, scale: float) -> Factors:
    """MiLoRA: the adapter starts as W0's *minor* rank-r part (smallest singular values), the base keeps the rest.

    W0 = U S V^T with S descending; the minor part U_m S_m V_m^T uses the last r triplets;
    A = S_m^{1/2} V_m^T / sqrt(s), B = U_m S_m^{1/2} / sqrt(s), W_res = W0 - s B A. The principal subspace,
    which holds the pretrained knowledge, is left in the frozen base. Wang et al., "MiLoRA: Harnessing Minor
    Singular Components for Parameter-Efficient LLM Finetuning", NAACL 2025, arXiv 2406.09044, §3.

    Args:
        W0: (out, in) base weight.
        rank: r.
        scale: s.
    """
    U, S, Vh = torch.linalg.svd(_work(W0), full_matrices=False)
    return split_spectrum(W0, U[:, -rank:], S[-rank:], Vh[-rank:], scale)


@register_init("olora", moves_base=True)
def olora(W0: Tensor, rank: int, scale: float) -> Factors:
    """OLoRA: orthonormal B from the QR decomposition of W0; the base keeps the rest.

    W0 = Q R; B = Q[:, :r] (orthonormal columns), A = R[:r, :], W_res = W0 - s B A. Büyükakyüz, "OLoRA:
    Orthonormal Low-Rank Adaptation of Large Language Models", arXiv 2406.01775, Algorithm 1; as PEFT's
    `olora_init`, A and B are not divided by s (so s B A is s times the leading QR piece, and W_res absorbs it).

    Args:
        W0: (out, in) base weight.
        rank: r.
        scale: s.
    """
    W = _work(W0)
    Q, R = torch.linalg.qr(W)  # Q (out, k), R (k, in)
    B, A = Q[:, :rank].contiguous(), R[:rank].contiguous()
    base = W - scale * (B @ A)
    return Factors(A=A.to(W0.dtype), B=B.to(W0.dtype), base=base.to(W0.dtype))
