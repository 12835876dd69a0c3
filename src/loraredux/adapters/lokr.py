"""LoKr: a Kronecker product update beside a frozen weight, one factor optionally low rank.

    W' = W0 + s * W1 ⊗ W2,   W1: (out1, in1),  W2: (out2, in2),  out = out1 out2,  in = in1 in2,  s = alpha / r
    W2 = W2a W2b (W2a: (out2, r), W2b: (r, in2)) when r < max(out2, in2) / 2, else W2 is a full matrix;
    W1 = W1a W1b likewise when `decompose_both` and r < max(out1, in1) / 2.

Yeh et al., "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation", arXiv
2309.14859 (LoKr), as PEFT 0.21.2 implements it (`peft/tuners/lokr/layer.py`, whose shape rule, factor names, init
and scale s = alpha / r this file follows; the shape rule is the one of LyCORIS's `lycoris/modules/lokr.py`, read
there too). Since rank(P ⊗ Q) = rank(P) rank(Q), rank(dW) = rank(W1) rank(W2) with rank(W2) <= r where W2 is
decomposed: far above r for few parameters. A 4096 x 4096 layer at r = 8 has W1 (64 x 64) and W2 = W2a W2b
(64 x 8, 8 x 64): 5,120 parameters (LoRA's r = 8 has 65,536) for rank up to 512.

Kronecker shapes: (out1, out2) = factorization(out, decompose_factor), (in1, in2) = factorization(in, ...), PEFT's
rule (`factorization` in PEFT's LoKr layer): with decompose_factor = -1 (the default) the divisor pair nearest the
square root, smaller first; with f > 0 dividing the size, (f, size / f). Where f does not divide a size, PEFT
silently picks another split; loraredux refuses it instead (`check_shape`), naming the sizes.

Initialisation and defaults as PEFT's `LoKrConfig` (r = 8, alpha = 8, decompose_both = False, decompose_factor = -1):
`init_weights=True` sets W1 (or W1a) to 0 and the other factors Kaiming-uniform with a = sqrt(5); `"lycoris"` sets
W2 (or W2b) to 0 and the others Kaiming-uniform. Either way W' = W0 at the start.

Fast path (`kron_apply`): (W1 ⊗ W2) x is W1 X W2^T with X the (in1, in2) reshape of x (the "vec trick",
(P ⊗ Q) vec(X) = vec(Q X P^T) in column-major order, Van Loan, "The ubiquitous Kronecker product", 2000), so no dense
(out, in) matrix is built. Per row it costs out1 in2 (in1 + out2) or in1 out2 (in2 + out1) multiply-adds,
depending on which factor goes first, against in out for the dense matrix; the cheapest of the three is used (the
dense one wins only in degenerate splits such as a 1 x 1 W1). Token ids (an embedding) gather one column of each
factor and take their outer product.

Dropouts as PEFT's LoKr in training (see `loha.lycoris_dropout`): module dropout skips the update, "rank" dropout
zeroes output rows of dW, rescaled by 1 / (fraction kept) only with `rank_dropout_scale` (PEFT builds that scale in
float32; here it is in the layer's dtype).

Base layers: nn.Linear (as PEFT), transformers' Conv1D and nn.Embedding; PEFT's LoKr adapts neither of the last
two, so adapters on them save in loraredux's own format (`peft_base_kinds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import Adapter, AdapterConfig, accumulate_, register
from .loha import _check_probability, lycoris_dropout

__all__ = ["KroneckerLayout", "LoKr", "LoKrConfig", "factorization", "kron_apply", "kron_lookup"]

_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's split of a size into two factors for a Kronecker product (where PEFT's rule is well defined).

    Args:
        dimension: the size to split, >= 1.
        factor: -1 for the divisor pair nearest sqrt(dimension), (m, n) with m <= n; or f >= 1 dividing
            `dimension` for (f, dimension / f).

    Raises:
        ValueError: a factor other than -1 that does not divide the dimension (PEFT would then fall back to a
            search for another split).
    """
    if factor == -1:
        m = max(k for k in range(1, math.isqrt(dimension) + 1) if dimension % k == 0)
        return m, dimension // m
    if factor < 1 or dimension % factor:
        raise ValueError(f"decompose_factor {factor} does not divide the size {dimension}")
    return factor, dimension // factor


def kron_apply(W1: Tensor, W2: Tensor, x: Tensor) -> Tensor:
    """x (W1 ⊗ W2)^T without the Kronecker product, in the cheaper order of the vec trick (or dense if cheaper).

    Args:
        W1: (out1, in1); W2: (out2, in2); x: (rows, in1 in2).

    Returns:
        (rows, out1 out2).
    """
    (out1, in1), (out2, in2) = W1.shape, W2.shape
    rows = x.shape[0]
    left = out1 * in2 * (in1 + out2)  # per row: W1 X first, then (W1 X) W2^T
    right = in1 * out2 * (in2 + out1)  # per row: X W2^T first, then W1 (X W2^T)
    # Dense: building W1 ⊗ W2 once, then in out per row.
    if in1 * in2 * out1 * out2 * (rows + 1) < rows * min(left, right):
        return F.linear(x, torch.kron(W1, W2))
    X = x.reshape(rows, in1, in2)
    Y = (W1 @ X) @ W2.T if left <= right else W1 @ (X @ W2.T)  # (rows, out1, out2)
    return Y.reshape(rows, out1 * out2)


def kron_lookup(W1: Tensor, W2: Tensor, ids: Tensor) -> Tensor:
    """Columns `ids` of W1 ⊗ W2, as rows: column j1 in2 + j2 is W1[:, j1] ⊗ W2[:, j2].

    Args:
        W1: (out1, in1); W2: (out2, in2); ids: (rows,) integers below in1 in2.

    Returns:
        (rows, out1 out2).
    """
    (out1, _), (out2, in2) = W1.shape, W2.shape
    u = F.embedding(ids // in2, W1.T)  # (rows, out1)
    v = F.embedding(ids % in2, W2.T)  # (rows, out2)
    return (u[:, :, None] * v[:, None, :]).reshape(ids.shape[0], out1 * out2)


class KroneckerLayout(NamedTuple):
    """The Kronecker shapes of one layer: W1 (out1, in1), W2 (out2, in2), and which factor is a full matrix."""

    out1: int
    out2: int
    in1: int
    in2: int
    w1_full: bool
    w2_full: bool


class LoKr(Adapter):
    """y = base(x) + s * x (W1 ⊗ W2)^T, computed by the vec trick (`kron_apply`)."""

    def __init__(self, base: nn.Module, config: LoKrConfig) -> None:
        super().__init__(base, config)
        W0 = self.base_weight()
        lay = config.layout(self.in_features, self.out_features)
        r = config.rank
        shapes: dict[str, tuple[int, int]] = {}
        if lay.w1_full:
            shapes["lokr_w1"] = (lay.out1, lay.in1)
        else:
            shapes |= {"lokr_w1_a": (lay.out1, r), "lokr_w1_b": (r, lay.in1)}
        if lay.w2_full:
            shapes["lokr_w2"] = (lay.out2, lay.in2)
        else:
            shapes |= {"lokr_w2_a": (lay.out2, r), "lokr_w2_b": (r, lay.in2)}
        for name in _NAMES:  # absent factors are None, so the state holds exactly PEFT's tensors
            shape = shapes.get(name)
            value = None if shape is None else torch.empty(shape, dtype=W0.dtype, device=W0.device)
            self.register_parameter(name, None if value is None else nn.Parameter(value))
        self.layout = lay
        self.scale = config.scale
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PEFT's initialisation for `init_weights` (see the module docstring)."""
        zero = (
            {"lokr_w1", "lokr_w1_a"}
            if self.config.init_weights is True
            else {"lokr_w2", "lokr_w2_b"}
        )
        for name, p in self.peft_tensors().items():
            if name in zero:
                nn.init.zeros_(p)
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def w1(self) -> Tensor:
        """W1 (out1, in1)."""
        return self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a @ self.lokr_w1_b

    def w2(self) -> Tensor:
        """W2 (out2, in2)."""
        return self.lokr_w2 if self.lokr_w2 is not None else self.lokr_w2_a @ self.lokr_w2_b

    def effective_weight(self) -> Tensor:
        return self.base_weight() + self.scale * torch.kron(self.w1(), self.w2())  # (out, in)

    def adapted(self, x: Tensor) -> Tensor:
        x, lead = self.flatten(x)
        y = self.base(x)  # (rows, out)
        cfg = self.config
        keep = None
        if self.training and (cfg.module_dropout > 0 or cfg.rank_dropout > 0):
            skip, keep = lycoris_dropout(
                self.out_features,
                cfg.module_dropout,
                cfg.rank_dropout,
                cfg.rank_dropout_scale,
                y,
            )
            if skip:
                return y.reshape(*lead, y.shape[-1])
        W1, W2 = self.w1(), self.w2()
        dense = self.view.input_is_dense
        delta = kron_apply(W1, W2, x) if dense else kron_lookup(W1, W2, x)  # (rows, out)
        if keep is not None:
            delta = delta * keep  # "rank" dropout zeroes output rows of dW
        y = accumulate_(y, delta, scale=self.scale)
        return y.reshape(*lead, y.shape[-1])

    # -- PEFT format: tensor names relative to the layer's path --------------------------------------
    def peft_tensors(self) -> dict[str, Tensor]:
        return {name: p for name in _NAMES if (p := getattr(self, name)) is not None}


@register("lokr")
@dataclass(frozen=True)
class LoKrConfig(AdapterConfig):
    """LoKr's hyper-parameters, PEFT's names and defaults.

    Args:
        rank: r, the rank of W2 = W2a W2b (and of W1 = W1a W1b with `decompose_both`) where the factor is
            decomposed; a factor with r >= max(its sizes) / 2 is a full matrix instead (PEFT's rule).
        alpha: the scale numerator, s = alpha / r.
        rank_dropout: in training, the probability of zeroing each output row of dW (PEFT's "rank" dropout).
        module_dropout: in training, the probability of skipping the whole update for a forward pass.
        decompose_both: also decompose W1 into W1a W1b (when r < max(out1, in1) / 2).
        decompose_factor: -1 (the split nearest the square root) or f >= 1 dividing both in and out
            ((f, size / f) splits).
        rank_dropout_scale: scale the rows kept by rank dropout by 1 / (fraction kept).
        init_weights: True (PEFT's default: W1 = 0) or "lycoris" (W2 = 0).
    """

    rank: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | str = True

    adapter: ClassVar[type[Adapter]] = LoKr
    peft_type: ClassVar[str | None] = "LOKR"
    #: PEFT's LoKr adapts nn.Linear (and convolutions, which loraredux does not adapt), not Conv1D or Embedding.
    peft_base_kinds: ClassVar[tuple[str, ...]] = ("linear",)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_probability(self.method, "rank_dropout", self.rank_dropout)
        _check_probability(self.method, "module_dropout", self.module_dropout)
        f = self.decompose_factor
        if isinstance(f, bool) or not isinstance(f, int) or (f != -1 and f < 1):
            raise ValueError(f"lokr: decompose_factor must be -1 or an integer >= 1, got {f!r}")
        if self.init_weights is not True and self.init_weights != "lycoris":
            raise ValueError(
                f"lokr: init_weights must be True or 'lycoris' (both start at W' = W0), "
                f"got {self.init_weights!r}"
            )

    def check_shape(self, in_features: int, out_features: int) -> None:
        """decompose_factor f > 0 must divide both sizes, else PEFT's rule would pick another split silently."""
        f = self.decompose_factor
        bad = [
            f"{n}={v}" for n, v in (("in", in_features), ("out", out_features)) if f > 0 and v % f
        ]
        if bad:
            raise ValueError(
                f"decompose_factor {f} must divide both in and out to split them as (f, size / f); "
                f"it does not divide {', '.join(bad)} (use -1 for the split nearest the square root)"
            )

    def layout(self, in_features: int, out_features: int) -> KroneckerLayout:
        """PEFT's Kronecker shapes for an (out, in) layer and which factors are full matrices."""
        out1, out2 = factorization(out_features, self.decompose_factor)
        in1, in2 = factorization(in_features, self.decompose_factor)
        r = self.rank
        w1_full = not (self.decompose_both and 2 * r < max(out1, in1))
        w2_full = not 2 * r < max(out2, in2)
        return KroneckerLayout(out1, out2, in1, in2, w1_full, w2_full)

    def parameter_count(self, in_features: int, out_features: int) -> int:
        lay, r = self.layout(in_features, out_features), self.rank
        w1 = lay.out1 * lay.in1 if lay.w1_full else r * (lay.out1 + lay.in1)
        w2 = lay.out2 * lay.in2 if lay.w2_full else r * (lay.out2 + lay.in2)
        return w1 + w2

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    # -- PEFT format ------------------------------------------------------------------------------
    def peft_fields(self) -> dict[str, Any]:
        """The `adapter_config.json` fields of PEFT's LoKrConfig that this config sets."""
        return {
            "r": self.rank,
            "alpha": self.alpha,
            "rank_dropout": self.rank_dropout,
            "module_dropout": self.module_dropout,
            "decompose_both": self.decompose_both,
            "decompose_factor": self.decompose_factor,
            "rank_dropout_scale": self.rank_dropout_scale,
            "init_weights": self.init_weights,
            "use_effective_conv2d": False,
        }

    @classmethod
    def from_peft_fields(cls, fields: dict[str, Any]) -> LoKrConfig:
        """Read PEFT's LoKrConfig fields.

        `init_weights` only chooses the starting values (the file's weights replace them; False is read as
        True) and `use_effective_conv2d` only concerns convolutions: neither changes what a linear layer computes.
        """
        return cls(
            rank=int(fields.get("r", 8)),
            alpha=float(fields.get("alpha", 8)),
            rank_dropout=float(fields.get("rank_dropout", 0.0) or 0.0),
            module_dropout=float(fields.get("module_dropout", 0.0) or 0.0),
            decompose_both=bool(fields.get("decompose_both", False)),
            decompose_factor=int(fields.get("decompose_factor", -1)),
            rank_dropout_scale=bool(fields.get("rank_dropout_scale", False)),
            init_weights="lycoris" if fields.get("init_weights") == "lycoris" else True,
        )
