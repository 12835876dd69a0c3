"""The protocol a quantizer implements for loraredux (`QuantizedFormat`), and a layer's stored weight."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch
from torch import Tensor, nn

__all__ = ["QuantizedFormat", "StoredWeight"]


@dataclasses.dataclass
class StoredWeight:
    """What holds a quantized layer's W0: its weight parameter (the codes, with their quantization state) and the
    side state the format keeps on the module. Installing it back (`QuantizedFormat.install`) restores the layer's
    weight bit for bit."""

    weight: nn.Parameter
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


class QuantizedFormat(Protocol):
    """What the library needs of a quantizer (one implementation: `Bitsandbytes`)."""

    def format_of(self, module: nn.Module) -> str | None:
        """ "nf4", "fp4", "int8", ... for a layer of this quantizer, else None (never imports the quantizer)."""

    def check(self, module: nn.Module) -> None:
        """Raise TypeError, naming the problem, if the layer cannot be adapted (e.g. not quantized yet)."""

    def layer_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype of the layer's inputs and outputs."""

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype the layer dequantizes into and multiplies in."""

    def dequantize(
        self, module: nn.Module, dtype: torch.dtype, stored: StoredWeight | None = None
    ) -> Tensor:
        """W0 (out, in) in `dtype`, computed as the layer's own forward computes it, from `stored` (a weight the
        layer held, by default its current one)."""

    def stored(self, module: nn.Module) -> StoredWeight:
        """The layer's weight as it is now (to install back later)."""

    def quantize_like(self, module: nn.Module, weight: Tensor) -> StoredWeight:
        """`weight` (out, in) quantized as the layer's own weight is (format, blocks, statistics, storage, device);
        the layer itself is not changed."""

    def install(self, module: nn.Module, stored: StoredWeight) -> None:
        """Make `stored` the layer's weight."""

    def build(
        self, linear: nn.Linear, fmt: str, block_size: int, double_quant: bool, dtype: torch.dtype
    ) -> nn.Module:
        """A quantized copy of a dense `nn.Linear` (its bias copied; `linear` is not changed)."""

    def like(self, module: nn.Module) -> nn.Module:
        """An empty layer of the same format and settings as `module`, to `install` a weight into."""
