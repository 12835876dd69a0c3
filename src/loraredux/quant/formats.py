"""Which quantizer a layer belongs to, and the helpers the rest of the library uses on a quantized layer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .bnb import Bitsandbytes
from .protocol import QuantizedFormat

__all__ = [
    "BLOCK_SIZES",
    "DTYPES",
    "FORMATS",
    "backend_of",
    "compute_dtype",
    "dequantize",
    "format_of",
    "is_quantized",
    "layer_dtype",
    "quantized_like",
]

FORMATS = ("nf4", "fp4", "int8")
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what bitsandbytes quantizes from

_FORMATS: tuple[QuantizedFormat, ...] = (Bitsandbytes(),)


def _backend(module: nn.Module) -> QuantizedFormat | None:
    for backend in _FORMATS:
        if backend.format_of(module) is not None:
            return backend
    return None


def backend_of(module: nn.Module) -> QuantizedFormat | None:
    """The quantizer of a quantized layer, None for any other module."""
    return _backend(module)


# ----------------------------------------------------------------------------------------------- helpers


def format_of(module: nn.Module) -> str | None:
    """ "nf4", "fp4" or "int8" for a quantized linear layer, None for any other module."""
    backend = _backend(module)
    return None if backend is None else backend.format_of(module)


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is a quantized linear layer (bitsandbytes `Linear4bit` / `Linear8bitLt`)."""
    return _backend(module) is not None


def _require(module: nn.Module) -> QuantizedFormat:
    backend = _backend(module)
    if backend is None:
        raise TypeError(
            f"{type(module).__name__} is not a quantized layer (Linear4bit or Linear8bitLt)"
        )
    return backend


def layer_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a quantized layer's inputs and outputs: the dtype of the 4-bit weight it was quantized from;
    for int8 (which computes in its input's dtype) `module.compute_dtype` where `lx.quantize_` recorded it, else
    the bias's dtype, else float32 (set `layer.compute_dtype` on a bias-free int8 layer of a 16-bit model).

    Raises:
        TypeError: `module` is not a quantized layer.
    """
    return _require(module).layer_dtype(module)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a quantized layer dequantizes into and multiplies in (`layer_dtype` where it sets none).

    Raises:
        TypeError: `module` is not a quantized layer.
    """
    return _require(module).compute_dtype(module)


@torch.no_grad()
def dequantize(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """W0 (out, in) of a quantized layer, as its own forward computes it, in `dtype` (default: its compute dtype).

    Raises:
        TypeError: `module` is not a quantized layer.
    """
    backend = _require(module)
    return backend.dequantize(module, dtype or backend.compute_dtype(module))


@torch.no_grad()
def quantized_like(module: nn.Module, weight: Tensor) -> nn.Module:
    """A new quantized layer like `module` (format, block size, double quantization, compute dtype, storage,
    device, bias) holding `weight` (out, in); `module` is not changed.

    Raises:
        TypeError: `module` is not a quantized layer.
        ValueError: `weight` is not (out, in) of `module`.
    """
    backend = _require(module)
    if tuple(weight.shape) != (module.out_features, module.in_features):
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} for a layer of (out, in) = "
            f"({module.out_features}, {module.in_features})"
        )
    layer = backend.like(module)
    backend.install(layer, backend.quantize_like(module, weight))
    return layer
