"""The base format of a training run: the frozen weights in fp32 or bf16, or the linear layers quantized to nf4,
fp4 or int8 (QLoRA, Dettmers et al., arXiv 2305.14314) before the adapters go on.

`loraredux train --base`, `loraredux merge --base` and the advisor's verification share this, so a run, its merge
and its verification put the same layers in the same format:

    fp32, bf16       the whole model converted (`model.to(dtype)`), the new head included
    nf4, fp4, int8   `lx.quantize_` on every linear layer (`"all-linear"`: not the output head) except the modules
                     trained in full (a new classification head) and the layers it cannot quantize, which stay
                     dense in the model's dtype and are named: a 4-bit layer whose in_features is not a multiple
                     of the block size (64, QLoRA's; bitsandbytes' CPU kernel misplaces the scales of blocks that
                     straddle rows), and a layer that is not an `nn.Linear` (GPT-2's Conv1D)

The 4-bit layers are QLoRA's (NF4 or FP4 codes, double quantization, blocks of 64) and compute in the model's
dtype, so a model loaded in fp32 trains in fp32 on top of 4-bit weights: the same codes as transformers'
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=..., bnb_4bit_use_double_quant=True,
bnb_4bit_compute_dtype=torch.float32)` (docs/quantized.md).

LoftQ (`init="loftq"`) quantizes the dense W0 itself, so on a quantized layer it is refused (the layer holds only
deq(Q)). `convert_base_(..., keep_weights=True)` keeps the dense W0 of each quantized layer, and `loftq_` then
starts the adapters from them: LoftQ's Algorithm 1 (Li et al., arXiv 2310.08659) from Q_1 = q(W0), the base
`lx.quantize_` made, through `lx.init.loftq_from_checkpoint_` (T = 1 leaves that base as it is).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "BASES",
    "BLOCK_SIZE",
    "BaseFormat",
    "convert_base_",
    "dequantize_",
    "quantization_config",
]

BASES = ("fp32", "bf16", "nf4", "fp4", "int8")
#: values per 4-bit absmax block (QLoRA's, bitsandbytes' and transformers' default)
BLOCK_SIZE = 64
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclasses.dataclass
class BaseFormat:
    """What `convert_base_` did.

    Attributes:
        name: one of `BASES`.
        quantized: the paths of the layers quantized (nf4, fp4, int8), in model order.
        dense: the linear layers left dense, `{path: why}`.
        weights: the dense W0 of each quantized layer, kept for `loftq_` (`keep_weights=True`), else empty;
            `loftq_` drops them.
        loftq: what `loftq_` reported (`lx.init.LoftQReport`), once it ran.
    """

    name: str
    quantized: list[str] = dataclasses.field(default_factory=list)
    dense: dict[str, str] = dataclasses.field(default_factory=dict)
    weights: dict[str, Tensor] = dataclasses.field(default_factory=dict, repr=False)
    loftq: Any = None

    def describe(self) -> str:
        """One line for a log: the format, what was quantized and what stayed dense."""
        if self.name in _DTYPES:
            return f"base {self.name}: the model's weights in {_DTYPES[self.name]}"
        what = f"{len(self.quantized)} linear layers quantized to {self.name}"
        if self.name != "int8":
            what += f" (double quantization, blocks of {BLOCK_SIZE})"
        if self.dense:
            kept = ", ".join(f"{p} ({why})" for p, why in self.dense.items())
            what += f"; left dense: {kept}"
        return f"base {self.name}: {what}"

    def to_dict(self) -> dict[str, Any]:
        """For metrics.json: the format, the quantized count, the dense layers and LoftQ's errors."""
        out: dict[str, Any] = {"format": self.name}
        if self.name not in _DTYPES:
            out |= {"quantized_layers": len(self.quantized), "dense_layers": dict(self.dense)}
            if self.name != "int8":
                out |= {"block_size": BLOCK_SIZE, "double_quant": True}
        if self.loftq is not None:
            out["loftq"] = {
                "error_qlora": self.loftq.aggregate("base_error"),
                "error_loftq": self.loftq.aggregate("error"),
                "rolled_back": self.loftq.rolled_back,
            }
        return out

    def deferred_loftq(self, config: Any) -> tuple[Any, int | None]:
        """(the config to adapt with, LoftQ's T or None): on a quantized base, `init="loftq"` becomes the method's
        default init, and `loftq_(model, T)` sets the factors after adapting; elsewhere the config as it is.

        Raises:
            ValueError: LoftQ options that name another quantizer than the base's (`bits`, `block_size`).
        """
        if not self.quantized or getattr(config, "init", None) != "loftq":
            return config, None
        options = dict(getattr(config, "init_options", None) or {})
        other = {k: v for k, v in options.items() if k != "iters"}
        if other.get("bits", 4) != 4 or other.get("block_size", BLOCK_SIZE) != BLOCK_SIZE:
            raise ValueError(
                f"init 'loftq' on a {self.name} base corrects that base's own quantization (blocks of "
                f"{BLOCK_SIZE}), so its options {other} do not apply; give only iters"
            )
        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        return (
            dataclasses.replace(config, init=defaults["init"], init_options={}),
            int(options.get("iters", 1)),
        )

    def loftq_(self, model: nn.Module, iters: int = 1) -> Any:
        """LoftQ on the adapted model from the dense weights kept before quantizing; the weights are dropped after.

        s B A = SVD_r(W0 - deq(Q)) for every adapted quantized layer (T = 1; T > 1 re-quantizes the base, see
        `lx.init.loftq_from_checkpoint_`); an adapted layer left dense keeps its init (W0 - Q = 0 there: nothing to
        correct, so it is rolled back).

        Raises:
            ValueError: no dense weights were kept (`convert_base_(..., keep_weights=True)`), or what
                `loftq_from_checkpoint_` refuses (a method without a free (A, B) pair, a moved base).
        """
        from .init.loftq_checkpoint import loftq_from_checkpoint_
        from .state import adapters

        if not self.weights:
            raise ValueError(
                "LoftQ on a quantized base needs the dense weights from before quantizing: "
                "convert_base_(..., keep_weights=True)"
            )
        weights = dict(self.weights)
        for path, adapter in adapters(model):
            if path not in weights:  # left dense: its W0 is its own weight
                weights[path] = adapter.view.module.weight
        try:  # loftq_from_checkpoint_ runs without autograd itself
            self.loftq = loftq_from_checkpoint_(model, weights, iters=iters)
        finally:
            self.weights.clear()
        return self.loftq


def _why_dense(module: nn.Module, fmt: str) -> str | None:
    """Why `lx.quantize_` cannot take this linear layer, or None when it can."""
    if type(module) is not nn.Linear:
        return f"a {type(module).__name__}, not an nn.Linear"
    if fmt != "int8" and module.in_features % BLOCK_SIZE:
        return f"in_features {module.in_features} is not a multiple of {BLOCK_SIZE}"
    return None


def convert_base_(
    model: nn.Module, base: str, *, keep: Sequence[str] = (), keep_weights: bool = False
) -> BaseFormat:
    """Put a dense model's base into `base`, in place (the module docstring says what each format does).

    Args:
        model: a model not yet adapted, in a float dtype.
        base: one of `BASES`.
        keep: module names trained in full (`modules_to_save`, suffix-matched as there): never quantized.
        keep_weights: keep the dense W0 of each quantized layer (for `BaseFormat.loftq_`).

    Returns:
        A `BaseFormat` naming the quantized and the dense layers.

    Raises:
        ValueError: an unknown format, or what `lx.quantize_` refuses (the model is then unchanged).
        ImportError: a quantized format without bitsandbytes.
    """
    from .quant import quantize_
    from .targets import select

    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {base!r}")
    if base in _DTYPES:
        model.to(_DTYPES[base])
        return BaseFormat(base)
    kept = [
        n
        for n, _ in model.named_modules()
        if n and any(n == k or n.endswith("." + k) for k in keep)
    ]
    dense: dict[str, str] = {}
    paths = []
    for path in select(model, "all-linear"):
        if any(path == k or path.startswith(k + ".") for k in kept):
            continue  # trained in full, so stays dense (not named: it is no frozen base)
        why = _why_dense(model.get_submodule(path), base)
        if why is None:
            paths.append(path)
        else:
            dense[path] = why
    weights = {p: model.get_submodule(p).weight for p in paths} if keep_weights else {}
    if paths:
        quantize_(model, base, paths, block_size=BLOCK_SIZE)
    return BaseFormat(base, paths, dense, weights)


def dequantize_(model: nn.Module) -> list[str]:
    """Replace every quantized layer left in `model` (not adapted) by a dense `nn.Linear` in the layer's dtype
    carrying deq(Q), the weight its own forward computes with; returns their paths. After `lx.merge_` of a model on
    a quantized base, this gives a dense model computing what the adapted one did (`loraredux merge`).
    """
    from .bases import view_of
    from .quant import is_quantized

    paths = [n for n, m in model.named_modules() if n and is_quantized(m)]
    with torch.no_grad():
        for path in paths:
            view = view_of(model.get_submodule(path))
            parent, _, leaf = path.rpartition(".")
            setattr(
                model.get_submodule(parent) if parent else model, leaf, view.rebuilt(view.weight())
            )
    return paths


def quantization_config(model: nn.Module, base: str) -> Any:
    """transformers' `BitsAndBytesConfig` that reloads `model`, quantized in `base` as `convert_base_` does, from
    the checkpoint `save_pretrained` writes (set it as `model.config.quantization_config` before saving): the
    format's settings, and every linear layer left dense named in `llm_int8_skip_modules` (an exact pattern each).

    Raises:
        ValueError: `base` is not a quantized format.
    """
    import re

    from transformers import BitsAndBytesConfig

    from .bases import is_linear
    from .quant import compute_dtype, is_quantized

    if base in _DTYPES or base not in BASES:
        raise ValueError(f"a quantization config is for nf4, fp4 or int8, got {base!r}")
    dense = [re.escape(n) for n, m in model.named_modules() if is_linear(m) and not is_quantized(m)]
    if base == "int8":  # lx.quantize_'s Linear8bitLt has no outlier threshold
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=0.0, llm_int8_skip_modules=dense
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=base,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=next(
            (compute_dtype(m) for m in model.modules() if is_quantized(m)), torch.float32
        ),
        llm_int8_skip_modules=dense,
    )
