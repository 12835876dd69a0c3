"""SVFT: a sparse trainable matrix of coefficients in the frozen singular bases of the pre-trained weight.

    W' = W0 + U M V^T,     W0 = U Σ V^T (thin SVD, U: (out, n), V: (in, n)),   M: (n, n) sparse, trained

Lingam, Tejaswi, Vavre, Shetty, Gudur, Ghosh, Dimakis, Choi, Bojchevski, Sanghavi, "SVFT: Parameter-Efficient
Fine-Tuning with Singular Vectors", NeurIPS 2024, arXiv 2405.19597. Only the entries of M on a fixed pattern train:

    plain     M diagonal (SVFT^P)                                   n parameters
    banded    the diagonal and d off-diagonals on each side (SVFT^B_d)   n (2d + 1) - d (d + 1)
    random    that many positions, drawn once at random (SVFT^R_d)       n (2d + 1) - d (d + 1)
    top_k     that many positions with the largest |u_i^T v_j| (SVFT^T_d; square layers only)

n = min(in, out) with the full thin bases, which the paper uses by default (its appendix C.3 reports that
truncating the singular vectors loses accuracy); `rank` keeps only the top-`rank` singular vectors (n = rank).

Confirmed from the paper's abstract and method overview (ΔW = U M V^T, the four pattern names, top-k by the
alignment of left and right singular vectors) and from the authors' code (github.com/VijayLingam95/SVFT,
`svft/svft_layers.py`): the SVD of the (out, in) weight, `off_diag` = d, the banded pattern as diagonals at offsets
-d..d, and k = n (2d + 1) - d (d + 1) entries for the random and top-k patterns; `rank` truncates the bases.

Deviations from the authors' code, each deliberate:
- Their code trains `sigmoid(gate) * M` with one extra scalar `gate` per layer (starting at 0, so the factor is
  1/2) and draws M's values Kaiming-normal, N(0, 2 / k), so their W' differs from W0 at initialisation. The paper's
  equation has no gate; we train M itself and start it at zero (W' = W0 at init, `identity_at_init`), and offer
  `init="kaiming"` for the authors' starting point: M ~ N(0, 1 / (2 k)), the law of their initial
  sigmoid(0) * N(0, 2 / k).
- Their random pattern draws rows and columns independently (with repeats); ours draws k distinct positions, so
  the k parameters are k independent coefficients. The draw is seeded by `seed` and kept as index buffers.
- Their top-k scores the raw entries of `u @ v.T`; ours scores |u_i^T v_j| as the paper describes, which does not
  depend on the arbitrary signs of the singular vectors.
- With `rank` < min(in, out) their layer replaces W0 by its truncation U_r (Σ_r + M) V_r^T; ours adds U_r M V_r^T to
  the exact W0 (nothing of the base weight is lost).

The fast path never forms the dense (out, in) update: y = base(x) + ((x V) M^T) U^T. For `plain` M^T is a vector
scaling of x V; for the other patterns the k trained values are scattered into a dense n x n M (differentiably)
and applied by one GEMM. Sparse kernels (gather/scatter over (tokens, k), torch.sparse) would do fewer flops but
read a (tokens, k) gathered copy with k = n (2d + 1) and lack half-precision autograd coverage; an n x n GEMM is
the faster and simpler choice on GPUs. U, V and the pattern indices are persistent buffers, so a saved adapter is
restored exactly (singular vectors are unique only up to sign). Memory: U and V hold (out + in) n numbers per layer,
about twice W0 for a square layer with the full bases, the cost the paper itself reports; `rank` trims it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core import Adapter, AdapterConfig, accumulate_, initialising, register

__all__ = ["SVFT", "SVFTConfig", "pattern_indices", "pattern_size"]

_PATTERNS = ("plain", "banded", "random", "top_k")
_INITS = ("zeros", "kaiming")


def pattern_size(pattern: str, n: int, off_diag: int) -> int:
    """Trainable entries of M (n x n) for a pattern: n for plain, n (2d + 1) - d (d + 1) otherwise."""
    if pattern == "plain":
        return n
    return n * (2 * off_diag + 1) - off_diag * (off_diag + 1)


def pattern_indices(
    pattern: str,
    n: int,
    off_diag: int,
    *,
    seed: int = 0,
    U: Tensor | None = None,
    V: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The (row, col) positions of M's trainable entries, int64 on the CPU, rows sorted.

    Args:
        pattern: "plain", "banded", "random" or "top_k".
        n: the size of M.
        off_diag: d, off-diagonals on each side (banded) or the budget's d (random, top_k); 0 for plain.
        seed: the random pattern's draw.
        U: (out, n) left singular vectors (top_k only).
        V: (in, n) right singular vectors (top_k only; in must equal out).
    """
    if pattern in ("plain", "banded"):
        d = 0 if pattern == "plain" else off_diag
        i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        keep = (i - j).abs() <= d
        return i[keep], j[keep]  # row-major: sorted by row, then column
    k = pattern_size(pattern, n, off_diag)
    if pattern == "random":
        generator = torch.Generator().manual_seed(seed)
        flat = torch.randperm(n * n, generator=generator)[:k].sort().values
    elif pattern == "top_k":
        if U is None or V is None or U.shape[0] != V.shape[0]:
            raise ValueError("the top_k pattern needs U and V of a square layer")
        score = (U.T.double() @ V.double()).abs().flatten().cpu()  # (n * n,) |u_i^T v_j|
        flat = torch.topk(score, k).indices.sort().values
    else:
        raise ValueError(f"svft: pattern must be one of {_PATTERNS}, got {pattern!r}")
    return flat // n, flat % n


class SVFT(Adapter):
    """y = base(x) + ((x V) M^T) U^T with frozen singular bases U, V and M trained on a fixed sparse pattern."""

    def __init__(self, base: nn.Module, config: SVFTConfig) -> None:
        super().__init__(base, config)
        W0 = self.base_weight()
        n = config.size(self.in_features, self.out_features)
        if initialising():
            work = W0.detach().to(torch.float64 if W0.dtype == torch.float64 else torch.float32)
            with torch.no_grad():
                U, _, Vh = torch.linalg.svd(work, full_matrices=False)  # (out, k), (k,), (k, in)
            U, V = U[:, :n], Vh[:n].T  # (out, n), (in, n)
            rows, cols = pattern_indices(
                config.pattern, n, config.off_diag, seed=config.seed, U=U, V=V
            )
        else:  # loading: the file holds the bases and the pattern, so no SVD
            U, V = torch.empty(self.out_features, n), torch.empty(self.in_features, n)
            k = pattern_size(config.pattern, n, config.off_diag)
            rows, cols = torch.empty(k, dtype=torch.long), torch.empty(k, dtype=torch.long)
        self.n = n
        self.register_buffer("U", U.to(W0.dtype).contiguous())  # (out, n), frozen
        self.register_buffer("V", V.to(W0.dtype).contiguous())  # (in, n), frozen
        self.register_buffer("rows", rows.to(W0.device))  # (k,) int64, M's row of each value
        self.register_buffer("cols", cols.to(W0.device))  # (k,) int64, M's column of each value
        self.values = nn.Parameter(torch.empty(rows.numel(), dtype=W0.dtype, device=W0.device))
        if initialising():
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """M = 0 (`init="zeros"`), or N(0, 1 / (2 k)) (`init="kaiming"`, the authors' starting point)."""
        if self.config.init == "zeros":
            nn.init.zeros_(self.values)
        else:
            nn.init.normal_(self.values, std=1.0 / math.sqrt(2 * self.values.numel()))

    def M(self) -> Tensor:
        """The dense n x n coefficient matrix (zero off the pattern)."""
        M = self.values.new_zeros(self.n, self.n)
        # index_put out of place, so M is differentiable in the values
        return M.index_put((self.rows, self.cols), self.values)

    def effective_weight(self) -> Tensor:
        return self.base_weight() + self.U @ self.M() @ self.V.T  # (out, in)

    def adapted(self, x: Tensor) -> Tensor:
        x, lead = self.flatten(x)
        y = self.base(x)  # (tokens, out)
        z = self.view.project(x, self.V.T)  # (tokens, n) = x V
        # M is diagonal for plain (values in diagonal order), else a small dense n x n GEMM.
        w = z * self.values if self.config.pattern == "plain" else z @ self.M().T  # (tokens, n)
        y = accumulate_(y, w, self.U)  # y += w U^T
        return y.reshape(*lead, y.shape[-1])


@register("svft")
@dataclass(frozen=True)
class SVFTConfig(AdapterConfig):
    """SVFT's hyper-parameters (default: SVFT^P, the trained diagonal, over the full thin bases, M = 0 at init).

    Args:
        pattern: "plain" (diagonal), "banded", "random" or "top_k" (square layers only).
        off_diag: d, the off-diagonals on each side of the band (banded), or the budget n (2d + 1) - d (d + 1) of
            the random and top-k patterns; must be 0 for plain and at most n - 1.
        rank: keep only the top-`rank` singular vectors (n = rank); None keeps all min(in, out), as the paper.
        init: "zeros" (W' = W0 at init) or "kaiming" (the authors' code: M ~ N(0, 1 / (2 k))).
        seed: the draw of the random pattern.
    """

    pattern: str = "plain"
    off_diag: int = 0
    rank: int | None = None
    init: str = "zeros"
    seed: int = 0

    adapter: ClassVar[type[Adapter]] = SVFT
    identity_at_init: ClassVar[bool] = True  # with the default init="zeros"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pattern not in _PATTERNS:
            raise ValueError(f"svft: pattern must be one of {_PATTERNS}, got {self.pattern!r}")
        for name in ("off_diag", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"svft: {name} must be an integer >= 0, got {value!r}")
        if self.pattern == "plain" and self.off_diag != 0:
            raise ValueError(
                f"svft: the plain pattern is the diagonal (off_diag = 0), got off_diag={self.off_diag}; "
                "use pattern='banded' for off-diagonals"
            )
        if self.init not in _INITS:
            raise ValueError(f"svft: init must be one of {_INITS}, got {self.init!r}")

    def size(self, in_features: int, out_features: int) -> int:
        """n, the size of M: min(in, out), or `rank` when set."""
        return min(in_features, out_features) if self.rank is None else self.rank

    def check_shape(self, in_features: int, out_features: int) -> None:
        k = min(in_features, out_features)
        if self.rank is not None and self.rank > k:
            raise ValueError(
                f"rank {self.rank} needs rank <= min(in, out) = {k}, the number of singular vectors of W0"
            )
        n = self.size(in_features, out_features)
        if self.off_diag > n - 1:
            raise ValueError(
                f"off_diag {self.off_diag} needs off_diag <= n - 1 = {n - 1} for M of size n = {n}"
            )
        if self.pattern == "top_k" and in_features != out_features:
            raise ValueError(
                "the top_k pattern scores |u_i^T v_j|, which needs a square layer (in == out), "
                f"got in={in_features}, out={out_features}"
            )

    def parameter_count(self, in_features: int, out_features: int) -> int:
        return pattern_size(self.pattern, self.size(in_features, out_features), self.off_diag)
