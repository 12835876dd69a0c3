"""bitsandbytes behind the `QuantizedFormat` protocol: its `Linear4bit` (nf4, fp4) and `Linear8bitLt` (int8) layers,
and its lazy import (`pip install loraredux[quant]`).
"""

from __future__ import annotations

import copy
import importlib
import logging
import sys
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from .protocol import StoredWeight

__all__ = ["Bitsandbytes", "import_bitsandbytes"]

# Recent bitsandbytes (0.50.2 here) tries, at import and on CPUs with AVX512-BF16 only, to fetch a fused CPU 4-bit
# GEMV kernel from the Hugging Face Hub through the optional `kernels` package, and logs a warning when that fails.
# Its fallback is the CPU kernel bundled in bitsandbytes, and quantize/dequantize never use the fused one
# (bitsandbytes/backends/cpu/ops.py; bitsandbytes PR #1972), so the usual failures are noise for us: `kernels` absent,
# or present (transformers depends on it) but unable to reach the Hub or to verify the kernel's publisher (offline,
# or not trusted without `trust_remote_code`). Any other failure (a broken `kernels`) still shows.
_KERNELS_LOGGER = "bitsandbytes.backends.cpu.ops"
_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _expected_kernels_failure(exc: object) -> bool:
    """`kernels` is not installed, the Hub cannot be reached (an OSError: connection, offline cache miss), or the
    kernel's publisher cannot be verified or trusted (the ValueError of `kernels`' trust check)."""
    if isinstance(exc, ModuleNotFoundError):
        return exc.name == "kernels"
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, ValueError) and "publisher" in str(exc) and "trust" in str(exc)


class _MissingKernelsFilter(logging.Filter):
    """Drops the warning for the expected failures (`_expected_kernels_failure`); any other still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(_KERNELS_MESSAGE):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        return not (args and _expected_kernels_failure(args[0]))


def import_bitsandbytes(purpose: str, name: str = "bitsandbytes") -> ModuleType:
    """`bitsandbytes` (or one of its modules, `name`), imported on first use.

    Args:
        purpose: what needs it, for the error message (e.g. "lx.quantize_").
        name: the module to import.

    Raises:
        ImportError: bitsandbytes is not installed (the message says how to install it).
    """
    log = logging.getLogger(_KERNELS_LOGGER)
    quiet = _MissingKernelsFilter()
    log.addFilter(quiet)  # only for the import, which is when the message is logged
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != "bitsandbytes":
            raise  # bitsandbytes is there but one of its own imports failed: show that error
        raise ImportError(
            f"{purpose} needs bitsandbytes, which is not installed: "
            "pip install bitsandbytes (or pip install loraredux[quant])"
        ) from exc
    finally:
        log.removeFilter(quiet)


class Bitsandbytes:
    """bitsandbytes' `Linear4bit` (nf4, fp4) and `Linear8bitLt` (int8) layers, on any device bitsandbytes runs on.

    Notes on bitsandbytes 0.50.2 on CPU (what the choices below follow):
    - `Linear4bit`'s own forward dequantizes with `dequantize_4bit` into the compute dtype and calls `F.linear`
      (outside inference), so `dequantize` reproduces its W0 exactly.
    - On CPUs with AVX512-BF16, an eval-mode `Linear4bit` called without autograd repacks its codes in place for a
      bfloat16 kernel (bfloat16 scales: its outputs move by about 1e-2, relative) and fails for an out size that is
      not a multiple of 32. Layers made here turn that off (`support_avx512bf16_for_cpu = False`), so they compute
      what `dequantize` gives and keep their codes; a layer bitsandbytes repacked is still dequantized right.
    - `Linear8bitLt` moves its codes and scales from the weight to `module.state` on its first forward; both
      places are read and restored.
    """

    def _nn(self) -> ModuleType | None:
        return sys.modules.get(
            "bitsandbytes.nn"
        )  # a bitsandbytes layer exists only once this is imported

    def format_of(self, module: nn.Module) -> str | None:
        bnn = self._nn()
        if bnn is None:
            return None
        if isinstance(module, bnn.Linear4bit):
            return str(getattr(module.weight, "quant_type", "fp4"))
        if isinstance(module, bnn.Linear8bitLt):
            return "int8"
        return None

    def check(self, module: nn.Module) -> None:
        fmt = self.format_of(module)
        w = module.weight
        if fmt == "int8":
            if module.state.has_fp16_weights or w.dtype != torch.int8:
                raise TypeError(
                    "cannot adapt a Linear8bitLt that holds float weights (has_fp16_weights=True or not yet "
                    "quantized): quantize it first (has_fp16_weights=False, then .to(device))"
                )
        elif getattr(w, "quant_state", None) is None or not getattr(w, "bnb_quantized", False):
            raise TypeError(
                "cannot adapt a Linear4bit that is not quantized yet: move it to a device first (.to(device))"
            )

    def layer_dtype(self, module: nn.Module) -> torch.dtype:
        if self.format_of(module) == "int8":
            # Linear8bitLt computes in its input's dtype; quantize_ records it, else the bias tells, else float32.
            recorded = getattr(module, "compute_dtype", None)
            if isinstance(recorded, torch.dtype):
                return recorded
            return module.bias.dtype if module.bias is not None else torch.float32
        state = module.weight.quant_state
        return (
            getattr(state, "original_dtype", state.dtype) if _packed(module.weight) else state.dtype
        )

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        if self.format_of(module) == "int8":
            return self.layer_dtype(module)
        return getattr(module, "compute_dtype", None) or self.layer_dtype(module)

    def dequantize(
        self, module: nn.Module, dtype: torch.dtype, stored: StoredWeight | None = None
    ) -> Tensor:
        stored = stored or self.stored(module)
        w = stored.weight
        if self.format_of(module) == "int8":
            scb = stored.extra["SCB"]
            scb = stored.extra["state.SCB"] if scb is None else scb
            # (out,) row absmax; as MatMul8bitFp (bitsandbytes' CPU/XPU training path) forms W: CB * (SCB / 127)
            return w.data.to(dtype).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
        F = import_bitsandbytes("dequantizing a 4-bit layer", "bitsandbytes.functional")
        codes, state = _unpacked(w) if _packed(w) else (w.data, w.quant_state)
        absmax = state.absmax
        # as bitsandbytes' gemm_4bit: absmax = dequantize_blockwise(8-bit absmax) + offset
        if state.nested:
            absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            codes.reshape(-1, 1),
            absmax.float(),
            state.blocksize,
            state.quant_type,
            state.shape,
            dtype,
        )  # (out, in)

    def stored(self, module: nn.Module) -> StoredWeight:
        w = module.weight
        if self.format_of(module) == "int8":
            st = module.state
            return StoredWeight(
                w, {"CB": w.CB, "SCB": w.SCB, "state.CB": st.CB, "state.SCB": st.SCB}
            )
        return StoredWeight(w, {"quant_state": getattr(module, "quant_state", None)})

    def quantize_like(self, module: nn.Module, weight: Tensor) -> StoredWeight:
        w = module.weight
        data = weight.detach().to(self.layer_dtype(module))
        if self.format_of(module) == "int8":
            return self._int8(data, w.device)
        return self._4bit(
            data, w.device, w.blocksize, w.compress_statistics, w.quant_type, w.quant_storage
        )

    def _4bit(
        self,
        data: Tensor,
        device: torch.device,
        block_size: int,
        double_quant: bool,
        quant_type: str,
        storage: torch.dtype,
    ) -> StoredWeight:
        bnn = import_bitsandbytes("quantizing a weight", "bitsandbytes.nn")
        new = bnn.Params4bit(
            data.contiguous(),
            requires_grad=False,
            blocksize=block_size,
            compress_statistics=double_quant,
            quant_type=quant_type,
            quant_storage=storage,
        ).to(device)  # quantizes; no module yet, so no layer is touched
        return StoredWeight(new, {"quant_state": new.quant_state})

    def _int8(self, data: Tensor, device: torch.device) -> StoredWeight:
        bnn = import_bitsandbytes("quantizing a weight", "bitsandbytes.nn")
        # Int8Params quantizes when it moves from the CPU to a device (itself included)
        new = bnn.Int8Params(data.cpu().contiguous(), requires_grad=False, has_fp16_weights=False)
        new = new.to(device)
        return StoredWeight(
            new, {"CB": new.CB, "SCB": new.SCB, "state.CB": None, "state.SCB": None}
        )

    def install(self, module: nn.Module, stored: StoredWeight) -> None:
        module.weight = stored.weight
        if self.format_of(module) == "int8":
            stored.weight.CB, stored.weight.SCB = stored.extra["CB"], stored.extra["SCB"]
            module.state.CB, module.state.SCB = stored.extra["state.CB"], stored.extra["state.SCB"]
            return
        stored.weight.module = module
        module.quant_state = stored.extra["quant_state"]

    def build(
        self, linear: nn.Linear, fmt: str, block_size: int, double_quant: bool, dtype: torch.dtype
    ) -> nn.Module:
        bnn = import_bitsandbytes("lx.quantize_", "bitsandbytes.nn")
        W = linear.weight.detach()
        has_bias = linear.bias is not None
        if fmt == "int8":
            layer = bnn.Linear8bitLt(
                linear.in_features,
                linear.out_features,
                has_bias,
                has_fp16_weights=False,
                device="meta",
            )
            layer.compute_dtype = W.dtype  # it computes in its input's dtype: the layer's
            stored = self._int8(W, W.device)
        else:
            layer = bnn.Linear4bit(
                linear.in_features,
                linear.out_features,
                has_bias,
                compute_dtype=dtype,
                compress_statistics=double_quant,
                quant_type=fmt,
                device="meta",
            )
            stored = self._4bit(W, W.device, block_size, double_quant, fmt, torch.uint8)
        self._keep_layout(layer)
        self.install(layer, stored)
        if has_bias:
            # A 4-bit layer adds its bias in the compute dtype and casts it there in place on its first forward;
            # cast now, so that the bias does not change dtype later.
            bias = linear.bias.detach().to(dtype if fmt != "int8" else W.dtype).clone()
            layer.bias = nn.Parameter(bias, linear.bias.requires_grad)
        return layer.train(linear.training)

    def like(self, module: nn.Module) -> nn.Module:
        bnn = import_bitsandbytes("quantizing a weight", "bitsandbytes.nn")
        has_bias = module.bias is not None
        if self.format_of(module) == "int8":
            layer = bnn.Linear8bitLt(
                module.in_features,
                module.out_features,
                has_bias,
                has_fp16_weights=False,
                threshold=module.state.threshold,
                device="meta",
            )
            layer.compute_dtype = self.layer_dtype(module)
        else:
            layer = bnn.Linear4bit(
                module.in_features,
                module.out_features,
                has_bias,
                compute_dtype=getattr(module, "compute_dtype", None),
                compress_statistics=module.weight.compress_statistics,
                quant_type=module.weight.quant_type,
                quant_storage=module.weight.quant_storage,
                device="meta",
            )
        self._keep_layout(layer)
        if has_bias:
            layer.bias = nn.Parameter(module.bias.detach().clone(), module.bias.requires_grad)
        return layer.train(module.training)

    @staticmethod
    def _keep_layout(layer: nn.Module) -> None:
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False  # see the class docstring


def _packed(w: Tensor) -> bool:
    return bool(getattr(getattr(w, "quant_state", None), "packing_format_for_cpu", False))


def _unpacked(w: Tensor) -> tuple[Tensor, Any]:
    """The codes and quantization state of a `Params4bit` that bitsandbytes repacked for its CPU bfloat16 kernel,
    in the standard layout, computed on copies (bitsandbytes' own inverse works in place)."""
    F = import_bitsandbytes("dequantizing a 4-bit layer", "bitsandbytes.functional")
    state = copy.deepcopy(w.quant_state)
    codes, state = F._convert_weight_packed_for_cpu_inverse(w.data, state)
    if (
        state.absmax.dim() == 2
    ):  # without double quantization the inverse leaves the scales transposed
        state.absmax = state.absmax.T.reshape(-1).float()
    return codes, state
