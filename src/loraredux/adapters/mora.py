"""MoRA: one square trainable matrix between parameter-free compression and decompression.

    h = W0 x + f_decomp(M f_comp(x)),     M: (r̂, r̂),     r̂ = ⌊√((d + k) r)⌋

W0 is (d, k) = (out, in) and r is LoRA's rank, so M has r̂² <= (d + k) r entries: LoRA's parameter budget at rank r,
spent on one square matrix whose update can reach rank r̂ > r (truncation, sharing) or up to min(d, k) (rotation).

Jiang et al., "MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning", arXiv 2405.12130 (§4).

The operators (`compress`), with n = ⌈k / r̂⌉ chunks and x̃ ∈ R^{n r̂} the input padded cyclically, x̃_m = x_{m mod k}:

    truncation  f_comp(x) = x_{1:r̂},  f_decomp(z) = [z; 0],  so ΔW = [[M, 0], [0, 0]]
    sharing     f_comp(x)_i = Σ_c x̃_{c r̂ + i},  f_decomp(z)_o = z_{o mod r̂}  (inputs of stride r̂ share a column
                of M, outputs share its rows)
    rotation    a^c = R_c x̃^c for the chunks x̃^c ∈ R^r̂ (c = 0..n-1),  y = [M a^0; ...; M a^{n-1}] ∈ R^{n r̂},
                f_decomp(y)_o = y_{o mod n r̂}:  ΔW = diag(M R_0, ..., M R_{n-1}) with the padded columns folded
                back onto the first ones and the rows cut (or repeated) to d.

R_c is RoPE's rotation at position c: the pairs (j, j + ⌊r̂/2⌋) turn by the angle c θ_j, θ_j = 10000^{-2j/r̂}. It
makes the chunks distinguishable, which plain decoupling (every R_c = I, ΔW = diag(M, ..., M)) does not.

Where each detail was confirmed:
- the equation, r̂ = ⌊√((d + k) r)⌋, the truncation / sharing / decoupling / rotation operators and that sharing
  suits large ranks while decoupling with rotation suits small ones: the paper §4, read through the summary at
  https://themoonlight.io/review/mora-high-rank-updating-for-parameter-efficient-fine-tuning and paper notes
  (JinSeoung-Oh/Reference, Tuning/Fine_tuning/MoRA.py);
- the authors' code (github.com/kongds/MoRA, peft-mora/src/peft/tuners/lora/layer.py, `_apply_mora` and
  `get_delta_weight`) and README: `mora_type=1` is sharing (paper Eq. 6, "for large ranks"), `mora_type=6` is the
  RoPE rotation (Eq. 9, "for small ranks", used at r = 8); M starts at zero; there is no alpha (scale 1); dropout
  acts on the input; a k not divisible by r̂ is padded with the input's own first entries, [x, x_{1:pad}] (kongds
  confirms this is intended in huggingface/peft PR #1813); the rotation uses the rotate-half pairing, base 10000 and
  positions 0..n-1; the concatenated output is cut to d, or repeated when n r̂ < d. Types 2-4 only re-group the
  sharing for ReMoRA (kongds/MoRA issue #8) and are not built here.

Defaults: rank 8 (LoRA's budget), `compress="rotation"` (the authors' choice at small ranks such as 8; use
`"sharing"` for large ones such as 256), M = 0 so W' = W0 at the start, no dropout.

Deviations from the authors' code, each deliberate:
- r̂ is the paper's floor; the code rounds to nearest (int(√(...) + 0.5)), whose r̂² can exceed LoRA's budget.
- An odd r̂ cannot be split into pairs; the code then fails, here its last coordinate is left unrotated.
- Every variant requires r̂ <= min(d, k): beyond it some rows or columns of M never reach the update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import Adapter, AdapterConfig, register

__all__ = ["MoRA", "MoRAConfig", "rope_tables", "rotate", "square_size"]

_COMPRESS = ("rotation", "sharing", "truncation")
ROPE_BASE = 10000.0


def square_size(in_features: int, out_features: int, rank: int) -> int:
    """r̂ = ⌊√((d + k) r)⌋, the side of M with LoRA's parameter count at rank r (exact integer square root)."""
    return math.isqrt((in_features + out_features) * rank)


def rope_tables(chunks: int, size: int, base: float = ROPE_BASE) -> tuple[Tensor, Tensor]:
    """cos and sin (chunks, size) of the RoPE angles c θ_j, θ_j = base^{-2j/size}, laid out for `rotate`.

    Coordinates j and j + size // 2 share the angle; an odd size's last coordinate has angle 0. Float64 on CPU, so
    every device and dtype starts from the same values.
    """
    half = size // 2
    theta = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / size)  # (half,)
    angle = torch.arange(chunks, dtype=torch.float64)[:, None] * theta  # (chunks, half)
    cos = torch.ones(chunks, size, dtype=torch.float64)
    sin = torch.zeros(chunks, size, dtype=torch.float64)
    cos[:, :half], cos[:, half : 2 * half] = angle.cos(), angle.cos()
    sin[:, :half], sin[:, half : 2 * half] = angle.sin(), angle.sin()
    return cos, sin


def _rotate_half(v: Tensor) -> Tensor:
    """(-v_{h:2h}, v_{0:h}, v_{2h:}) along the last axis, h = size // 2 (the odd tail is multiplied by sin = 0)."""
    half = v.shape[-1] // 2
    return torch.cat((-v[..., half : 2 * half], v[..., :half], v[..., 2 * half :]), dim=-1)


def rotate(v: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """R v for each row v (..., size): the pair (v_j, v_{j+h}) turns by the angle whose cos / sin are given."""
    return v * cos + _rotate_half(v) * sin


def _fold_columns(blocks: Tensor, in_features: int) -> Tensor:
    """(rows, n r̂) -> (rows, k): padded input m >= k is x_{m - k}, so its column adds onto column m - k."""
    extra = blocks[:, in_features:]  # (rows, pad), pad < r̂ <= k
    return blocks[:, :in_features] + F.pad(extra, (0, in_features - extra.shape[1]))


def _tile_rows(block: Tensor, out_features: int) -> Tensor:
    """(p, k) -> (d, k) with row o = block[o mod p]: the output repeated, or cut, to d."""
    return block.repeat(-(-out_features // block.shape[0]), 1)[:out_features]


class MoRA(Adapter):
    """y = base(x) + f_decomp(M f_comp(dropout(x))), with f_comp and f_decomp as reshapes, sums and slices."""

    cos: Tensor
    sin: Tensor

    def __init__(self, base: nn.Module, config: MoRAConfig) -> None:
        super().__init__(base, config)
        W0 = self.base_weight()
        r_hat = config.square_size(self.in_features, self.out_features)
        self.M = nn.Parameter(torch.zeros(r_hat, r_hat, dtype=W0.dtype, device=W0.device))
        self.compress_kind = config.compress
        self.chunks = -(-self.in_features // r_hat)  # n = ⌈k / r̂⌉
        self.pad = self.chunks * r_hat - self.in_features  # x's first entries repeated at the end
        # Rotation: chunks past ⌈d / r̂⌉ land in output rows that f_decomp cuts, so they are never computed.
        self.used_chunks = min(self.chunks, -(-self.out_features // r_hat))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        if config.compress == "rotation":
            cos, sin = rope_tables(self.used_chunks, r_hat)
            # Fixed functions of the layer's shape, rebuilt exactly by every constructor: not saved in files.
            self.register_buffer("cos", cos.to(W0.device, W0.dtype), persistent=False)
            self.register_buffer("sin", sin.to(W0.device, W0.dtype), persistent=False)

    @property
    def square_size(self) -> int:
        """r̂, the side of M."""
        return self.M.shape[0]

    # -- the operators ---------------------------------------------------------------------------------
    def compress(self, x: Tensor) -> Tensor:
        """f_comp: (..., k) -> (..., r̂); for rotation the rotated chunks a^c, (..., n', r̂).

        n' = min(n, ⌈d / r̂⌉): the outputs of later chunks are cut by f_decomp, so they are left out.
        """
        r_hat = self.square_size
        if self.compress_kind == "truncation":
            return x[..., :r_hat]
        if self.compress_kind == "sharing":
            full, rest = divmod(self.in_features, r_hat)
            s = x[..., : full * r_hat].unflatten(-1, (full, r_hat)).sum(-2)  # (..., r̂)
            if rest:  # the last chunk, completed cyclically with x_{0:pad}
                s = s + torch.cat((x[..., full * r_hat :], x[..., : self.pad]), dim=-1)
            return s
        used = self.used_chunks
        if used < self.chunks:  # the padded tail is in a chunk that is left out
            padded = x[..., : used * r_hat]
        else:
            padded = torch.cat((x, x[..., : self.pad]), dim=-1) if self.pad else x  # (..., n r̂)
        return rotate(padded.unflatten(-1, (used, r_hat)), self.cos, self.sin)

    def add_decompressed_(self, y: Tensor, z: Tensor) -> Tensor:
        """y += f_decomp(z) in place, for y (T, d) and z (T, r̂), or (T, n', r̂) for rotation; returns y."""
        z = z.to(y.dtype).flatten(1)  # (T, p): p = r̂, or n' r̂ for rotation
        if self.compress_kind == "truncation":
            y[:, : z.shape[1]].add_(z)
            return y
        period = z.shape[1]
        reps, rest = divmod(self.out_features, period)
        if reps:  # y_o += z_{o mod p}: whole periods as one broadcast add into a view of y
            y[:, : reps * period].unflatten(1, (reps, period)).add_(z.unsqueeze(1))
        if rest:
            y[:, reps * period :].add_(z[:, :rest])
        return y

    def decompress(self, z: Tensor) -> Tensor:
        """f_decomp: (T, r̂) or (T, n', r̂) -> (T, d)."""
        return self.add_decompressed_(z.new_zeros(z.shape[0], self.out_features), z)

    # -- the spec and the fast path --------------------------------------------------------------------
    def delta_weight(self) -> Tensor:
        """ΔW (d, k) of x -> f_decomp(M f_comp(x)) in closed form (see the module docstring)."""
        M, k, d = self.M, self.in_features, self.out_features
        r_hat = self.square_size
        if self.compress_kind == "truncation":
            return F.pad(M, (0, k - r_hat, 0, d - r_hat))
        if self.compress_kind == "sharing":
            blocks = M.repeat(1, self.chunks)  # (r̂, n r̂): column m is M[:, m mod r̂]
        else:
            # M R_c rotates the rows of M by the opposite angle: M R_c = M cos_c - rotate_half(M) sin_c.
            MR = M * self.cos[:, None, :] - _rotate_half(M) * self.sin[:, None, :]  # (n', r̂, r̂)
            used, n = self.used_chunks, self.chunks
            eye = torch.eye(used, n, dtype=M.dtype, device=M.device)
            # diag(M R_0, ..., M R_{n'-1}) as (n' r̂, n r̂): the rows of the chunks left out would be cut.
            blocks = torch.einsum("cij,ce->ciej", MR, eye).reshape(used * r_hat, n * r_hat)
        return _tile_rows(_fold_columns(blocks, k), d)

    def effective_weight(self) -> Tensor:
        return self.base_weight() + self.delta_weight()  # (out, in)

    def adapted(self, x: Tensor) -> Tensor:
        x, lead = self.flatten(x)
        y = self.base(x)  # (tokens, out), a fresh tensor the update accumulates into
        h = x if self.dropout is None else self.dropout(x)
        z = self.compress(h)  # (tokens, r̂) or (tokens, n', r̂)
        z = z @ self.M.T  # M applied to every compressed vector (every chunk for rotation)
        # In place: the base's backward needs its input and weight, not y.
        return self.add_decompressed_(y, z).reshape(*lead, y.shape[-1])


@register("mora")
@dataclass(frozen=True)
class MoRAConfig(AdapterConfig):
    """MoRA's hyper-parameters, the authors' defaults for small ranks.

    Args:
        rank: r, LoRA's rank whose parameter budget M gets: r̂ = ⌊√((d + k) r)⌋ per layer (`square_size`), so
            `rank_pattern` works as for LoRA.
        compress: the operator pair: `"rotation"` (paper Eq. 9, the authors' `mora_type=6`, for small ranks),
            `"sharing"` (Eq. 6, `mora_type=1`, for large ranks) or `"truncation"` (the paper's first, lossy example).
        dropout: dropout on the adapter's input (not on the base path).
    """

    rank: int = 8
    compress: str = "rotation"
    dropout: float = 0.0

    adapter: ClassVar[type[Adapter]] = MoRA
    #: The authors apply MoRA to linear layers only; a one-hot input makes its reshapes moot for embeddings.
    base_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compress not in _COMPRESS:
            raise ValueError(f"mora: compress must be one of {_COMPRESS}, got {self.compress!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"mora: dropout must be in [0, 1), got {self.dropout!r}")

    def square_size(self, in_features: int, out_features: int) -> int:
        """r̂ for a layer of shape (out, in)."""
        return square_size(in_features, out_features, self.rank)

    def check_shape(self, in_features: int, out_features: int) -> None:
        """Refuse r̂ > min(in, out): some rows or columns of M would then never reach the update.

        Raises:
            ValueError: names r̂, the rank it came from, the constraint and the largest rank that fits.
        """
        r_hat = self.square_size(in_features, out_features)
        limit = min(in_features, out_features)
        if r_hat > limit:
            best = ((limit + 1) ** 2 - 1) // (in_features + out_features)
            hint = f"use rank <= {best}" if best >= 1 else "no rank fits this layer"
            raise ValueError(
                f"square size r_hat = floor(sqrt((in + out) * rank)) = "
                f"floor(sqrt(({in_features} + {out_features}) * {self.rank})) = {r_hat} from rank "
                f"{self.rank} is above min(in, out) = {limit}; MoRA needs r_hat <= min(in, out) ({hint})"
            )

    def parameter_count(self, in_features: int, out_features: int) -> int:
        return self.square_size(in_features, out_features) ** 2
