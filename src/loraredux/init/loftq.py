"""LoftQ: quantisation-aware initialisation, alternating NF4 quantisation of the base with an SVD of its error.

    Q_t = q_N(W0 - s B_{t-1} A_{t-1}),   s B_t A_t = SVD_r(W0 - Q_t),   t = 1..T,   A_0 = B_0 = 0,

so that the frozen base Q_T (exactly representable in NF4) plus the adapter approximates W0 far better than the
plainly quantised q_N(W0) does. q_N is bitsandbytes' NF4 (QLoRA's NormalFloat), imported lazily: install it with
`pip install bitsandbytes` (or `pip install loraredux[quant]`).
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import Tensor

from ..quant.bnb import import_bitsandbytes
from .registry import Factors, register_init

__all__ = ["loftq", "nf4_roundtrip"]

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts


def _bitsandbytes_functional() -> ModuleType:
    """`bitsandbytes.functional`, imported on first use (`lx.quant.import_bitsandbytes`).

    Raises:
        ImportError: bitsandbytes is not installed (the message says how to install it).
    """
    return import_bitsandbytes("init 'loftq' (NF4 quantisation)", "bitsandbytes.functional")


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise ValueError(
            f"init 'loftq': block_size must be one of {BLOCK_SIZES} (bitsandbytes' NF4 block sizes; "
            f"QLoRA and PEFT use 64), got {block_size!r}"
        )


def nf4_roundtrip(W: Tensor, block_size: int = 64) -> Tensor:
    """q_N(W): quantise to NF4 with bitsandbytes and dequantise, in W's dtype and on W's device.

    Blockwise absmax NF4 (Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv 2305.14314, §3):
    the row-major flattened weight is cut into blocks of `block_size` values, each block is divided by its absmax
    and rounded to the nearest of the 16 NormalFloat levels, and dequantised as level * absmax. No double
    quantisation of the absmax constants (as PEFT's LoftQ: `Params4bit(..., compress_statistics=False)`).

    The tensor is passed to bitsandbytes flattened, which defines the same blocks: bitsandbytes 0.50.2's CPU
    `dequantize_4bit` kernel mis-places the block scales of a 2-D (m, n) tensor whenever blocks straddle rows
    (e.g. (48, 96) with blocks of 64: relative error 0.28 instead of 0.09), while its 1-D path is right.

    Args:
        W: (...) float tensor (float64 is rounded to float32 first: NF4 takes at most float32).
        block_size: values per absmax block, one of `BLOCK_SIZES`.

    Raises:
        ValueError: a block size bitsandbytes does not support.
        ImportError: bitsandbytes is not installed.
    """
    _check_block_size(block_size)
    F = _bitsandbytes_functional()
    flat = W.detach().reshape(-1).to(torch.float32).contiguous()  # (numel,)
    codes, state = F.quantize_4bit(flat, blocksize=block_size, quant_type="nf4")
    return F.dequantize_4bit(codes, state).reshape(W.shape).to(W.dtype)


_ON_QUANTIZED = (
    "LoftQ quantizes the dense W0 itself, and a quantized layer holds only deq(Q): run on it, LoftQ would quantize "
    "the quantized weight again, a near no-op. On a model loaded in 4-bit, adapt with a non-moving init and call "
    "lx.init.loftq_from_checkpoint_(model, folder) (W0 from the checkpoint); before lx.quantize_, keep the dense "
    "weights and pass them: lx.init.loftq_from_checkpoint_(model, {path: W0})"
)


@register_init(
    "loftq", moves_base=True, exact=False, identity=False, quantized_reason=_ON_QUANTIZED
)
def loftq(
    W0: Tensor, rank: int, scale: float, *, bits: int = 4, iters: int = 1, block_size: int = 64
) -> Factors:
    """LoftQ: the base becomes an NF4-representable Q_T and the adapter its rank-r correction, by alternation.

    Starting from A_0 = B_0 = 0, for t = 1..T (T = `iters`):

        Q_t = q_N(W0 - s B_{t-1} A_{t-1})              (quantise what the adapter does not hold)
        s B_t A_t = SVD_r(W0 - Q_t) = U_r S_r V_r^T      (best rank-r fit of the quantisation error)
        A_t = S_r^{1/2} V_r^T / sqrt(s),  B_t = U_r S_r^{1/2} / sqrt(s)

    and returns base = Q_T, A = A_T, B = B_T, a heuristic descent on min ||W0 - Q - s B A||_F over NF4 matrices Q
    and rank-r s B A. W0 != base + s B A (the quantisation error is not low rank), hence `exact=False` and
    `identity=False`: the model's function changes by W0 - Q_T - s B A at init, which is smaller than the change
    W0 - q_N(W0) that plain quantisation would make.

    Li, Yu, Liang, He, Karampatziakis, Chen, Zhao, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language
    Models", ICLR 2024, arXiv 2310.08659, Algorithm 1 and Eq. (5) (the paper's A_t, B_t with W = Q + A B^T are our
    s B, A^T). Confirmed against the authors' code (github.com/yxli2123/LoftQ, utils.py `loftq_init`: start from
    the unquantised W, blocks of 64, L = U_r S_r^{1/2}, R = S_r^{1/2} V_r^T) and PEFT 0.21's
    `peft.utils.loftq_utils.loftq_init` (bitsandbytes `Params4bit(quant_type="nf4", compress_statistics=False)`,
    default block size 64, `loftq_iter` default 1).

    Differences from PEFT, on purpose:
    - A and B are divided by sqrt(s), so that s B A is the rank-r fit for any alpha (PEFT returns R, L undivided,
      so its adapter adds s times the fit and is right only when alpha = r, as the LoftQ repository configures it).
      PEFT's factors are sqrt(s) times ours; Q_T is the same.
    - NF4 only: PEFT also has `loftq_bits=8` (bitsandbytes' int8 row-wise quantiser), the authors' code 2-bit NF2;
      neither is bitsandbytes NF4, the format a loraredux base is loaded in.
    - Runs on W0's device, CPU included (PEFT's `loftq_init` always moves the weight to CUDA or XPU).
    - Refused on a layer that is already quantized (bitsandbytes): it holds deq(Q), not W0, and q_N(deq(Q)) is
      deq(Q) again up to the rounding of the block scales. `lx.init.loftq_from_checkpoint_` does LoftQ there,
      from W0 read from the checkpoint (or given in memory).

    Notes:
        - Q_T is a fixed point of NF4 with the same block size in float32 and float64: quantising it again gives
          the same codes, absmax and values, so loading the returned base in NF4 (bitsandbytes `Linear4bit`,
          `BitsAndBytesConfig(bnb_4bit_quant_type="nf4")`, no double quantisation, blocks of `block_size` over the
          (out, in) weight) loses nothing. In bfloat16/float16 the codes survive but the absmax is rounded.
        - The error ||W0 - Q_t - s B_t A_t||_F is not guaranteed to fall with t: q_N rescales each block by its
          own absmax, so it is not the Frobenius-nearest NF4 matrix. It usually does; T = 1 (PEFT's default)
          already captures most of the gain.

    Args:
        W0: (out, in) base weight.
        rank: r, 1 <= r <= min(out, in).
        scale: s (alpha / r, or alpha / sqrt(r)); A and B are divided by sqrt(s).
        bits: N; only 4 (NF4 through bitsandbytes).
        iters: T >= 1 alternations (PEFT's `loftq_iter`).
        block_size: values per NF4 absmax block (one of `BLOCK_SIZES`; 64 as QLoRA and PEFT).

    Returns:
        Factors with A (r, in), B (out, r) and base = Q_T (out, in), all in W0's dtype and on its device.

    Raises:
        ValueError: bits other than 4, iters < 1, an unsupported block size, a rank out of range, a non-positive
            scale or a W0 that is not 2-D.
        ImportError: bitsandbytes is not installed.
    """
    if isinstance(bits, bool) or bits != 4:
        raise ValueError(
            f"init 'loftq': bits must be 4 (NF4 through bitsandbytes, the only quantiser supported), got {bits!r}"
        )
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(
            f"init 'loftq': iters must be an integer >= 1 (alternations T), got {iters!r}"
        )
    _check_block_size(block_size)
    if W0.ndim != 2:
        raise ValueError(f"init 'loftq': W0 must be 2-D (out, in), got shape {tuple(W0.shape)}")
    if not 1 <= rank <= min(W0.shape):
        raise ValueError(
            f"init 'loftq': rank must be in [1, min(out, in) = {min(W0.shape)}], got {rank}"
        )
    if not scale > 0:
        raise ValueError(f"init 'loftq': scale must be > 0, got {scale}")

    W = W0.detach().to(torch.float64 if W0.dtype == torch.float64 else torch.float32)  # (out, in)
    fit = torch.zeros_like(W)  # s B_{t-1} A_{t-1}, zero before the first alternation
    for _ in range(iters):
        Q = nf4_roundtrip(W - fit, block_size)  # (out, in) Q_t
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        root = S[:rank].sqrt()  # (r,)
        L = U[:, :rank] * root  # (out, r) the paper's A_t
        R = root[:, None] * Vh[:rank]  # (r, in) the paper's B_t^T
        fit = L @ R  # (out, in) SVD_r(W0 - Q_t)
    inv = 1.0 / math.sqrt(scale)
    return Factors(A=(R * inv).to(W0.dtype), B=(L * inv).to(W0.dtype), base=Q.to(W0.dtype))
