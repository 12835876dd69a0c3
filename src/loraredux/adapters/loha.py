"""LoHa: a low-rank Hadamard product update beside a frozen weight.

    W' = W0 + s * (W1a W1b) ⊙ (W2a W2b),   W1a, W2a: (out, r),  W1b, W2b: (r, in),  s = alpha / r

FedPara's parameterisation (Hyeon-Woo, Ye-Bin, Oh, "FedPara: Low-Rank Hadamard Product for Communication-Efficient
Federated Learning", ICLR 2022, arXiv 2108.06098, method section: W = (X1 Y1^T) ⊙ (X2 Y2^T), X_i (m, r_i),
Y_i (n, r_i), with rank(W) <= r1 r2), used as an additive update as LyCORIS and PEFT do
(`peft/tuners/loha/layer.py`): W1a = X1, W1b = Y1^T, W2a = X2, W2b = Y2^T. The bound follows from
rank(P ⊙ Q) <= rank(P) rank(Q): rank(dW) <= r^2 with 2 r (in + out) parameters, so at LoRA's budget R (in + out),
LoHa's r = R / 2 reaches rank R^2 / 4, above R once R > 4 (`test_loha.py` measures it). The formula and bound were
read from the paper's text (abstract and method summary), the names, shapes, init and scale from PEFT 0.21.2.

Initialisation and defaults as PEFT's `LoHaConfig` (`init_weights=True`, r = 8, alpha = 8, `peft/tuners/loha/`):
W1a, W1b, W2a Kaiming-uniform with a = sqrt(5) (nn.Linear's default), W2b = 0, so W' = W0 at the start.
PEFT multiplies by s as `torch.tensor(alpha / r)`, a float32 number; here s stays the exact alpha / r, so the two
differ by that rounding (relative < 6e-8) where alpha / r is not a float32 number, and agree otherwise.

Fast path. The face-splitting (row-wise Kronecker, •) and Khatri-Rao (column-wise Kronecker, ∗) products satisfy
the mixed-product identity (P • Q)(R ∗ T) = (P R) ⊙ (Q T) (Slyusar, 1999), so

    (W1a W1b) ⊙ (W2a W2b) = (W1a • W2a)(W1b ∗ W2b) = B A,   B: (out, r^2),  A: (r^2, in)

exactly: LoHa is a rank-r^2 LoRA whose factors are built from 2 r (in + out) numbers (`lora_form` gives them).
`adapted(x)` runs that LoRA form, x A^T B^T, unless materialising the dense (out, in) update is cheaper; the choice
is `factorised_is_cheaper`, a count of multiply-adds per call (r^2 (in + out) (tokens + 1) against
in out (2 r + 1 + tokens)): for r^2 well below in out / (in + out), as in every usual setting (r = 8 on a 4096 x 4096
layer: 64 against 2048), the factorised form wins at any token count.

Dropouts as PEFT's LoHa in training (`rank_dropout`, `module_dropout`, `lycoris_dropout`): module dropout skips the
whole update with probability p, and "rank" dropout (PEFT's name) zeroes each output row of dW with probability p
and scales the kept rows by 1 / (fraction kept). The draws follow PEFT's order and generator (one uniform for the
module, then one per output row, on the CPU), so under one seed both libraries drop the same rows.

Base layers: nn.Linear (as PEFT), transformers' Conv1D and nn.Embedding. PEFT's LoHa adapts neither of the last
two, so adapters on them save in loraredux's own format (`peft_base_kinds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core import Adapter, AdapterConfig, accumulate_, register

__all__ = ["LoHa", "LoHaConfig", "face_split_factors", "factorised_is_cheaper", "lycoris_dropout"]

_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def face_split_factors(
    w1_a: Tensor, w1_b: Tensor, w2_a: Tensor, w2_b: Tensor
) -> tuple[Tensor, Tensor]:
    """(A, B) with B @ A == (w1_a @ w1_b) * (w2_a @ w2_b) exactly.

    Args:
        w1_a: (out, r1); w1_b: (r1, in); w2_a: (out, r2); w2_b: (r2, in).

    Returns:
        A (r1 r2, in), the Khatri-Rao product of w1_b and w2_b (row (i, j) = w1_b[i] * w2_b[j]), and
        B (out, r1 r2), the face-splitting product of w1_a and w2_a (column (i, j) = w1_a[:, i] * w2_a[:, j]).
    """
    A = (w1_b[:, None, :] * w2_b[None, :, :]).reshape(-1, w1_b.shape[1])  # (r1 r2, in)
    B = (w1_a[:, :, None] * w2_a[:, None, :]).reshape(w1_a.shape[0], -1)  # (out, r1 r2)
    return A, B


def factorised_is_cheaper(
    rows: int, in_features: int, out_features: int, rank: int, dense_input: bool = True
) -> bool:
    """Whether y += s x A^T B^T (rank r^2) costs fewer multiply-adds than y += s x dW^T with dense dW.

    Factorised: building A and B, r^2 (in + out), then r^2 (in + out) per row. Dense: the two rank-r products
    and their Hadamard product, in out (2 r + 1), then in out per row. A lookup input (an embedding's token ids)
    costs a gather instead of the first product: r^2 resp. out per row.
    """
    r2, n_in, n_out = rank * rank, in_features, out_features
    per_row_in = n_in if dense_input else 1
    factorised = r2 * (n_in + n_out) + rows * r2 * (per_row_in + n_out)
    dense = n_in * n_out * (2 * rank + 1) + rows * n_out * per_row_in
    return factorised <= dense


def lycoris_dropout(
    out_features: int, module_dropout: float, rank_dropout: float, rescale: bool, like: Tensor
) -> tuple[bool, Tensor | None]:
    """PEFT's training-time dropouts of a LyCORIS update (LoHa, LoKr), drawn as PEFT draws them.

    Returns:
        (skip, keep): skip is True when module dropout drops the whole update this step (a CPU uniform at or
        below `module_dropout`); keep (out,) in `like`'s dtype and device is the row mask of "rank" dropout
        (1 where a CPU uniform is above `rank_dropout`), scaled by 1 / mean(keep) when `rescale`, or None when
        `rank_dropout` is 0. A mask that keeps no row is all zeros (PEFT would divide 0 by 0).
    """
    if not bool(torch.rand(1) > module_dropout):
        return True, None
    if rank_dropout == 0:
        return False, None
    keep = (torch.rand(out_features) > rank_dropout).to(like.dtype)
    if rescale and bool(keep.any()):
        keep /= keep.mean()
    return False, keep.to(like.device)


class LoHa(Adapter):
    """y = base(x) + s * x (W1b ∗ W2b)^T (W1a • W2a)^T: a rank-r^2 LoRA form built from the four factors."""

    def __init__(self, base: nn.Module, config: LoHaConfig) -> None:
        super().__init__(base, config)
        W0 = self.base_weight()
        r, n_in, n_out = config.rank, self.in_features, self.out_features
        like = {"dtype": W0.dtype, "device": W0.device}
        self.hada_w1_a = nn.Parameter(torch.empty(n_out, r, **like))
        self.hada_w1_b = nn.Parameter(torch.empty(r, n_in, **like))
        self.hada_w2_a = nn.Parameter(torch.empty(n_out, r, **like))
        self.hada_w2_b = nn.Parameter(torch.empty(r, n_in, **like))
        self.scale = config.scale
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PEFT's default initialisation (see the module docstring)."""
        for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        nn.init.zeros_(self.hada_w2_b)

    def hadamard(self) -> Tensor:
        """(W1a W1b) ⊙ (W2a W2b), the unscaled update (out, in)."""
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)

    def effective_weight(self) -> Tensor:
        return self.base_weight() + self.scale * self.hadamard()  # (out, in)

    def lora_form(self) -> tuple[Tensor, Tensor, float]:
        A, B = face_split_factors(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)
        return A, B, self.scale

    def adapted(self, x: Tensor) -> Tensor:
        x, lead = self.flatten(x)
        y = self.base(x)  # (rows, out)
        keep = None
        cfg = self.config
        if self.training and (cfg.module_dropout > 0 or cfg.rank_dropout > 0):
            skip, keep = lycoris_dropout(
                self.out_features, cfg.module_dropout, cfg.rank_dropout, True, self.hada_w1_a
            )
            if skip:
                return y.reshape(*lead, y.shape[-1])
        dense = self.view.input_is_dense
        if factorised_is_cheaper(x.shape[0], self.in_features, self.out_features, cfg.rank, dense):
            A, B = self.lora_form()[:2]
            B = B if keep is None else B * keep[:, None]  # dropping row o of dW drops row o of B
            y = accumulate_(y, self.view.project(x, A), B, self.scale)  # z: (rows, r^2)
        else:
            dW = self.hadamard()
            dW = dW if keep is None else dW * keep[:, None]
            y = accumulate_(y, self.view.project(x, dW), scale=self.scale)  # (rows, out)
        return y.reshape(*lead, y.shape[-1])

    # -- PEFT format: tensor names relative to the layer's path --------------------------------------
    def peft_tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in _NAMES}


def _check_probability(method: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{method}: {name} must be a number in [0, 1), got {value!r}")


@register("loha")
@dataclass(frozen=True)
class LoHaConfig(AdapterConfig):
    """LoHa's hyper-parameters, PEFT's names and defaults (r = 8, alpha = 8, no dropout).

    Args:
        rank: r, the inner size of each of the two factor pairs; rank(dW) <= r^2. Any r >= 1 builds (as in
            PEFT): r^2 above min(in, out) is usual for LoHa.
        alpha: the scale numerator, s = alpha / r.
        rank_dropout: in training, the probability of zeroing each output row of dW (PEFT's "rank" dropout),
            with the kept rows scaled by 1 / (fraction kept).
        module_dropout: in training, the probability of skipping the whole update for a forward pass.
    """

    rank: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0

    adapter: ClassVar[type[Adapter]] = LoHa
    peft_type: ClassVar[str | None] = "LOHA"
    #: PEFT's LoHa adapts nn.Linear (and convolutions, which loraredux does not adapt), not Conv1D or Embedding.
    peft_base_kinds: ClassVar[tuple[str, ...]] = ("linear",)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_probability(self.method, "rank_dropout", self.rank_dropout)
        _check_probability(self.method, "module_dropout", self.module_dropout)

    def check_shape(self, in_features: int, out_features: int) -> None:
        """Every (out, in) builds: the factors are (out, r) and (r, in) for any r (PEFT sets no bound either)."""

    def parameter_count(self, in_features: int, out_features: int) -> int:
        return 2 * self.rank * (in_features + out_features)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    # -- PEFT format ------------------------------------------------------------------------------
    def peft_fields(self) -> dict[str, Any]:
        """The `adapter_config.json` fields of PEFT's LoHaConfig that this config sets."""
        return {
            "r": self.rank,
            "alpha": self.alpha,
            "rank_dropout": self.rank_dropout,
            "module_dropout": self.module_dropout,
            "init_weights": True,
            "use_effective_conv2d": False,
        }

    @classmethod
    def from_peft_fields(cls, fields: dict[str, Any]) -> LoHaConfig:
        """Read PEFT's LoHaConfig fields.

        `init_weights` only chooses the starting values (the file's weights replace them) and
        `use_effective_conv2d` only concerns convolutions, so neither changes what a linear layer computes.
        """
        return cls(
            rank=int(fields.get("r", 8)),
            alpha=float(fields.get("alpha", 8)),
            rank_dropout=float(fields.get("rank_dropout", 0.0) or 0.0),
            module_dropout=float(fields.get("module_dropout", 0.0) or 0.0),
        )
