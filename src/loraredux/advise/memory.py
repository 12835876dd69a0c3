"""The memory model (issue 8, first part): the bytes of a fine-tuning setup from a transformers config alone.

The model is built on PyTorch's meta device (shapes, no storage: exact parameter counts for any architecture
transformers knows, in a fraction of a second) and adapted there with the chosen method, so the counts are the
library's own, not a per-architecture formula. Then:

    base        every base parameter at its format's width: fp32 4 bytes, bf16 / fp16 2; with int8 or nf4 the
                linear layers' weights are quantized and everything else (embeddings, norms, biases, the output
                head) stays at 16 bits
                    int8:  1 byte per weight + one fp32 scale per output row (LLM.int8's row-wise absmax)
                    nf4:   4 bits per weight + the absmax constants of blocks of 64: fp32 (0.5 bit per weight), or
                           with double quantization 8-bit constants with an fp32 per 256 blocks
                           (8/64 + 32/(64 * 256) = 0.127 bit per weight; Dettmers et al., QLoRA, arXiv 2305.14314)
    adapters    the trainable parameters at `adapter_bytes_per` (fp32 by default)
    gradients   one gradient per trainable parameter, at the same width
    optimizer   `OPTIMIZER_STATES[optimizer]` states per trainable parameter, at the same width (AdamW: 2)

Activations depend on the batch, the sequence length and what autograd keeps; they are the next part of this model
(issue 8) and are not counted here.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["BASE_FORMATS", "OPTIMIZER_STATES", "MemoryEstimate", "estimate_memory", "meta_model"]

#: bits per base parameter outside quantized linear weights, and the format's own width for those weights
BASE_FORMATS = ("fp32", "bf16", "fp16", "int8", "nf4")
#: optimizer states kept per trainable parameter
OPTIMIZER_STATES: dict[str, int] = {
    "adamw": 2,
    "loraplus": 2,
    "scaled_adamw": 2,
    "sgd": 0,
    "scaled_sgd": 0,
}
_HEADS = ("lm_head", "classifier", "score")  # output heads stay unquantized


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by part (see the module docstring), and the counts they come from."""

    base_bytes: int
    adapter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    base_parameters: int
    trainable_parameters: int

    @property
    def total_bytes(self) -> int:
        """Everything counted (activations are not yet)."""
        return self.base_bytes + self.adapter_bytes + self.gradient_bytes + self.optimizer_bytes

    def fits(self, budget_bytes: int) -> bool:
        """Whether the counted parts fit in `budget_bytes`."""
        return self.total_bytes <= budget_bytes

    def breakdown(self) -> dict[str, int]:
        """{part: bytes}, for a report."""
        return {
            "base": self.base_bytes,
            "adapters": self.adapter_bytes,
            "gradients": self.gradient_bytes,
            "optimizer states": self.optimizer_bytes,
        }


def meta_model(config: Any, kind: str = "causal-lm", num_labels: int | None = None) -> nn.Module:
    """The transformers model of `config` on the meta device: "causal-lm", "classification" (with `num_labels`
    classes, default the config's) or "base". The config is not changed."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    classes = {
        "causal-lm": AutoModelForCausalLM,
        "classification": AutoModelForSequenceClassification,
        "base": AutoModel,
    }
    if kind not in classes:
        raise ValueError(f"kind must be one of {sorted(classes)}, got {kind!r}")
    if kind == "classification" and num_labels is not None:
        config = copy.deepcopy(config)
        config.num_labels = num_labels
    with torch.device("meta"):
        return classes[kind].from_config(config)


def _quantized_bytes(weight: torch.Tensor, base: str, double_quant: bool) -> float:
    n = weight.numel()
    if base == "int8":
        return n + 4 * weight.shape[0]  # one byte a weight, an fp32 scale per output row
    bits = 4 + ((8 / 64 + 32 / (64 * 256)) if double_quant else 32 / 64)
    return n * bits / 8


def estimate_memory(
    config: Any,
    *,
    kind: str = "causal-lm",
    base: str = "bf16",
    method: str = "lora",
    method_fields: Mapping[str, Any] | None = None,
    targets: str | Sequence[str] = "all-linear",
    exclude: Sequence[str] | None = None,
    modules_to_save: Sequence[str] | None = None,
    optimizer: str = "adamw",
    adapter_bytes_per: int = 4,
    double_quant: bool = True,
) -> MemoryEstimate:
    """The bytes of the base, the adapters, their gradients and the optimizer states for a transformers config.

    Args:
        config: a transformers `PretrainedConfig` (no weights are read).
        kind: "causal-lm", "classification" or "base" (the model class built from the config).
        base: the base weights' format, one of `BASE_FORMATS`.
        method, method_fields: the adapter (`lx.config(method, **method_fields)`).
        targets, exclude: the layers to adapt, as `lx.adapt_` takes them (the output head is never adapted).
        modules_to_save: modules trained in full (a new classification head), counted as trainable.
        optimizer: one of `OPTIMIZER_STATES`.
        adapter_bytes_per: bytes per trainable parameter (and per gradient and optimizer state).
        double_quant: nf4 with QLoRA's double quantization of the block constants.

    Raises:
        ValueError: an unknown base format or optimizer (naming the known ones), or a bad method config.
    """
    import loraredux as lx

    if base not in BASE_FORMATS:
        raise ValueError(f"base must be one of {BASE_FORMATS}, got {base!r}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATES)}, got {optimizer!r}")
    model = meta_model(config, kind)
    width = {"fp32": 4, "bf16": 2, "fp16": 2}.get(base, 2)
    quantize = base in ("int8", "nf4")
    base_bytes = 0.0
    base_parameters = 0
    seen: set[int] = set()
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights count once
                continue
            seen.add(id(p))
            base_parameters += p.numel()
            head = name.split(".")[-1] in _HEADS
            if quantize and isinstance(module, nn.Linear) and pname == "weight" and not head:
                base_bytes += _quantized_bytes(p, base, double_quant)
            else:
                base_bytes += p.numel() * width
    cfg = lx.config(method, **dict(method_fields or {}))
    heads = [h for h in _HEADS if any(n.split(".")[-1] == h for n, _ in model.named_modules())]
    with lx.core.skip_initialisation():
        lx.adapt_(model, cfg, targets if isinstance(targets, str) else list(targets),
                  exclude=[*heads, *(exclude or [])], modules_to_save=modules_to_save)  # fmt: skip
    trainable = sum(p.numel() for p in lx.trainable_parameters(model).values())
    per = adapter_bytes_per * trainable
    return MemoryEstimate(
        base_bytes=round(base_bytes),
        adapter_bytes=per,
        gradient_bytes=per,
        optimizer_bytes=OPTIMIZER_STATES[optimizer] * per,
        base_parameters=base_parameters,
        trainable_parameters=trainable,
    )
