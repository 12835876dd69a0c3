"""AdaLoRA: an SVD-form update whose triplets are pruned by importance, so the rank budget moves between layers.

    W' = W0 + s * P Λ Q,   P = B: (out, r),  Λ = diag(E), E: (r, 1),  Q = A: (r, in),  s = alpha / (r + 1e-5)

    R(P, Q) = ||P^T P - I||_F + ||Q Q^T - I||_F                     (orthogonality, added to the loss)
    I(w) = |w * dL/dw|                                               (sensitivity of every entry of A, E, B)
    Ī_t = β1 Ī_{t-1} + (1 - β1) I_t,   Ū_t = β2 Ū_{t-1} + (1 - β2) |I_t - Ī_t|,   s(w) = Ī_t * Ū_t
    S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)                   (score of triplet i)
    b(t) = b0 for t <= t_init;  b_T + (b0 - b_T) (1 - (t - t_init) / (T - t_init - t_final))^3 after;  b_T at the end

and every ΔT steps the λ_i whose score is not above the (b0 - b(t))-th smallest score over all layers are set to 0.

Zhang, Chen, Bukharin, He, Cheng, Chen, Zhao, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"
(AdaLoRA), ICLR 2023, arXiv 2303.10512: SVD form and R (Sec. 3.1), sensitivity, its smoothing and the triplet score
(Sec. 3.2), the cubic budget schedule (Sec. 3.3, Algorithm 1). The search tool found secondary accounts of the paper
(the PΛQ form and the penalty on P, Q: jishuzhan.net/article/1719560351663525889) but not its body text, so every
formula and detail (EMA order, the product Ī * Ū, the means over P's column and Q's row, kthvalue with `<=`, the three
phases of `update_and_allocate`, the scale s = alpha / (ranknum + 1e-5) with ranknum = r, init E = 0 and A, B ~
N(0, 0.02^2)) was confirmed in the authors' code (QingruZhang/AdaLoRA, loralib/adalora.py, read with the search
tool) and in PEFT 0.21.2 (peft/tuners/adalora/{config,layer,model}.py); the allocator is numerically identical to
PEFT's RankAllocator (tests/adapters/test_adalora.py). The paper writes R with squared norms; both codes, and this
file, use the plain Frobenius norms, averaged over all A and B matrices of the model and weighted by
`orth_reg_weight`, so each layer's `penalty()` is w * R / (2 * number of layers).

Names and defaults as PEFT's AdaLoraConfig: init_r = 12, target_r = 8 (average rank at the end), lora_alpha = 8,
tinit = tfinal = 0, deltaT = 1, β1 = β2 = 0.85, orth_reg_weight = 0.5, total_step required to train.

The rank allocator is an object stepped for you: `AdaLoRAConfig.build_layers` gives all layers of one `adapt_` call
one `RankAllocator` (`adalora_allocator.py`; a submodule of each layer, so it appears once in `model.modules()`),
and `lx.train.fit` calls its `on_optimizer_step(step)` after every optimizer step. A hand-written loop calls
`allocator(model).update_and_allocate(step)` after `optimizer.step()` and before `zero_grad()`. Its state lives in
the layers' persistent buffers (the EMAs and the triplet mask), so checkpoints and native files hold it and a resumed
run is exact. Pruned triplets stay
in the tensors (λ = 0); the PEFT file drops them and records PEFT's `rank_pattern` of masks, as PEFT does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core import Adapter, AdapterConfig, accumulate_, check_tensors, register
from .adalora_allocator import FACTORS as _FACTORS
from .adalora_allocator import RankAllocator, allocator
from .factor_init import FactorInit, check_init_fields

__all__ = ["AdaLoRA", "AdaLoRAConfig", "RankAllocator", "allocator"]

_PEFT_NAMES = {"A": "lora_A", "E": "lora_E", "B": "lora_B"}


class AdaLoRA(FactorInit):
    """y = base(x) + s * ((dropout(x) A^T) * E^T) B^T: the SVD-form update, with λ = E of shape (r, 1).

    Buffers (persistent, the allocator's state): `exp_avg_ipt_{A,E,B}` and `exp_avg_unc_{A,E,B}` (the EMAs Ī and Ū,
    shaped like the factor) and `mask` (r,) bool, the triplets the allocator keeps.
    """

    def __init__(self, base: nn.Module, config: AdaLoRAConfig) -> None:
        super().__init__(base, config)
        W0 = self.base_weight()
        r, like = config.init_r, {"dtype": W0.dtype, "device": W0.device}
        self.A = nn.Parameter(torch.empty(r, self.in_features, **like))  # Q: right singular vectors
        self.E = nn.Parameter(torch.empty(r, 1, **like))  # Λ: singular values
        self.B = nn.Parameter(torch.empty(self.out_features, r, **like))  # P: left singular vectors
        self.ranknum = float(r)  # PEFT's name; the scale keeps using the initial rank after pruning
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        for name in _FACTORS:
            p = getattr(self, name)
            self.register_buffer(f"exp_avg_ipt_{name}", torch.zeros_like(p, requires_grad=False))
            self.register_buffer(f"exp_avg_unc_{name}", torch.zeros_like(p, requires_grad=False))
        self.register_buffer("mask", torch.ones(r, dtype=torch.bool, device=W0.device))
        # A layer built on its own is its own group; `AdaLoRAConfig.build_layers` replaces this by a shared one.
        self.allocator = RankAllocator(config, {"": self})
        self.setup_init(r)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PEFT's and the authors' initialisation: E = 0 (so W' = W0), A and B ~ N(0, 0.02^2); a named
        `config.init` then sets the triplets (see `set_lora_form_`)."""
        nn.init.zeros_(self.E)
        nn.init.normal_(self.A, mean=0.0, std=0.02)
        nn.init.normal_(self.B, mean=0.0, std=0.02)
        self.init_factors_(self.config.init_r)

    @torch.no_grad()
    def set_lora_form_(self, A: Tensor, B: Tensor) -> None:
        """P Λ Q from a pair: the SVD of B A (r triplets) when B A != 0; else A and B as they are (where not zero)
        with Λ = 0, so directions an init chose (EVA's) are kept and W' = W0."""
        work = torch.float64 if A.dtype == torch.float64 else torch.float32
        A, B = A.to(work), B.to(work)
        Qb, Rb = torch.linalg.qr(B)  # (out, r), (r, r)
        Qa, Ra = torch.linalg.qr(A.T)  # (in, r), (r, r)
        U, S, Vh = torch.linalg.svd(Rb @ Ra.T)  # the r x r core of B A = Qb (Rb Ra^T) Qa^T
        if S[0] > 0:
            self.B.copy_(Qb @ U)  # P (out, r), orthonormal
            self.E.copy_(S[:, None])  # Λ (r, 1)
            self.A.copy_(Vh @ Qa.T)  # Q (r, in), orthonormal
            return
        self.E.zero_()
        if torch.count_nonzero(A):
            self.A.copy_(A)
        if torch.count_nonzero(B):
            self.B.copy_(B)

    @property
    def rank(self) -> int:
        """Triplets the allocator keeps (the layer's current rank budget)."""
        return int(self.mask.sum())

    def effective_weight(self) -> Tensor:
        return self.base_weight() + self.scale * (self.B @ (self.A * self.E))  # (out, in)

    def lora_form(self) -> tuple[Tensor, Tensor, float]:
        return self.A * self.E, self.B, self.scale  # Λ folded into A: (r, in), (out, r)

    def adapted(self, x: Tensor) -> Tensor:
        x, lead = self.flatten(x)  # (tokens, in)
        y = self.base(x)  # (tokens, out)
        h = x if self.dropout is None else self.dropout(x)
        # Scale by λ on the (tokens, r) projection: cheaper than forming A * E (r, in) per call.
        z = self.view.project(h, self.A) * self.E.T  # (tokens, r)
        y = accumulate_(y, z, self.B, self.scale)
        return y.reshape(*lead, y.shape[-1])

    def penalty(self) -> Tensor | None:
        """w * (||A A^T - I||_F + ||B^T B - I||_F) / (2 n), n = layers sharing the allocator (PEFT's average)."""
        weight = self.config.orth_reg_weight
        if weight == 0:
            return None
        eye = torch.eye(self.A.shape[0], dtype=self.A.dtype, device=self.A.device)
        reg = torch.linalg.matrix_norm(self.A @ self.A.T - eye) + torch.linalg.matrix_norm(
            self.B.T @ self.B - eye
        )
        return weight * reg / (2 * len(self.allocator.layers))

    # -- the allocator's per-layer maths ---------------------------------------------------------------
    @torch.no_grad()
    def update_importance(self, beta1: float, beta2: float) -> None:
        """One EMA step of Ī and Ū for every entry of A, E, B, from the current values and gradients."""
        for name in _FACTORS:
            p = getattr(self, name)
            ipt = (p * p.grad).abs()  # I(w) = |w * dL/dw|
            avg = getattr(self, f"exp_avg_ipt_{name}")
            avg.copy_(beta1 * avg + (1 - beta1) * ipt)
            unc = getattr(self, f"exp_avg_unc_{name}")
            unc.copy_(beta2 * unc + (1 - beta2) * (ipt - avg).abs())

    @torch.no_grad()
    def reset_importance(self) -> None:
        for name in _FACTORS:
            getattr(self, f"exp_avg_ipt_{name}").zero_()
            getattr(self, f"exp_avg_unc_{name}").zero_()

    @torch.no_grad()
    def triplet_scores(self) -> Tensor:
        """S_i = s(λ_i) + mean_j s(B_ji) + mean_j s(A_ij) with s = Ī * Ū: shape (r,)."""
        s = {
            n: getattr(self, f"exp_avg_ipt_{n}") * getattr(self, f"exp_avg_unc_{n}")
            for n in _FACTORS
        }
        s_A = torch.mean(s["A"], dim=1, keepdim=True)  # (r, 1): row i of Q
        s_B = torch.mean(s["B"], dim=0).view(-1, 1)  # (r, 1): column i of P
        return s["E"].view(-1) + (s_A + s_B).view(-1)

    @torch.no_grad()
    def apply_mask(self) -> None:
        """λ_i = 0 for every triplet the mask drops."""
        self.E.masked_fill_(~self.mask.view(-1, 1), 0.0)

    # -- PEFT format ----------------------------------------------------------------------------------
    def _kept(self) -> Tensor:
        """Triplets the file holds: the kept ones, and any dropped one whose λ training brought back (nonzero)."""
        return self.mask | (self.E.detach().view(-1) != 0)

    def peft_tensors(self) -> dict[str, Tensor]:
        keep = self._kept()
        if bool(keep.all()):
            return {_PEFT_NAMES[n]: getattr(self, n) for n in _FACTORS}
        return {"lora_A": self.A[keep], "lora_E": self.E[keep], "lora_B": self.B[:, keep]}

    def peft_layer_fields(self) -> dict[str, dict[str, Any]]:
        """This layer's entries of PEFT's `rank_pattern` (a mask over the triplets), none when all are kept."""
        keep = self._kept()
        return {} if bool(keep.all()) else {"rank_pattern": {"lora_E": keep.tolist()}}

    @torch.no_grad()
    def load_peft_layer_fields(self, fields: dict[str, dict[str, Any]]) -> None:
        """Take the mask from PEFT's `rank_pattern` entry (all kept without one); `load_peft_tensors` follows."""
        entries = dict(fields.get("rank_pattern") or {})
        # "lora_E", or "lora_E.<adapter name>" as PEFT keeps it in memory
        names = [n for n in entries if n.split(".", 1)[0] == "lora_E"]
        unknown = sorted(set(entries) - set(names))
        if unknown or len(names) > 1:
            raise ValueError(f"rank_pattern entries {sorted(entries)}: expected one for lora_E")
        if not names:
            self.mask.fill_(True)
            return
        mask = entries[names[0]]
        r = self.config.init_r
        if (
            not isinstance(mask, list)
            or len(mask) != r
            or not all(isinstance(m, bool) for m in mask)
        ):
            raise ValueError(
                f"rank_pattern for lora_E must be a list of {r} booleans (init_r), got {mask!r}"
            )
        self.mask.copy_(torch.tensor(mask, dtype=torch.bool))

    @torch.no_grad()
    def load_peft_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Load PEFT's (possibly pruned) tensors into the kept triplets; dropped ones become all zero."""
        keep = self.mask
        shapes = {"lora_A": self.A[keep], "lora_E": self.E[keep], "lora_B": self.B[:, keep]}
        values = check_tensors(tensors, shapes)
        for name in _FACTORS:
            getattr(self, name).zero_()
        self.A[keep] = values["lora_A"].to(self.A.dtype)
        self.E[keep] = values["lora_E"].to(self.E.dtype)
        self.B[:, keep] = values["lora_B"].to(self.B.dtype)


@register("adalora")
@dataclass(frozen=True)
class AdaLoRAConfig(AdapterConfig):
    """AdaLoRA's hyper-parameters, PEFT's names and defaults.

    Args:
        init_r: initial rank r of every layer (triplets per layer).
        target_r: average rank per layer at the end; the total budget goes from init_r * n to target_r * n
            (at most init_r; checked when the allocator steps, since PEFT files may carry a larger one unused).
        alpha: the scale numerator (PEFT's lora_alpha): s = alpha / (init_r + 1e-5).
        dropout: dropout on the adapter's input.
        tinit: warmup steps before any pruning.
        tfinal: final steps with the rank pattern fixed.
        deltaT: steps between two maskings in the budget phase.
        beta1: EMA factor of the sensitivity Ī.
        beta2: EMA factor of the uncertainty Ū.
        orth_reg_weight: weight of the orthogonality regulariser (`penalty()`).
        total_step: total optimizer steps T; None only while the allocator is not stepped.
        init: None (the paper's: Λ = 0, P and Q small Gaussians) or an `lx.init` name: its pair becomes the
            triplets P Λ Q (PiSSA's top singular triplets of W0, ...).
        init_options: the initialiser's options.
    """

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    init: str | None = None
    init_options: dict[str, Any] = field(default_factory=dict)

    adapter: ClassVar[type[Adapter]] = AdaLoRA
    #: PEFT's AdaLoRA adapts no embedding.
    base_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d")
    peft_type: ClassVar[str | None] = "ADALORA"
    #: PEFT config keys this method fills per layer itself (io/peft.py): rank_pattern holds masks, not ranks.
    peft_layer_keys: ClassVar[tuple[str, ...]] = ("rank_pattern",)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_init_fields(self.method, self.init, self.init_options)

        def is_int(v: Any, low: int) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        for name, low in (
            ("init_r", 1),
            ("target_r", 1),
            ("tinit", 0),
            ("tfinal", 0),
            ("deltaT", 1),
        ):
            if not is_int(getattr(self, name), low):
                raise ValueError(
                    f"adalora: {name} must be an integer >= {low}, got {getattr(self, name)!r}"
                )
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"adalora: {name} must be in (0, 1), got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adalora: dropout must be in [0, 1), got {self.dropout!r}")
        if not (math.isfinite(self.orth_reg_weight) and self.orth_reg_weight >= 0):
            raise ValueError(f"adalora: orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if self.total_step is not None:
            if not is_int(self.total_step, 1):
                raise ValueError(
                    f"adalora: total_step must be an integer >= 1 or None, got {self.total_step!r}"
                )
            if self.tinit >= self.total_step - self.tfinal:
                raise ValueError(
                    f"adalora: no budget phase: tinit={self.tinit} must be below total_step - tfinal = "
                    f"{self.total_step} - {self.tfinal}"
                )

    @property
    def scale(self) -> float:
        """alpha / (ranknum + 1e-5), ranknum = init_r (the authors' and PEFT's scale)."""
        return self.alpha / (float(self.init_r) + 1e-5)

    def check_shape(self, in_features: int, out_features: int) -> None:
        if self.init_r > min(in_features, out_features):
            raise ValueError(
                f"init_r {self.init_r} is above min(in, out) = {min(in_features, out_features)} "
                "(P and Q cannot have orthonormal columns / rows)"
            )

    def parameter_count(self, in_features: int, out_features: int) -> int:
        # A (r, in), B (out, r) and the r singular values E
        return self.init_r * (in_features + out_features) + self.init_r

    def for_layer(self, rank: int | None = None, alpha: float | None = None) -> AdaLoRAConfig:
        """AdaLoRA has one config for all layers: the allocator moves the rank between them."""
        if rank is not None:
            raise ValueError(
                "adalora has no per-layer rank (rank_pattern): its allocator sets the ranks"
            )
        if alpha is not None and alpha != self.alpha:
            raise ValueError(
                "adalora uses one alpha for all layers (PEFT's AdaLoRA ignores alpha_pattern)"
            )
        return self

    def build_layers(
        self, layers: Mapping[str, tuple[nn.Module, AdapterConfig]]
    ) -> dict[str, Adapter]:
        """The layers and ONE rank allocator shared by them, set as a submodule of each."""
        built = super().build_layers(layers)
        if built:
            shared = RankAllocator(self, built)  # type: ignore[arg-type]
            for layer in built.values():
                layer.allocator = shared
        return built

    # -- PEFT format ------------------------------------------------------------------------------
    def peft_fields(self) -> dict[str, Any]:
        """The fields of PEFT's AdaLoraConfig (rank_pattern comes from the layers, see `peft_layer_keys`).

        Raises:
            ValueError: total_step is None (PEFT's AdaLoraConfig refuses to load without it).
        """
        if self.total_step is None:
            raise ValueError(
                "adalora: PEFT's AdaLoraConfig cannot be loaded without total_step > 0; set total_step or save "
                "with format='native'"
            )
        return {
            "init_r": self.init_r,
            "target_r": self.target_r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "tinit": self.tinit,
            "tfinal": self.tfinal,
            "deltaT": self.deltaT,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "orth_reg_weight": self.orth_reg_weight,
            "total_step": self.total_step,
            "init_lora_weights": True,
            "bias": "none",
            "use_dora": False,
        }

    @classmethod
    def from_peft_fields(cls, fields: dict[str, Any]) -> AdaLoRAConfig:
        """Read PEFT's AdaLoraConfig fields (`r` and `use_rslora` are ignored there, and here)."""
        for key, neutral in (("bias", "none"), ("lora_bias", False), ("use_dora", False)):
            if fields.get(key, neutral) not in (neutral, None):
                raise ValueError(
                    f"PEFT adapter has {key}={fields[key]!r}; adalora reads only {neutral!r}"
                )
        init_r = int(fields.get("init_r", 12))
        alpha = float(fields.get("lora_alpha", 8))
        total = fields.get("total_step")
        return cls(
            init_r=init_r,
            target_r=int(fields.get("target_r", 8)),
            alpha=alpha if alpha > 0 else float(init_r),  # PEFT: scaling = lora_alpha if > 0 else r
            dropout=float(fields.get("lora_dropout", 0.0) or 0.0),
            tinit=int(fields.get("tinit", 0)),
            tfinal=int(fields.get("tfinal", 0)),
            deltaT=int(fields.get("deltaT", 1)),
            beta1=float(fields.get("beta1", 0.85)),
            beta2=float(fields.get("beta2", 0.85)),
            orth_reg_weight=float(fields.get("orth_reg_weight", 0.5)),
            total_step=None if total is None else int(total),
        )
