"""KronA: a Kronecker-product update beside the frozen weight (a Kronecker equivalent of LoRA).

    W' = W0 + ΔW,     ΔW = s (A ⊗ B),     A: (a_out, a_in),  B: (b_out, b_in),  a_out b_out = out,  a_in b_in = in

with a_out a_in + b_out b_in trainable parameters and rank(ΔW) = rank(A) rank(B) <= min(a_out, a_in) min(b_out, b_in):
with balanced factors (each side near the square root of its dimension) the update can be of full rank
min(out, in) for about 2 sqrt(out in) parameters, where LoRA at that budget reaches rank about 2 sqrt(out in) /
(out + in), i.e. 1 for a square layer.

The forward never forms A ⊗ B (Van Loan, "The ubiquitous Kronecker product", 2000): with x = vec(X) in row-major
order, X = x reshaped to (a_in, b_in),

    (A ⊗ B) x = vec(A X B^T)     (the column-major form of the same identity reads vec(B X' A^T), X' = X^T),

two small matmuls per token instead of one (out, in) GEMV.

Edalati, Tahaei, Kobyzev, Partovi Nia, Clark, Rezagholizadeh, "KronA: Parameter Efficient Tuning with Kronecker
Adapter", arXiv 2212.10650 (ENLSP workshop, NeurIPS 2023).

Where each detail was confirmed, and what could not be:
- The equation (a Kronecker product ΔW = A_k ⊗ B_k in parallel to W, scaled by s, "a Kronecker equivalent of
  LoRA") and the efficient Kronecker-vector product: the paper's abstract (arXiv v1 and the ENLSP 2023 version);
  the paper writes Y = X W with W of shape (in, out), so its factors are the transposes of ours.
- (†) The paper's method section (its exact factor shapes for T5, which factor starts at zero, its value of s)
  could not be read through the search tool. Our choices: factor shapes given by `a_out` / `a_in`, or, when left
  None, the divisor of each dimension nearest its square root (A takes the smaller, as PEFT's LoKr
  `factorization(dim, -1)`), which minimises the parameter count; initialisation as LoRA, A Kaiming-uniform
  (a = sqrt(5)) and B = 0, so W' = W0 at the start; s = `scale` = 1 by default.

PEFT has no KronA (its LoKr is a different parameterisation), so KronA saves in loraredux's native format only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core import Adapter, AdapterConfig, accumulate_, register

__all__ = ["KronA", "KronAConfig", "balanced_factor", "kron_matvec"]


def balanced_factor(dimension: int) -> int:
    """The largest divisor of `dimension` that is <= its square root (1 for a prime)."""
    return max(d for d in range(1, math.isqrt(dimension) + 1) if dimension % d == 0)


def kron_matvec(A: Tensor, B: Tensor, x: Tensor) -> Tensor:
    """Rows of x times (A ⊗ B)^T without forming A ⊗ B: (tokens, a_in b_in) -> (tokens, a_out b_out).

    Uses (A ⊗ B) vec(X) = vec(A X B^T) with X = x reshaped row-major to (a_in, b_in).
    """
    X = x.reshape(x.shape[0], A.shape[1], B.shape[1])  # (tokens, a_in, b_in)
    Y = torch.matmul(A, X @ B.T)  # (tokens, a_out, b_out)
    return Y.reshape(x.shape[0], -1)


class KronA(Adapter):
    """y = base(x) + s vec(A X B^T) with X = dropout(x) reshaped to (a_in, b_in); for an embedding, column `id`
    of A ⊗ B is gathered as A[:, id // b_in] ⊗ B[:, id % b_in]."""

    def __init__(self, base: nn.Module, config: KronAConfig) -> None:
        super().__init__(base, config)
        W0 = self.base_weight()
        (a_out, a_in), (b_out, b_in) = config.factor_shapes(self.in_features, self.out_features)
        self.A = nn.Parameter(torch.empty(a_out, a_in, dtype=W0.dtype, device=W0.device))
        self.B = nn.Parameter(torch.empty(b_out, b_in, dtype=W0.dtype, device=W0.device))
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A as LoRA's A (Kaiming-uniform, a = sqrt(5)), B = 0: ΔW = 0 at the start (see the module docstring)."""
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def delta_weight(self) -> Tensor:
        """ΔW = s (A ⊗ B), shape (out, in): the definition, computed densely."""
        return self.scale * torch.kron(self.A, self.B)

    def effective_weight(self) -> Tensor:
        return self.base_weight() + self.delta_weight()  # (out, in)

    def adapted(self, x: Tensor) -> Tensor:
        x, lead = self.flatten(x)
        y = self.base(x)  # (tokens, out)
        if self.view.input_is_dense:
            h = x if self.dropout is None else self.dropout(x)
            delta = kron_matvec(self.A, self.B, h.to(self.A.dtype))  # (tokens, out)
        else:
            b_in = self.B.shape[1]
            a, b = self.A.T[x // b_in], self.B.T[x % b_in]  # (tokens, a_out), (tokens, b_out)
            delta = (a[:, :, None] * b[:, None, :]).reshape(x.shape[0], -1)
        y = accumulate_(y, delta, scale=self.scale)
        return y.reshape(*lead, y.shape[-1])


@register("krona")
@dataclass(frozen=True)
class KronAConfig(AdapterConfig):
    """KronA's hyper-parameters.

    Args:
        a_out: rows of A (must divide the layer's out); None picks the divisor of out nearest sqrt(out).
        a_in: columns of A (must divide the layer's in); None picks the divisor of in nearest sqrt(in).
        scale: s, the update's scale factor.
        dropout: dropout on the adapter's input (not on the base path).
    """

    a_out: int | None = None
    a_in: int | None = None
    scale: float = 1.0
    dropout: float = 0.0

    adapter: ClassVar[type[Adapter]] = KronA

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("a_out", "a_in"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"krona: {name} must be None or an integer >= 1, got {value!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ValueError(f"krona: scale must be a number, got {self.scale!r}")
        if not math.isfinite(self.scale) or self.scale == 0:
            raise ValueError(f"krona: scale must be finite and non-zero, got {self.scale!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"krona: dropout must be in [0, 1), got {self.dropout!r}")

    def factor_shapes(
        self, in_features: int, out_features: int
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """((a_out, a_in), (b_out, b_in)) for an (out, in) layer; `check_shape` has verified they divide."""
        a_out = balanced_factor(out_features) if self.a_out is None else self.a_out
        a_in = balanced_factor(in_features) if self.a_in is None else self.a_in
        return (a_out, a_in), (out_features // a_out, in_features // a_in)

    def check_shape(self, in_features: int, out_features: int) -> None:
        """A ⊗ B must be (out, in): a_out divides out and a_in divides in."""
        for name, value, dim, side in (
            ("a_out", self.a_out, out_features, "out"),
            ("a_in", self.a_in, in_features, "in"),
        ):
            if value is not None and dim % value != 0:
                raise ValueError(
                    f"{name}={value} does not divide {side}={dim}: KronA needs A ⊗ B of shape (out, in), i.e. "
                    f"a_out * b_out = out and a_in * b_in = in (divisors of {dim}: "
                    f"{[d for d in range(1, dim + 1) if dim % d == 0]})"
                )

    def parameter_count(self, in_features: int, out_features: int) -> int:
        (a_out, a_in), (b_out, b_in) = self.factor_shapes(in_features, out_features)
        return a_out * a_in + b_out * b_in
