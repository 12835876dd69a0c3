"""Quantized bases: `lx.quantize_`, the helpers the rest of the library uses, and the requantizing merge.

Training an adapter on a 4-bit or 8-bit base (QLoRA, Dettmers et al., arXiv 2305.14314) needs nothing special from
the methods: `bases.py` gives a quantized layer a view like any other, whose `weight()` dequantizes W0 (out, in) on
demand. This module holds what that view and `lx.quantize_` need, with bitsandbytes behind one small protocol
(`QuantizedFormat`: detect, dequantize, store, quantize like), so that another quantizer is one more class.

Formats: bitsandbytes `Linear4bit` ("nf4" / "fp4": blockwise absmax codes, optionally with the absmax quantized
again, "double quantization") and `Linear8bitLt` ("int8": LLM.int8()'s row-wise absmax codes, arXiv 2208.07339).
Layers made by `lx.quantize_` and layers loaded by transformers with `BitsAndBytesConfig(load_in_4bit=True)` /
`load_in_8bit=True` are the same bitsandbytes modules and are handled alike.

Two dtypes matter for a quantized layer. Its *dtype* is that of its inputs and outputs (the dtype of the weight it
was quantized from; for int8, see `layer_dtype`): the view presents W0 in it, adapters are built in it and a merge
returns a dense layer in it. Its *compute dtype* is the one bitsandbytes dequantizes into and multiplies in
(`Linear4bit.compute_dtype`). `lx.quantize_` makes them equal by default; transformers' default compute dtype is
float32 whatever the model's dtype.

bitsandbytes is imported on first use (`pip install loraredux[quant]`); a model without quantized layers never
imports it.

Files: `protocol.py` (what a quantizer implements), `bnb.py` (bitsandbytes), `formats.py` (the helpers:
`format_of`, `dequantize`, `quantized_like`, ...), `quantize.py` (`lx.quantize_`); the requantizing merge is here.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import torch
from torch import nn

from .bnb import Bitsandbytes, import_bitsandbytes
from .formats import (
    BLOCK_SIZES,
    DTYPES,
    FORMATS,
    backend_of,
    compute_dtype,
    dequantize,
    format_of,
    is_quantized,
    layer_dtype,
    quantized_like,
)
from .protocol import QuantizedFormat, StoredWeight
from .quantize import quantize_

__all__ = [
    "BLOCK_SIZES",
    "DTYPES",
    "FORMATS",
    "REQUANTIZE_WARN",
    "Bitsandbytes",
    "QuantizedFormat",
    "StoredWeight",
    "backend_of",
    "compute_dtype",
    "dequantize",
    "format_of",
    "import_bitsandbytes",
    "is_quantized",
    "layer_dtype",
    "merge_requantized",
    "quantize_",
    "quantized_like",
]

logger = logging.getLogger(__name__)

#: A merged layer whose requantization loses more than this fraction of ||ΔW|| is named in a warning.
REQUANTIZE_WARN = 0.5


def merge_requantized(model: nn.Module) -> dict[str, float]:
    """Merge every adapter (as `lx.merge_`) and quantize each merged layer back into its base's format.

    For each layer, with W' the adapted weight and W0 the base weight before adaptation (dequantized), the
    requantization error relative to what the adapter changed,

        e = ||deq(q(W')) - W'||_F / ||W' - W0||_F,

    is logged at INFO, and one warning names every layer where e > 0.5: there the requantized model has lost
    most of the adapter. That is the usual case for a small update, as the quantization step of W' is about as
    large as ΔW (PEFT's merge into a 4-bit base re-quantizes this way). `lx.merge_(model)` instead gives dense
    layers whose outputs equal the adapted model's; `lx.merge_(model, requantize=True)` calls this function.

    Returns:
        `{path: e}` for every merged layer (inf where ΔW = 0 but requantizing changed W').

    Raises:
        ValueError: no adapter, or an adapted layer whose base was not quantized (all are named); the model is
            then unchanged.
    """
    from ..verbs import _merge

    errors: dict[str, float] = {}

    def build(layers: list[tuple[str, Any]]) -> dict[str, nn.Module]:
        dense = [p for p, a in layers if not getattr(a.view, "quantized", False)]
        if dense:
            raise ValueError(
                "requantize=True quantizes each merged layer into its base's format, but these adapted layers "
                f"have a base that was never quantized: {dense}; merge them without requantize"
            )
        built = {}
        with torch.no_grad():
            for path, adapter in layers:
                W1 = adapter.effective_weight().detach()  # (out, in) W'
                W0 = adapter.view.original_weight()  # (out, in) the base before adaptation
                built[path] = quantized_like(adapter.base, W1)
                back = dequantize(built[path], W1.dtype)
                err = float(torch.linalg.matrix_norm((back - W1).double()))
                delta = float(torch.linalg.matrix_norm((W1 - W0).double()))
                errors[path] = err / delta if delta > 0 else (math.inf if err > 0 else 0.0)
        return built

    _merge(model, build)
    for path, e in errors.items():
        logger.info("%s: requantized merge error ||deq(q(W')) - W'|| / ||ΔW|| = %.3g", path, e)
    lost = {p: e for p, e in errors.items() if e > REQUANTIZE_WARN}
    if lost:
        listed = ", ".join(f"{p} ({e:.2f})" for p, e in lost.items())
        warnings.warn(
            f"requantizing the merged weights lost more than {REQUANTIZE_WARN:.0%} of the adapter's change "
            f"(||deq(q(W')) - W'|| / ||ΔW||) in {len(lost)} of {len(errors)} layer(s): {listed}. Merge without "
            "requantize (dense layers that keep the adapter exactly) or serve the adapter unmerged.",
            stacklevel=2,
        )
    return errors
