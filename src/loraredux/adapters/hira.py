"""HiRA: a low-rank matrix that modulates the frozen weight entry by entry (Hadamard product).

    W' = W0 + ΔW,     ΔW = W0 ⊙ (B A),     A: (r, in),  B: (out, r)

so rank(ΔW) <= rank(W0) * r (the rank of a Hadamard product is at most the product of the ranks), far above
LoRA's r at the same r (in + out) parameters. There is no scale factor.

Huang, Ko, Zhuang, Tang, Zhang, "HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large Language
Models", ICLR 2025, https://openreview.net/forum?id=TwJrTz9cRS (the paper writes ΔW = W0 ⊙ (A B) with its own factor
orientation; we use PEFT's).

Where each detail was confirmed:
- The equation, and the absence of a scale: PEFT 0.21 `peft/tuners/hira/layer.py` (`Linear.forward` adds
  `F.linear(dropout(x), W0 * (B @ A))`; `_merge` adds `W0 * delta`), and the authors' code
  (github.com/hqsiswiliam/hira, `hira/tuners/lora.py`: `W0 * (A^T B^T + 1)^T`, `scale_ab` stored but unused).
- Initialisation, PEFT's `init_weights=True`: A Kaiming-uniform with a = sqrt(5), B = 0, so W' = W0 at the start;
  `init="gaussian"` draws A ~ N(0, 1/r^2). For an `nn.Embedding` base PEFT swaps the roles (A = 0, B ~ N(0, 1)).
- Defaults, PEFT's `HiraConfig`: r = 32, `hira_dropout` = 0 (dropout acts on the adapter's input only).
- PEFT names: `peft_type` "HIRA"; tensors `hira_A` / `hira_B` (`hira_embedding_A` / `hira_embedding_B` for an
  embedding), no `.weight` suffix; Conv1D (GPT-2) is supported with the same (out, in) orientation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import Adapter, AdapterConfig, accumulate_, register
from .lora import peft_init_

__all__ = ["HiRA", "HiRAConfig"]

_INITS = ("kaiming", "gaussian")


class HiRA(Adapter):
    """y = base(x) + dropout(x) (W0 ⊙ (B A))^T.

    For dense inputs the (out, in) update W0 ⊙ (B A) is materialised once per call: the alternative,
    sum_k b_k ⊙ (W0 (a_k ⊙ x)), costs r GEMMs of the base's size, so the dense update is the cheapest way as soon
    as there is more than one token. For an embedding the update is gathered row by row, never densely.
    """

    def __init__(self, base: nn.Module, config: HiRAConfig) -> None:
        super().__init__(base, config)
        W0 = self.base_weight()
        r = config.rank
        self.A = nn.Parameter(torch.empty(r, self.in_features, dtype=W0.dtype, device=W0.device))
        self.B = nn.Parameter(torch.empty(self.out_features, r, dtype=W0.dtype, device=W0.device))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PEFT's default initialisation, LoRA's (see the module docstring)."""
        peft_init_(self.A, self.B, self.view.kind, self.config.init)

    def delta_weight(self) -> Tensor:
        """ΔW = W0 ⊙ (B A), shape (out, in)."""
        return self.base_weight() * (self.B @ self.A)

    def effective_weight(self) -> Tensor:
        return self.base_weight() + self.delta_weight()  # (out, in)

    def adapted(self, x: Tensor) -> Tensor:
        x, lead = self.flatten(x)
        y = self.base(x)  # (tokens, out)
        if self.view.input_is_dense:
            h = x if self.dropout is None else self.dropout(x)
            y = accumulate_(y, h, self.delta_weight())  # y += h dW^T, dW (out, in)
        else:
            # Row t of the update's table is W0^T[id] ⊙ (A^T[id] B^T): two gathers, no (out, in) matrix.
            rows = F.embedding(x, self.base_weight().T)  # (tokens, out)
            y = y + rows * (self.view.project(x, self.A) @ self.B.T)
        return y.reshape(*lead, y.shape[-1])

    # -- PEFT format: tensor names relative to the layer's path --------------------------------------
    def peft_tensors(self) -> dict[str, Tensor]:
        if self.view.kind == "embedding":
            return {"hira_embedding_A": self.A, "hira_embedding_B": self.B}
        return {"hira_A": self.A, "hira_B": self.B}


@register("hira")
@dataclass(frozen=True)
class HiRAConfig(AdapterConfig):
    """HiRA's hyper-parameters, PEFT's defaults (r = 32, no dropout).

    Args:
        rank: r, the rank of the modulating matrix B A (PEFT's `r`).
        dropout: dropout on the adapter's input (PEFT's `hira_dropout`).
        init: `"kaiming"` (PEFT's default, `init_weights=True`) or `"gaussian"` for A; B starts at zero.
    """

    rank: int = 32
    dropout: float = 0.0
    init: str = "kaiming"

    adapter: ClassVar[type[Adapter]] = HiRA
    peft_type: ClassVar[str | None] = "HIRA"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"hira: dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in _INITS:
            raise ValueError(f"hira: init must be one of {_INITS}, got {self.init!r}")

    def check_shape(self, in_features: int, out_features: int) -> None:
        """Any rank builds: B A of rank min(r, in, out) modulates W0 (PEFT puts no bound on r either).

        A rank above min(in, out) adds parameters but no expressivity (B A can then be any (out, in) matrix), and
        files from PEFT with its default r = 32 must load on layers narrower than 32.
        """

    def parameter_count(self, in_features: int, out_features: int) -> int:
        return self.rank * (in_features + out_features)

    # -- PEFT format ------------------------------------------------------------------------------
    def peft_fields(self) -> dict[str, Any]:
        """The `adapter_config.json` fields of PEFT's HiraConfig that this config sets."""
        return {
            "r": self.rank,
            "hira_dropout": self.dropout,
            "init_weights": True if self.init == "kaiming" else "gaussian",
        }

    @classmethod
    def from_peft_fields(cls, fields: dict[str, Any]) -> HiRAConfig:
        """Read PEFT's HiraConfig fields (`init_weights=False`, PEFT's debugging init, reads as the default)."""
        init = fields.get("init_weights", True)
        return cls(
            rank=int(fields.get("r", 32)),
            dropout=float(fields.get("hira_dropout", 0.0) or 0.0),
            init="gaussian" if init == "gaussian" else "kaiming",
        )
