"""`lx.quantize_`: replace a model's nn.Linear layers by bitsandbytes quantized layers, checked first."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .bnb import Bitsandbytes, import_bitsandbytes
from .formats import BLOCK_SIZES, DTYPES, FORMATS, format_of, is_quantized

__all__ = ["quantize_"]


def _check_arguments(
    fmt: str, double_quant: bool, block_size: int, compute_dtype: torch.dtype | None
) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"quantize_: fmt must be one of {FORMATS}, got {fmt!r}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"quantize_: double_quant must be True or False, got {double_quant!r}")
    if fmt != "int8" and (isinstance(block_size, bool) or block_size not in BLOCK_SIZES):
        raise ValueError(
            f"quantize_: block_size must be one of {BLOCK_SIZES} (bitsandbytes' 4-bit block sizes; QLoRA uses "
            f"64), got {block_size!r}"
        )
    if compute_dtype is not None and compute_dtype not in DTYPES:
        raise ValueError(
            f"quantize_: compute_dtype must be None (the layer's dtype) or one of {DTYPES}, got {compute_dtype!r}"
        )
    if fmt == "int8" and compute_dtype is not None:
        raise ValueError(
            "quantize_: an int8 layer computes in its input's dtype, so compute_dtype applies to nf4 / fp4 only; "
            "leave it None"
        )


def _check_layer(
    path: str, module: nn.Module, fmt: str, block_size: int, owners: Mapping[int, list[str]]
) -> None:
    """Raise naming the layer, what is wrong and what is expected, if it cannot be quantized to `fmt`."""
    from ..core import nonfinite_count

    if is_quantized(module):
        raise ValueError(f"quantize_: {path!r} is already quantized ({format_of(module)})")
    if type(module) is not nn.Linear:
        raise TypeError(
            f"quantize_: {path!r} is a {type(module).__name__}; quantize_ replaces torch.nn.Linear layers only "
            "(exclude it, or name the Linear layers in targets)"
        )
    W = module.weight
    if W.dtype not in DTYPES:
        raise ValueError(
            f"quantize_: {path!r} holds a {W.dtype} weight; bitsandbytes quantizes float32, bfloat16 or float16 "
            "weights (convert the model first, e.g. model.to(torch.float32))"
        )
    if W.is_meta:
        raise ValueError(f"quantize_: {path!r} is on the meta device; load its weights first")
    shared = [p for p in owners.get(id(W), []) if p != path]
    if shared:
        raise ValueError(
            f"quantize_: {path!r} shares its weight with {shared}; quantizing it would untie them "
            "(exclude it)"
        )
    bad = nonfinite_count(W)
    if bad:
        raise ValueError(f"quantize_: {path!r} holds {bad} NaN or infinite weight value(s)")
    if fmt == "int8":
        biggest = float(W.detach().abs().max()) if W.numel() else 0.0
        if biggest > torch.finfo(torch.float16).max:
            raise ValueError(
                f"quantize_: {path!r} has a weight of magnitude {biggest:.3g}; bitsandbytes' int8 quantizer "
                f"goes through float16, whose largest value is {torch.finfo(torch.float16).max:.0f}"
            )
    elif module.in_features % block_size:
        fits = [b for b in BLOCK_SIZES if module.in_features % b == 0]
        raise ValueError(
            f"quantize_: {path!r} has in_features = {module.in_features}, not a multiple of block_size = "
            f"{block_size}: each block of absmax scaling must lie within one row of W (out, in), as "
            "bitsandbytes' CPU dequantization places the scales of blocks that straddle rows wrongly; use "
            f"block_size in {fits}" + ("" if fits else " (none fits: exclude the layer)")
        )


def quantize_(
    model: nn.Module,
    fmt: str = "nf4",
    targets: str | list[str] = "all-linear",
    *,
    exclude: str | list[str] | None = None,
    double_quant: bool = True,
    block_size: int = 64,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Replace the target `nn.Linear` layers of `model` by bitsandbytes quantized layers, in place.

    nf4 / fp4: `Linear4bit` with `quant_type=fmt`, `compress_statistics=double_quant`, blocks of `block_size`
    (QLoRA's NF4 with double quantization is the default); int8: `Linear8bitLt(has_fp16_weights=False)`
    (row-wise absmax). The codes are bitsandbytes' own (`bitsandbytes.functional.quantize_4bit` of the weight),
    computed on the layer's device. Every layer is checked before any is replaced: on an error the model is
    unchanged.

    Args:
        model: any model, not yet adapted.
        fmt: "nf4", "fp4" or "int8".
        targets: as `lx.adapt_`: "all-linear" (every nn.Linear but the output head), a regex or module names.
        exclude: modules to leave dense, in the same forms.
        double_quant: quantize the 4-bit absmax scales again (8-bit, blocks of 256); ignored for int8.
        block_size: values per 4-bit absmax block, one of `BLOCK_SIZES`, dividing each layer's in_features;
            ignored for int8.
        compute_dtype: the dtype a 4-bit layer dequantizes into and multiplies in; None: the layer's dtype.

    Returns:
        The same model.

    Raises:
        ImportError: bitsandbytes is not installed.
        ValueError / TypeError: a bad argument, or a layer that cannot be quantized (named, with what is wrong
            and what is expected): already quantized, not an nn.Linear, a dtype other than float32 / bfloat16 /
            float16, NaN / Inf, a block size that does not divide in_features, a weight shared with another
            module; or a model that is already adapted.
    """
    from ..state import adapters
    from ..targets import select

    _check_arguments(fmt, double_quant, block_size, compute_dtype)
    import_bitsandbytes("lx.quantize_")
    adapted = [p for p, _ in adapters(model)]
    if adapted:
        raise ValueError(
            f"quantize_: the model is already adapted ({adapted[:3]}); quantize first, then lx.adapt_"
        )
    paths = select(model, targets, exclude)
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        w = m._parameters.get("weight")
        if w is not None:
            owners.setdefault(id(w), []).append(name)
    for path in paths:
        _check_layer(path, model.get_submodule(path), fmt, block_size, owners)
    backend = Bitsandbytes()
    built = {}
    for path in paths:  # build every layer before replacing any
        linear = model.get_submodule(path)
        dtype = compute_dtype or linear.weight.dtype
        built[path] = backend.build(linear, fmt, block_size, double_quant, dtype)
    for path, layer in built.items():
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, layer)
    return model
