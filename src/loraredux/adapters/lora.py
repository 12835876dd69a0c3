"""LoRA: a trainable low-rank update beside a frozen weight.

    W' = W0 + s * B A,     A: (r, in),  B: (out, r),  s = alpha / r   (rsLoRA: s = alpha / sqrt(r))

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685.
rsLoRA scaling: Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", arXiv 2312.03732.

Initialisation as in PEFT (`init_lora_weights=True`): A Kaiming-uniform with a = sqrt(5) (nn.Linear's default),
B = 0, so W' = W0 at the start; `init="gaussian"` draws A ~ N(0, 1/r^2) instead. For an `nn.Embedding` base PEFT
swaps the roles (A = 0, B ~ N(0, 1)); we do the same so the two libraries start alike.

Any initialiser of `lx.init` can be chosen by name (`init="pissa"`, options in `init_options`). One that moves the
base (PiSSA, MiLoRA, OLoRA, LoRA-GA, CorDA, LoftQ) makes the frozen base W_res and keeps the initial factors as
buffers A0, B0, so the original weight is known: W0 = W_res + s B0 A0 (exact inits), or is kept (LoftQ, whose
quantisation error is not low rank). Then:
- `lx.disabled` computes the original model (W_res + s B0 A0), not the residual one;
- `lx.unadapt_` restores W0 in the base layer;
- in PEFT's format the adapter is written as a plain LoRA of rank 2r on the original base (PEFT's
  `path_initial_model_for_weight_conversion`): W_res + s B A = W0 + s [B, -B0] [A; A0], exact up to rounding;
- loraredux's own format stores A0, B0 and moves the base again on loading.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core import Adapter, AdapterConfig, accumulate_, register
from .factor_init import FactorInit, check_init_fields

__all__ = ["LoRA", "LoRAConfig", "peft_init_"]


@torch.no_grad()
def peft_init_(A: Tensor, B: Tensor, kind: str, init: str) -> None:
    """PEFT's initialisation of a factor pair, in place: A Kaiming-uniform with a = sqrt(5) (`init="kaiming"`) or
    N(0, 1/r^2) (`"gaussian"`) and B = 0, so B A = 0; for an embedding base (`kind="embedding"`) A = 0 and
    B ~ N(0, 1), as PEFT swaps the roles there.

    Args:
        A: (r, in).
        B: (out, r).
        kind: the base view's kind (`BaseView.kind`).
        init: "kaiming" or "gaussian".
    """
    if kind == "embedding":
        nn.init.zeros_(A)
        nn.init.normal_(B)
        return
    if init == "gaussian":
        nn.init.normal_(A, std=1.0 / A.shape[0])
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.zeros_(B)


class LoRA(FactorInit):
    """y = base(x) + s * (dropout(x) A^T) B^T, computed with one fused multiply-add for the second product."""

    def __init__(self, base: nn.Module, config: LoRAConfig) -> None:
        super().__init__(base, config)
        W0 = self.base_weight()
        r = config.rank
        self.A = nn.Parameter(torch.empty(r, self.in_features, dtype=W0.dtype, device=W0.device))
        self.B = nn.Parameter(torch.empty(self.out_features, r, dtype=W0.dtype, device=W0.device))
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.setup_init(r)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise A and B by the config's `init` (PEFT's own draws for "kaiming" / "gaussian", see the module
        docstring; `lx.init` for the others)."""
        if self.config.init in ("kaiming", "gaussian"):  # cheap, and PEFT's exact draws
            peft_init_(self.A, self.B, self.view.kind, self.config.init)
        else:
            self.init_factors_(self.config.rank)

    @torch.no_grad()
    def set_lora_form_(self, A: Tensor, B: Tensor) -> None:
        self.A.copy_(A)
        self.B.copy_(B)

    # -- the spec and the fast path --------------------------------------------------------------------
    def effective_weight(self) -> Tensor:
        return self.base_weight() + self.scale * (self.B @ self.A)  # (out, in)

    def lora_form(self) -> tuple[Tensor, Tensor, float]:
        return self.A, self.B, self.scale

    def factor_pair(self) -> tuple[nn.Parameter, nn.Parameter]:
        """The trainable (A, B) pair, for optimizers that treat the two factors together (`lx.optim`)."""
        return self.A, self.B

    def adapted(self, x: Tensor) -> Tensor:
        x, lead = self.flatten(x)  # the base and x A^T share one (tokens, in) input
        y = self.base(x)  # (tokens, out), fresh
        h = x if self.dropout is None or not self.view.input_is_dense else self.dropout(x)
        y = accumulate_(y, self.view.project(h, self.A), self.B, self.scale)  # y += s (h A^T) B^T
        return y.reshape(*lead, y.shape[-1])

    # -- PEFT format: tensor names relative to the layer's path --------------------------------------
    def peft_tensors(self) -> dict[str, Tensor]:
        if self.view.kind == "embedding":
            return {"lora_embedding_A": self.A, "lora_embedding_B": self.B}
        return {"lora_A.weight": self.A, "lora_B.weight": self.B}

    def converts_moved_base(self) -> bool:
        # On a quantized base the moved base is q(W_res), not W0 - s B0 A0: its quantization error is not low
        # rank, so no plain LoRA on the original codes reproduces it (loraredux's own format moves it again).
        exact = self.initialiser is not None and self.initialiser.exact
        return exact and not self.view.quantized

    def peft_export(self, convert: bool = True) -> tuple[AdapterConfig, dict[str, Tensor]]:
        """The config and tensors to write in PEFT's format.

        After a base-moving init, `convert` writes the plain LoRA of rank 2r that gives the same W' on the
        original base: A' = [A; A0], B' = [B, -B0], alpha doubled (times sqrt(2) with rsLoRA) so s is unchanged.
        Without `convert`, the factors are written as they are: they are right only on the moved base.

        Raises:
            ValueError: `convert` after an init whose move is not exact (LoftQ).
        """
        cfg = self.config
        tensors = self.peft_tensors()
        if not self._moved or not convert:
            # the init has done its work: what PEFT reads is the trained pair (gaussian is its own name too)
            init = cfg.init if cfg.init == "gaussian" else "kaiming"
            return dataclasses.replace(cfg, init=init, init_options={}), tensors
        if not self.converts_moved_base():
            raise ValueError(
                f"init {cfg.init!r} moved the base by more than a low-rank term, so no plain LoRA on the "
                "original base reproduces it: save with format='native' (loraredux recomputes the base when "
                "loading) or convert_to_lora=False (the factors for the moved base)"
            )
        factor = math.sqrt(2.0) if cfg.rslora else 2.0
        converted = dataclasses.replace(
            cfg, rank=2 * cfg.rank, alpha=cfg.alpha * factor, init="kaiming", init_options={}
        )
        (name_a, A), (name_b, B) = list(tensors.items())[:2]
        out = {**tensors}
        out[name_a] = torch.cat([A, self.A0], dim=0).detach()  # (2r, in)
        out[name_b] = torch.cat([B, -self.B0], dim=1).detach()  # (out, 2r)
        return converted, out


@register("lora")
@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """LoRA's hyper-parameters, PEFT's defaults (r = 8, alpha = 8, no dropout).

    Args:
        rank: r, the rank of B A.
        alpha: the scale numerator: s = alpha / r, or alpha / sqrt(r) with `rslora`.
        dropout: dropout on the adapter's input (not on the base path).
        rslora: use the rank-stabilised scale alpha / sqrt(r).
        init: the initialiser (`lx.init.available()`): `"kaiming"` (PEFT's default: A Kaiming-uniform, B = 0),
            `"gaussian"`, `"orthogonal"`, `"pissa"`, `"milora"`, `"olora"`, the data-aware ones (which need
            `lx.adapt_(..., calibration=...)`), ...
        init_options: the initialiser's options, e.g. `{"niter": 4}` for PiSSA's randomized SVD.
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    init_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    adapter: ClassVar[type[Adapter]] = LoRA
    peft_type: ClassVar[str | None] = "LORA"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora: dropout must be in [0, 1), got {self.dropout!r}")
        if self.init is None:
            raise ValueError(f"{self.method}: init must be a name (default 'kaiming'), got None")
        check_init_fields(self.method, self.init, self.init_options)

    def parameter_count(self, in_features: int, out_features: int) -> int:
        return self.rank * (in_features + out_features)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    # -- PEFT format ------------------------------------------------------------------------------
    def peft_fields(self) -> dict[str, Any]:
        """The `adapter_config.json` fields of PEFT's LoraConfig that this config sets."""
        return {
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.rslora,
            "init_lora_weights": True if self.init == "kaiming" else "gaussian",
            "bias": "none",
            "use_dora": False,
        }

    @classmethod
    def from_peft_fields(cls, fields: dict[str, Any]) -> LoRAConfig:
        """Read PEFT's LoraConfig fields; refuse the ones whose meaning we would silently drop."""
        # Fields of PEFT's LoRA variants: each changes what the layer computes, so reading the file while
        # ignoring it would give other outputs than PEFT. Init-only fields (loftq_config, eva_config, ...) are
        # harmless once the weights are trained, and are read as plain LoRA.
        neutral: dict[str, Any] = {
            "use_dora": False,
            "bias": "none",
            "lora_bias": False,
            "use_qalora": False,
            "use_bdlora": None,
            "alora_invocation_tokens": None,
            "kasa_config": None,
            "arrow_config": None,
            "monteclora_config": None,
            "velora_config": None,
            "megatron_config": None,
        }
        for key, value in neutral.items():
            if fields.get(key, value) not in (value, None, False):
                raise ValueError(
                    f"PEFT adapter has {key}={fields[key]!r}, a LoRA variant that loraredux's lora does not "
                    f"compute; expected {value!r}"
                )
        init = fields.get("init_lora_weights", True)
        return cls(
            rank=int(fields.get("r", 8)),
            alpha=float(fields.get("lora_alpha", 8)),
            dropout=float(fields.get("lora_dropout", 0.0) or 0.0),
            rslora=bool(fields.get("use_rslora", False)),
            init="gaussian" if init == "gaussian" else "kaiming",
        )
