"""The memory model: the bytes of a fine-tuning setup from a transformers config alone.

The model is built on PyTorch's meta device (shapes, no storage: exact parameter counts for any architecture
transformers knows, in a fraction of a second) and adapted there with the chosen method, so the counts are the
library's own, not a per-architecture formula. Then:

    base        every base parameter at its format's width: fp32 4 bytes, bf16 / fp16 2; with int8, nf4 or fp4
                the linear layers' weights are quantized and everything else (embeddings, norms, biases, the
                output head) stays at 16 bits (or at `dtype`'s width: fp32 for a model quantized from fp32)
                    int8:  1 byte per weight + one fp32 scale per output row (LLM.int8's row-wise absmax)
                    nf4:   4 bits per weight + the absmax constants of blocks of 64: fp32 (0.5 bit per weight), or
                           with double quantization 8-bit constants with an fp32 per 256 blocks
                           (8/64 + 32/(64 * 256) = 0.127 bit per weight; Dettmers et al., QLoRA, arXiv 2305.14314);
                           fp4 alike
    adapters    the trainable parameters at `adapter_bytes_per` (fp32 by default)
    gradients   one gradient per trainable parameter, at the same width
    optimizer   `OPTIMIZER_STATES[optimizer]` states per trainable parameter, at the same width (AdamW: 2)

    activations (with `batch_size` and `seq_len`) the peak of one training step (forward, loss, backward) above the
                weights and their gradients, at the compute dtype (the base's; for int8, nf4 and fp4 `dtype`, bf16
                by default). A quantized layer's step is a dense one's: bitsandbytes dequantizes W0 into the
                compute dtype for each product (forward, and backward for the input's gradient) and frees it, and
                keeps only the codes for backward, as a frozen dense layer keeps a reference to W0; so the
                activations are the dense model's replay (measured on MiniLM, nf4 on CPU in fp32: within 0.1 MB of
                223 MB). An int8 layer keeps its input for backward besides (bitsandbytes' int8 product saves it,
                though no weight gradient needs it): the replay does the same (`replay.keep_inputs_`)

`total_bytes` is the sum of the five. It overstates a step's peak by at most the gradients and the optimizer states:
the gradients grow during backward and AdamW creates its states after it, while the activations peak at its start;
in steady training the states of the last step are alive, so only the gradients are extra (for LoRA a small share).

Activations are found by replaying the step on the meta device (`replay.py`, whose docstring has the method, its
assumptions and the measured agreement: the activations match a measured CPU step to within bytes on a dozen
architectures). `measure_peak_bytes` and `held_bytes` (`measured.py`) measure a real step to check it against.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .measured import held_bytes, measure_peak_bytes
from .replay import keep_inputs_, simulate_step

__all__ = [
    "BASE_FORMATS",
    "COMPUTE_DTYPES",
    "OPTIMIZER_STATES",
    "TRAINING_DEVICES",
    "MemoryEstimate",
    "estimate_memory",
    "held_bytes",
    "measure_peak_bytes",
    "meta_model",
]

#: bits per base parameter outside quantized linear weights, and the format's own width for those weights
BASE_FORMATS = ("fp32", "bf16", "fp16", "int8", "nf4", "fp4")
#: the dtype activations are computed in, per base format, by default: the quantized formats compute in bf16
#: (QLoRA's setup on a GPU); `estimate_memory(dtype=...)` gives another (fp32: `loraredux train --base nf4`)
COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "int8": torch.bfloat16,
    "nf4": torch.bfloat16,
    "fp4": torch.bfloat16,
}
_QUANTIZED = ("int8", "nf4", "fp4")
#: the devices whose attention kernels the activation model knows (see replay.py)
TRAINING_DEVICES = ("cuda", "cpu")
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
    """Bytes by part (see the module docstring), and the counts they come from.

    `activation_bytes` is 0 when no batch was given (`batch_size` and `seq_len` are then None): not estimated.
    """

    base_bytes: int
    adapter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    base_parameters: int
    trainable_parameters: int
    activation_bytes: int = 0
    batch_size: int | None = None
    seq_len: int | None = None

    @property
    def total_bytes(self) -> int:
        """Everything counted: base, adapters, gradients, optimizer states and activations."""
        return (
            self.base_bytes
            + self.adapter_bytes
            + self.gradient_bytes
            + self.optimizer_bytes
            + self.activation_bytes
        )

    def fits(self, budget_bytes: int) -> bool:
        """Whether the counted parts fit in `budget_bytes`."""
        return self.total_bytes <= budget_bytes

    def breakdown(self) -> dict[str, int]:
        """{part: bytes}, for a report ("activations" is 0 when they were not estimated)."""
        return {
            "base": self.base_bytes,
            "adapters": self.adapter_bytes,
            "gradients": self.gradient_bytes,
            "optimizer states": self.optimizer_bytes,
            "activations": self.activation_bytes,
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


def _check_batch(config: Any, batch_size: Any, seq_len: Any, device: Any) -> str:
    """The training device's type ("cuda" or "cpu"), after checking the batch shape (see `estimate_memory`)."""
    if (batch_size is None) != (seq_len is None):
        raise ValueError(
            "batch_size and seq_len go together: give both (to estimate activations) or neither, got "
            f"batch_size={batch_size!r}, seq_len={seq_len!r}"
        )
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    try:
        kind = torch.device(device).type if isinstance(device, (str, torch.device)) else None
    except RuntimeError:
        kind = None
    if kind not in TRAINING_DEVICES:
        raise ValueError(f"device must be one of {TRAINING_DEVICES}, got {device!r}")
    limit = getattr(config, "max_position_embeddings", None)
    if seq_len is not None and isinstance(limit, int) and seq_len > limit:
        raise ValueError(f"seq_len {seq_len} exceeds the config's max_position_embeddings {limit}")
    return kind


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
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    optimizer: str = "adamw",
    adapter_bytes_per: int = 4,
    double_quant: bool = True,
    batch_size: int | None = None,
    seq_len: int | None = None,
    device: str | torch.device = "cuda",
    dtype: torch.dtype | None = None,
) -> MemoryEstimate:
    """The bytes of the base, the adapters, their gradients and the optimizer states for a transformers config, and
    with `batch_size` and `seq_len` those of the activations of one training step.

    Args:
        config: a transformers `PretrainedConfig` (no weights are read).
        kind: "causal-lm", "classification" or "base" (the model class built from the config).
        base: the base weights' format, one of `BASE_FORMATS`.
        method, method_fields: the adapter (`lx.config(method, **method_fields)`).
        targets, exclude: the layers to adapt, as `lx.adapt_` takes them (the output head is never adapted).
        modules_to_save: modules trained in full (a new classification head), counted as trainable.
        rank_pattern, alpha_pattern: a layer's own rank / alpha, as `lx.adapt_` takes them.
        optimizer: one of `OPTIMIZER_STATES`.
        adapter_bytes_per: bytes per trainable parameter (and per gradient and optimizer state).
        double_quant: nf4 with QLoRA's double quantization of the block constants.
        batch_size, seq_len: the training batch (sequences, tokens per sequence), both or neither: with them the
            activations are estimated (replay.py), at `dtype`.
        device: the device that trains ("cuda", "cuda:1", "cpu" or a `torch.device`; its type one of
            `TRAINING_DEVICES`): it decides which attention kernel sdpa runs (replay.py).
        dtype: for int8 / nf4 / fp4, the dtype of everything the format does not quantize (embeddings, norms,
            biases, the head) and of the activations, which bitsandbytes computes in: default
            `COMPUTE_DTYPES[base]` (bf16, QLoRA's setup); float32 for a model loaded in fp32 and quantized with
            `lx.quantize_` (`loraredux train --base nf4`). A dense format is its own dtype.

    Raises:
        ValueError: an unknown base format, optimizer or device (naming the known ones), a dtype other than a dense
            format's own or one bitsandbytes computes in (float32, bfloat16, float16), a bad method config,
            batch_size or seq_len not a positive int, one of them without the other, or seq_len beyond the
            config's max_position_embeddings.
        RuntimeError: the training step of this architecture cannot run on the meta device (an operator that
            needs values, or whose meta kernel refuses the dtype, as transformers' grouped_mm experts in fp32);
            estimate without a batch then.
    """
    import loraredux as lx

    if base not in BASE_FORMATS:
        raise ValueError(f"base must be one of {BASE_FORMATS}, got {base!r}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATES)}, got {optimizer!r}")
    dtype = _check_dtype(base, dtype)
    device = _check_batch(config, batch_size, seq_len, device)
    if batch_size is not None and kind == "classification" and _needs_pad_token(config):
        # transformers pools each sequence's last non-padding token, so it needs a padding id: any will do
        config = copy.deepcopy(config)
        config.pad_token_id = 0
    model = meta_model(config, kind)
    width = torch.finfo(dtype).bits // 8
    quantize = base in _QUANTIZED
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
                  exclude=[*heads, *(exclude or [])], modules_to_save=modules_to_save,
                  rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)  # fmt: skip
    trainable = sum(p.numel() for p in lx.trainable_parameters(model).values())
    per = adapter_bytes_per * trainable
    activations = 0
    if batch_size is not None and seq_len is not None:
        model.to(dtype)
        if base == "int8":  # bitsandbytes' int8 product keeps each layer's input for backward
            keep_inputs_([
                m for n, m in model.named_modules()
                if type(m) is nn.Linear and n.split(".")[-1] not in _HEADS and not m.weight.requires_grad
            ])  # fmt: skip
        activations = simulate_step(model, kind, batch_size, seq_len, device)
    return MemoryEstimate(
        base_bytes=round(base_bytes),
        adapter_bytes=per,
        gradient_bytes=per,
        optimizer_bytes=OPTIMIZER_STATES[optimizer] * per,
        base_parameters=base_parameters,
        trainable_parameters=trainable,
        activation_bytes=activations,
        batch_size=batch_size,
        seq_len=seq_len,
    )


def _check_dtype(base: str, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of the unquantized weights and the activations (`estimate_memory`'s `dtype`), checked."""
    own = COMPUTE_DTYPES[base]
    if dtype is None:
        return own
    if base not in _QUANTIZED and dtype != own:
        raise ValueError(
            f"a {base} base computes in {own}; dtype={dtype} applies to {_QUANTIZED} only"
        )
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, bfloat16 or float16, got {dtype!r}")
    return dtype


def _needs_pad_token(config: Any) -> bool:
    return getattr(config, "pad_token_id", 0) is None
