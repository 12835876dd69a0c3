"""LoRA-XS: a trainable r x r core between the frozen top-r singular factors of the pre-trained weight.

    W' = W0 + s * U_r R Σ_r V_r^T,     W0 = U Σ V^T (thin SVD, (out, in)),  R: (r, r) trained,  s = alpha / r

Bałazy, Banaei, Aberer, Tabor, "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters",
arXiv 2405.17604 (ECAI 2025). Only R is trained, so a layer holds r^2 parameters whatever its width.

In the row-vector convention of the authors' code (h = x W, the SVD taken of W in (in, out) orientation) the frozen
factors are A = U_r Σ_r and B = V_r^T of that W, and the update is A R B. Written for PyTorch's (out, in) weight
this is the equation above: the frozen "down" factor carries the singular values (`A = Σ_r V_r^T`, shape (r, in))
and the frozen "up" factor is the bare left singular vectors (`B = U_r`, shape (out, r)), so W' = W0 + s B R A.

Confirmed in the authors' code (github.com/MohammadrezaBanaei/LoRA-XS, `utils/initialization_utils.py` and
`utils/latent_utils.py`): the SVD is taken of the pre-trained weight in (in, out) orientation, `u @ diag(s)` truncated
to r columns becomes PEFT's frozen `lora_A` (so Σ sits on the input side), `vh[:r]` becomes the frozen `lora_B`, and
the trainable `default_lora_latent_mapping` (an r x r `nn.Linear` without bias) sits between them, initialised
N(0, sigma^2) with sigma = 1e-5 (`init_module_weights(..., sigma=0.00001)`). The update is scaled by PEFT's
`lora_alpha / r` (`main_glue.py`: alpha 16; `main_math_tuning.py`, `main_commonsense_tuning.py`: alpha = r, scale
1). So W' is W0 only up to that tiny Gaussian core: `identity_at_init` is False (`init_std=0` gives W0 exactly).

The frozen factors are persistent buffers in the base weight's dtype: singular vectors are unique only up to sign
(and rotation within repeated singular values), so a saved adapter must carry them to be restored exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core import Adapter, AdapterConfig, accumulate_, initialising, register

__all__ = ["LoRAXS", "LoRAXSConfig", "top_singular_factors"]


@torch.no_grad()
def top_singular_factors(W0: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The frozen LoRA-XS factors of W0: (A, B) = (Σ_r V_r^T, U_r), in W0's dtype and device.

    Args:
        W0: (out, in) pre-trained weight.
        rank: r <= min(out, in).

    Returns:
        A (r, in) = the top-r right singular vectors scaled by their singular values; B (out, r) = the top-r left
        singular vectors. B A is the best rank-r approximation of W0.
    """
    # torch.linalg.svd has no half-precision kernels; float32 (or float64 if given) is exact enough.
    work = W0.detach().to(torch.float64 if W0.dtype == torch.float64 else torch.float32)
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)  # (out, k), (k,), (k, in)
    A = S[:rank, None] * Vh[:rank]  # (r, in)
    B = U[:, :rank]  # (out, r)
    return A.to(W0.dtype).contiguous(), B.to(W0.dtype).contiguous()


class LoRAXS(Adapter):
    """y = base(x) + s * ((dropout(x) A^T) R^T) B^T with frozen A = Σ_r V_r^T, B = U_r and trained R (r, r)."""

    def __init__(self, base: nn.Module, config: LoRAXSConfig) -> None:
        super().__init__(base, config)
        W0 = self.base_weight()
        r, like = config.rank, {"dtype": W0.dtype, "device": W0.device}
        if initialising():
            A, B = top_singular_factors(W0, r)
        else:  # loading: the file holds the factors, so no SVD
            A, B = (
                torch.empty(r, self.in_features, **like),
                torch.empty(self.out_features, r, **like),
            )
        self.register_buffer("A", A)  # (r, in), frozen
        self.register_buffer("B", B)  # (out, r), frozen
        self.R = nn.Parameter(torch.empty(r, r, **like))
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        if initialising():
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """R ~ N(0, init_std^2), the authors' initialisation (sigma = 1e-5 by default)."""
        if self.config.init_std == 0:
            nn.init.zeros_(self.R)
        else:
            nn.init.normal_(self.R, std=self.config.init_std)

    def effective_weight(self) -> Tensor:
        return self.base_weight() + self.scale * (self.B @ self.R @ self.A)  # (out, in)

    def lora_form(self) -> tuple[Tensor, Tensor, float]:
        """(R A, B, s): W' = W0 + s B (R A), a rank-r LoRA for serving, merging and export."""
        return self.R @ self.A, self.B, self.scale

    def adapted(self, x: Tensor) -> Tensor:
        x, lead = self.flatten(x)
        y = self.base(x)  # (tokens, out)
        h = x if self.dropout is None or not self.view.input_is_dense else self.dropout(x)
        z = self.view.project(h, self.A) @ self.R.T  # (tokens, r)
        y = accumulate_(y, z, self.B, self.scale)
        return y.reshape(*lead, y.shape[-1])


@register("lora_xs")
@dataclass(frozen=True)
class LoRAXSConfig(AdapterConfig):
    """LoRA-XS's hyper-parameters (defaults: r = 8, alpha = 8 so s = 1, the authors' sigma = 1e-5).

    Args:
        rank: r, the number of singular triplets of W0 kept (r <= min(in, out)); the layer trains r^2 numbers.
        alpha: the scale numerator, s = alpha / r (the authors use alpha = r for instruction tuning, 16 on GLUE).
        dropout: dropout on the adapter's input (not on the base path).
        init_std: the standard deviation of R's Gaussian initialisation (0 gives R = 0, so W' = W0 exactly).
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    init_std: float = 1e-5

    adapter: ClassVar[type[Adapter]] = LoRAXS
    identity_at_init: ClassVar[bool] = False  # R starts at N(0, 1e-10), not at zero

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora_xs: dropout must be in [0, 1), got {self.dropout!r}")
        if (
            isinstance(self.init_std, bool)
            or not isinstance(self.init_std, (int, float))
            or not math.isfinite(self.init_std)
            or self.init_std < 0
        ):
            raise ValueError(
                f"lora_xs: init_std must be a finite number >= 0, got {self.init_std!r}"
            )

    def check_shape(self, in_features: int, out_features: int) -> None:
        k = min(in_features, out_features)
        if self.rank > k:
            raise ValueError(
                f"rank {self.rank} needs r <= min(in, out) = {k}: W0 has only {k} singular triplets "
                "to build the frozen factors from"
            )

    def parameter_count(self, in_features: int, out_features: int) -> int:
        return self.rank**2

    @property
    def scale(self) -> float:
        return self.alpha / self.rank
