"""DoRA: LoRA on the direction of each output's weight vector, with the magnitude learned apart.

    W' = m ⊙ (W0 + s B A) / ||W0 + s B A||_c        m: (out,),  A: (r, in),  B: (out, r),  s as in LoRA

Liu, Wang, Yin, Molchanov, Wang, Cheng, Chen, "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024,
arXiv 2402.09353, Eq. (5). `||·||_c` is the norm of each output's weight vector: the paper writes W as (in, out)
and takes column norms; in PyTorch's (out, in) layout these are row norms, as in PEFT's `get_weight_norm`.

- **Magnitude at init** (PEFT's convention): m = ||W0 + s B A||_c, which is ||W0||_c since B A = 0 at init; so
  W' = W0 at the start (the contract suite checks it).
- **The norm is a constant in backward** (§4.3: "we suggest treating ||V + ΔV||_c in Eq. (5) as a constant,
  thereby detaching it from the gradient graph"): gradients reach m, A and B through the numerator only. This
  saves the backward of the norm, and it is what PEFT computes.
- **Fast path.** With c = m / ||W0 + s B A||_c (out,), y = c ⊙ (x W0^T + s (x A^T) B^T) + b. The norm is
  computed without autograd from one (out, in) GEMM; the low-rank product is accumulated in place into the base
  layer's own output x W0^T + b (as in LoRA), and one fused multiply-add applies c and moves the bias back:
  c ⊙ (x W0^T + b + s (x A^T) B^T) + (1 - c) ⊙ b. PEFT instead runs the base layer, subtracts its bias, and forms
  (c - 1) ⊙ base + c ⊙ s B A x in separate passes.
- **Inference cache.** Outside training and autograd (eval mode under `torch.no_grad`), the norm depends only on
  W0, A and B; it is cached and reused until one of them changes (tracked by the tensors' identity and in-place
  version counters; PEFT's equivalent cache is off by default, which its docs say costs +139% at inference).
  Writing through `.data` bypasses version counters: call `clear_cache()` after such a write. On a quantized base
  the view dequantizes W0 for the norm: once per cache miss at inference, every step in training (as PEFT's QDoRA).
- **Dropout**: as PEFT, with dropout active the magnitude correction uses the dropped input too:
  y = base(x) + (c - 1) ⊙ (x_d W0^T) + c ⊙ s (x_d A^T) B^T, with x_d = dropout(x).

PEFT writes DoRA as a LoRA adapter with `use_dora: true` and one more tensor per layer, `lora_magnitude_vector`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core import Adapter, accumulate_, register
from .lora import LoRA, LoRAConfig

__all__ = ["DoRA", "DoRAConfig", "weight_norm"]


def weight_norm(W0: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """||W0 + s B A||_c: the norm of each output's row of the adapted weight, (out,).

    Args:
        W0: (out, in) base weight.
        A: (r, in).
        B: (out, r).
        scale: s.
    """
    return torch.linalg.vector_norm(torch.addmm(W0, B, A, alpha=scale), dim=1)  # (out,)


class DoRA(LoRA):
    """W' = m ⊙ (W0 + s B A) / ||W0 + s B A||_c, the norm detached (see the module docstring)."""

    def __init__(self, base: nn.Module, config: DoRAConfig) -> None:
        super().__init__(base, config)
        self._cache: tuple[tuple[Any, ...], Tensor] | None = None
        with torch.no_grad():
            m = weight_norm(self.base_weight(), self.A, self.B, self.scale)
        self.magnitude = nn.Parameter(m)  # (out,)

    # -- the norm, cached for inference --------------------------------------------------------------
    def clear_cache(self) -> None:
        """Forget the cached norm (needed only after writing A, B or W0 through `.data`)."""
        self._cache = None

    def train(self, mode: bool = True) -> DoRA:
        self._cache = None
        return super().train(mode)

    def _cache_key(self) -> tuple[Any, ...]:
        # The stored base parameter, not base_weight(): a quantized base's view dequantizes a fresh tensor on
        # every call (whose id and address a later one may reuse), and a transposed view makes a new view tensor.
        W0 = self.base.weight
        return tuple(
            (id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in (W0, self.A, self.B)
        )

    def norm(self) -> Tensor:
        """||W0 + s B A||_c (out,), without gradient; cached for inference (eval mode, no autograd)."""
        cacheable = not self.training and not torch.is_grad_enabled()
        key = self._cache_key() if cacheable else None
        if key is not None and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        with torch.no_grad():
            norm = weight_norm(self.base_weight(), self.A, self.B, self.scale)
        self._cache = (key, norm) if key is not None else None
        return norm

    # -- the spec and the fast path -------------------------------------------------------------------
    def effective_weight(self) -> Tensor:
        direction = self.base_weight() + self.scale * (self.B @ self.A)  # (out, in)
        return (self.magnitude / self.norm())[:, None] * direction

    def lora_form(self) -> tuple[Tensor, Tensor, float]:
        raise NotImplementedError("DoRA rescales every output row: W' is not W0 + s B A")

    def adapted(self, x: Tensor) -> Tensor:
        x, lead = self.flatten(x)
        c = self.magnitude / self.norm()  # (out,), the gradient reaches m only
        y = self.base(x)  # (tokens, out) = x W0^T + b, a fresh tensor
        if self.dropout is not None and self.training and self.view.input_is_dense:
            # PEFT's form under dropout: y + (c - 1) (x_d W0^T) + c s (x_d A^T) B^T, x_d = dropout(x).
            h = self.dropout(x)
            base_d = self.view.project(h, self.base_weight())  # (tokens, out)
            d = torch.addmm(base_d, self.view.project(h, self.A), self.B.T, alpha=self.scale)
            return (y + c * d - base_d).reshape(*lead, y.shape[-1])
        y = accumulate_(y, self.view.project(x, self.A), self.B, self.scale)  # in place, as in LoRA
        # c ⊙ (x W0^T + b + s z B^T) + (1 - c) b = c ⊙ (x W0^T + s z B^T) + b: one fused pass over (tokens, out).
        b = self.view.bias
        y = y * c if b is None else torch.addcmul(b - c * b, y, c)
        return y.reshape(*lead, y.shape[-1])

    # -- PEFT format ------------------------------------------------------------------------------------
    def peft_tensors(self) -> dict[str, Tensor]:
        return {**super().peft_tensors(), "lora_magnitude_vector": self.magnitude}


@register("dora")
@dataclass(frozen=True)
class DoRAConfig(LoRAConfig):
    """DoRA's hyper-parameters: LoRA's (PEFT's defaults r = 8, alpha = 8, no dropout); the magnitude has none.

    Args:
        rank: r, the rank of B A.
        alpha: the scale numerator: s = alpha / r, or alpha / sqrt(r) with `rslora`.
        dropout: dropout on the adapter's input (see the module docstring for how it enters the magnitude term).
        rslora: use the rank-stabilised scale alpha / sqrt(r).
        init: `"kaiming"` (PEFT's default) or `"gaussian"` for A; B starts at zero.
    """

    adapter: ClassVar[type[Adapter]] = DoRA

    def parameter_count(self, in_features: int, out_features: int) -> int:
        return self.rank * (in_features + out_features) + out_features

    def peft_fields(self) -> dict[str, Any]:
        return {**super().peft_fields(), "use_dora": True}

    @classmethod
    def from_peft_fields(cls, fields: dict[str, Any]) -> DoRAConfig:
        """Read a PEFT LoRA config with `use_dora: true`; every other LoRA variant field is refused as for LoRA."""
        if fields.get("use_dora") is not True:
            raise ValueError(f"not a DoRA adapter (use_dora={fields.get('use_dora')!r})")
        lora = LoRAConfig.from_peft_fields({**fields, "use_dora": False})
        return cls(**{f.name: getattr(lora, f.name) for f in dataclasses.fields(lora)})
