"""ABBA: the Hadamard product of two learned low-rank matrices, decoupled from the frozen weight.

    W' = W0 + ΔW,     ΔW = s (B1 A1) ⊙ (B2 A2),     A1: (r1, in),  B1: (out, r1),  A2: (r2, in),  B2: (out, r2)

with (r1 + r2)(in + out) trainable parameters and rank(ΔW) <= r1 r2: at LoRA's budget (r1 = r2 = r / 2) the update
reaches rank r^2 / 4 instead of r. The product is computed without any dense (out, in) matrix through the
Khatri-Rao identity

    (B1 A1) ⊙ (B2 A2) = (B1 •ᵣ B2)(A1 ∗ A2),    (B1 •ᵣ B2)[i, k r2 + l] = B1[i, k] B2[i, l]   (out, r1 r2),
                                                 (A1 ∗ A2)[k r2 + l, j] = A1[k, j] A2[l, j]   (r1 r2, in),

so ABBA is exactly a rank-r1 r2 LoRA (`lora_form()` gives that pair) and the forward is
y = base(x) + s (x (A1 ∗ A2)^T)(B1 •ᵣ B2)^T.

Singhal, Ponkshe, Vartak, Vepakomma, "ABBA: Highly Expressive Hadamard Product Adaptation for Large Language
Models" (ICLR 2026 as "ABBA-Adapters: Efficient and Expressive Fine-Tuning of Foundation Models"), arXiv 2505.14238.

Where each detail was confirmed:
- The equation, the parameter count (r1 + r2)(m + n), r1 = r2 = r / 2 for a LoRA-rank-r budget, the rank r1 r2 and
  the Khatri-Rao forward: the paper's abstract and project page (rohit01-zoey.github.io/abba-page) and the review at
  themoonlight.io; the two Khatri-Rao factors as written above: the authors' code (github.com/CERT-Lab/abba,
  `abba.py`, `_khatri_rao` / `_khatri_rao_A`).
- Initialisation (paper, as summarised by themoonlight.io; authors' `init_weights_svd_mixed`): the first pair is
  the truncated SVD of W0, B1 = U_r1 Σ_r1^(1/2), A1 = Σ_r1^(1/2) V_r1^T, so B1 A1 is W0's best rank-r1
  approximation; the second pair starts like LoRA with B2 = 0 and A2 Kaiming-uniform (the authors call
  `nn.init.kaiming_uniform_` with its default a = 0, bound sqrt(6 / in)). W0 itself is not changed and B2 = 0 makes
  ΔW = 0, so W' = W0 at the start. (Both B's at zero would give zero gradients to every factor.) The SVD is exact
  (`torch.linalg.svd`) up to min(out, in) = `EXACT_SVD_LIMIT`, above that randomized (`torch.svd_lowrank`, 10
  power iterations as the authors, plus 10 oversampled columns they do not use), in float32 or wider.
- Scale (†): the authors' code multiplies B1 by sqrt(alpha1) and B2 by sqrt(alpha2), i.e. s = sqrt(alpha1 alpha2),
  and every script passes alpha1 = alpha2 = alpha, i.e. s = alpha; that is our default (`alpha`, 8 like their
  `ABBAConfig`). The paper's own section on the scale factor (a rank-stability argument) could not be read through
  the search tool; `rank_stable=True` gives the rsLoRA-style s = alpha / sqrt(r1 r2), which treats ΔW as the rank-r1 r2
  LoRA product above. Check the paper before relying on either for a new result.
- Defaults, the authors' `ABBAConfig`: r1 = r2 = 8, alpha1 = alpha2 = 8, no dropout. Their forward defines dropout
  but never applies it; ours applies it to the adapter's input, as LoRA does.

PEFT has no ABBA (issue huggingface/peft#2587 discusses it as a LoHa option), so ABBA saves in loraredux's native
format only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core import Adapter, AdapterConfig, accumulate_, initialising, register

__all__ = ["ABBA", "EXACT_SVD_LIMIT", "ABBAConfig", "khatri_rao_columns", "khatri_rao_rows"]

#: Largest min(out, in) for which the first pair is initialised by an exact SVD (above: randomized SVD).
EXACT_SVD_LIMIT = 1024


def khatri_rao_rows(B1: Tensor, B2: Tensor) -> Tensor:
    """Row-wise Kronecker product B1 •ᵣ B2: (out, r1), (out, r2) -> (out, r1 r2).

    Entry [i, k r2 + l] = B1[i, k] B2[i, l].
    """
    return (B1[:, :, None] * B2[:, None, :]).reshape(B1.shape[0], -1)


def khatri_rao_columns(A1: Tensor, A2: Tensor) -> Tensor:
    """Column-wise Khatri-Rao product A1 ∗ A2: (r1, in), (r2, in) -> (r1 r2, in).

    Entry [k r2 + l, j] = A1[k, j] A2[l, j].
    """
    return (A1[:, None, :] * A2[None, :, :]).reshape(-1, A1.shape[1])


def truncated_svd_factors(W: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(B, A) with B A = W's best rank-`rank` approximation: B = U Σ^(1/2) (out, rank), A = Σ^(1/2) V^T (rank, in).

    Computed in float32 or wider (half precision has no SVD) and returned in W's dtype.
    """
    Wc = W.detach()
    if Wc.dtype not in (torch.float32, torch.float64):
        Wc = Wc.float()
    if min(Wc.shape) <= EXACT_SVD_LIMIT:
        U, S, Vh = torch.linalg.svd(Wc, full_matrices=False)
        U, S, V = U[:, :rank], S[:rank], Vh[:rank].T
    else:  # randomized, as the authors do for every layer; oversampled by 10 (Halko et al.) for accuracy
        U, S, V = torch.svd_lowrank(Wc, q=min(rank + 10, min(Wc.shape)), niter=10)
        U, S, V = U[:, :rank], S[:rank], V[:, :rank]
    root = S.sqrt()
    return (U * root).to(W.dtype), (root[:, None] * V.T).to(W.dtype)


class ABBA(Adapter):
    """y = base(x) + s (dropout(x) (A1 ∗ A2)^T)(B1 •ᵣ B2)^T: a rank-r1 r2 product, no (out, in) matrix formed."""

    def __init__(self, base: nn.Module, config: ABBAConfig) -> None:
        super().__init__(base, config)
        W0 = self.base_weight()
        r1, r2 = config.rank, config.r2
        new = {"dtype": W0.dtype, "device": W0.device}
        self.A1 = nn.Parameter(torch.empty(r1, self.in_features, **new))
        self.B1 = nn.Parameter(torch.empty(self.out_features, r1, **new))
        self.A2 = nn.Parameter(torch.empty(r2, self.in_features, **new))
        self.B2 = nn.Parameter(torch.empty(self.out_features, r2, **new))
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        if initialising():  # loading fills every factor: no SVD of W0 then
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's mixed initialisation: (B1, A1) from W0's truncated SVD, B2 = 0, A2 Kaiming-uniform."""
        B1, A1 = truncated_svd_factors(self.base_weight(), self.config.rank)
        self.B1.copy_(B1)
        self.A1.copy_(A1)
        nn.init.kaiming_uniform_(self.A2)  # a = 0 as in the authors' code: bound sqrt(6 / in)
        nn.init.zeros_(self.B2)

    def delta_weight(self) -> Tensor:
        """ΔW = s (B1 A1) ⊙ (B2 A2), shape (out, in): the definition, computed densely."""
        return self.scale * (self.B1 @ self.A1) * (self.B2 @ self.A2)

    def effective_weight(self) -> Tensor:
        return self.base_weight() + self.delta_weight()  # (out, in)

    def lora_form(self) -> tuple[Tensor, Tensor, float]:
        """(A1 ∗ A2 (r1 r2, in), B1 •ᵣ B2 (out, r1 r2), s): ABBA is exactly a rank-r1 r2 LoRA."""
        return khatri_rao_columns(self.A1, self.A2), khatri_rao_rows(self.B1, self.B2), self.scale

    def adapted(self, x: Tensor) -> Tensor:
        x, lead = self.flatten(x)
        y = self.base(x)  # (tokens, out)
        h = x if self.dropout is None or not self.view.input_is_dense else self.dropout(x)
        A, B, _ = self.lora_form()  # (r1 r2, in), (out, r1 r2)
        y = accumulate_(y, self.view.project(h, A), B, self.scale)  # z: (tokens, r1 r2)
        return y.reshape(*lead, y.shape[-1])


@register("abba")
@dataclass(frozen=True)
class ABBAConfig(AdapterConfig):
    """ABBA's hyper-parameters, the authors' defaults (r1 = r2 = 8, s = alpha = 8, no dropout).

    Args:
        rank: r1, the rank of the first pair B1 A1 (initialised from W0's truncated SVD, so r1 <= min(out, in));
            `rank_pattern` changes it per layer.
        rank2: r2, the rank of the second pair B2 A2; None (default) means r2 = r1, the paper's choice.
        alpha: the scale numerator: s = alpha (the authors' code with alpha1 = alpha2 = alpha), or
            s = alpha / sqrt(r1 r2) with `rank_stable`.
        rank_stable: use the rsLoRA-style s = alpha / sqrt(r1 r2) (see the module docstring).
        dropout: dropout on the adapter's input (not on the base path).
    """

    rank: int = 8
    rank2: int | None = None
    alpha: float = 8.0
    rank_stable: bool = False
    dropout: float = 0.0

    adapter: ClassVar[type[Adapter]] = ABBA

    def __post_init__(self) -> None:
        super().__post_init__()
        r2 = self.rank2
        if r2 is not None and (isinstance(r2, bool) or not isinstance(r2, int) or r2 < 1):
            raise ValueError(f"abba: rank2 must be None or an integer >= 1, got {r2!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"abba: dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def r2(self) -> int:
        return self.rank if self.rank2 is None else self.rank2

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank * self.r2) if self.rank_stable else self.alpha

    def check_shape(self, in_features: int, out_features: int) -> None:
        """r1 <= min(out, in): the first pair is W0's truncated SVD, which has min(out, in) components."""
        if self.rank > min(in_features, out_features):
            raise ValueError(
                f"rank (r1) {self.rank} is above min(in, out) = {min(in_features, out_features)}: the first pair "
                "is initialised from W0's truncated SVD, which has only min(in, out) components"
            )

    def parameter_count(self, in_features: int, out_features: int) -> int:
        return (self.rank + self.r2) * (in_features + out_features)
