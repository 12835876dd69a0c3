"""The activation memory of a training step, replayed on PyTorch's meta device (`memory.estimate_memory`'s
activations).

Activations are found by running the step itself on the meta device, where tensors have shapes but no storage, so
nothing is computed: the adapted model, cast to the compute dtype and in training mode (dropouts on), runs forward
on `batch_size x seq_len` token ids with labels (the causal-LM loss, or the classification loss on one label per
sequence; "base" backpropagates the sum of the last hidden state), then backward. A `TorchDispatchMode` sees each
new storage the step creates (an operator's output that aliases none of its inputs: views and in-place results cost
nothing), and a weak reference to it records when it is freed (PyTorch keeps one Python object per storage for as
long as the storage lives, on meta too, and views share it: that is the storage identity; meta `data_ptr`s are all
0). The step's timeline of allocations and frees is then the one a real device's allocator sees: what autograd
saves (an input shared by q, k, v and the adapter's A counts once), the model's outputs until the loss is taken from
them, the loss's float copy and log-softmax, and each transient of backward (the gradient of the logits, often the
peak of a language model with a large vocabulary). Only the loss goes on into backward, as in `train.fit` with
`tasks`' loss (`model(**batch).loss`) and transformers' `Trainer` (`compute_loss` returns the loss alone): the outputs,
the logits among them (and the key / value cache a model in training mode may return), die before it. A loop that
holds them through backward (`out = model(**batch); out.loss.backward()`) peaks one logits tensor (batch x seq x vocab
at the compute dtype) higher. The activations are that timeline's peak without the parameters' gradients (counted
above). Two corrections make meta behave like a real device:

- attention: on meta, PyTorch's `scaled_dot_product_attention` (transformers' default "sdpa") takes its math path,
  which keeps the seq x seq attention probabilities of every head and layer; real devices take a fused kernel
  (flash or memory-efficient) that keeps q, k, v, the output and an fp32 log-sum-exp per query row, O(seq) instead
  of O(seq^2). The simulation substitutes the fused kernel's footprint (its output laid out as the query on the
  CPU, in (batch, seq, heads, dim) order on CUDA) where the training device would run one, following PyTorch's
  dispatch: never when key and value have fewer heads than the query without `enable_gqa` (only the math path
  broadcasts them: Falcon's multi-query attention), on "cpu" not with attention dropout (the CPU flash kernel has
  none), on "cuda" not for grouped-query attention in fp32 or with a mask (flash is 16-bit only and takes no mask;
  memory-efficient needs equal head counts). A config with `attn_implementation="eager"` is simulated as it runs:
  its probabilities, their fp32 softmax and dropout mask are O(seq^2), which dominates at long sequences, so the
  implementation matters as much as the batch. The config's implementation is used (transformers' default, sdpa,
  when it names none).
- gradient accumulation: with a dispatch mode active, autograd's engine sums a tensor's incoming gradients out of
  place; without one (a real run) it adds in place into a buffer it holds the last reference to. The replay folds
  such an add of backward into the buffer it would have reused.

Assumed: no gradient checkpointing; no padding mask (only token ids go in; a mask adds about batch x seq^2 bytes
once, shared by the layers); the model's own `use_cache` default. Not counted: kernel workspaces (cuBLAS, flash
backward's accumulators, bitsandbytes' dequantized weights and int8 buffers: int8 and nf4 are simulated as plain
layers in the compute dtype, an int8 layer keeping its input for backward as bitsandbytes' int8 product does,
`keep_inputs_`), the caching allocator's rounding, the inputs and the optimizer step's temporaries.

Measured agreement (tests/advisor/test_activation_memory.py: CPU, fp32, random weights, 2 layers of hidden 128,
vocabulary 1,000, LoRA r=8 on all linear layers, batch 4 x 128 tokens; measured = `measure_peak_bytes` of a whole step,
`model(**batch).loss.backward()` then AdamW, plus the weights): `total_bytes` / measured was 1.024 for a Llama with
grouped-query attention and sdpa, 1.020 for the same with eager attention, 1.013 for GPT-2, 1.020 for GPT-NeoX and 1.022
for a BERT classifier, the excess being the gradients and optimizer states (above); `activation_bytes` equalled the
measured peak to within 48 bytes, or 0.11% for BERT, whose peak comes during backward with part of the gradients
allocated. With LoRA on q_proj and v_proj only, for a tiny Llama with a vocabulary of 8,192 (the logits a third of the
peak) and for one-layer SmolLM2-shaped models (hidden 576, batch 8 x 128) with vocabularies of 1,000, 8,192 and 49,152,
`activation_bytes` equalled the measured peak to the byte and `total_bytes` exceeded the measured by less than the
gradients and optimizer states (0.02% to 0.3%); with all linear layers adapted the same SmolLM2 shapes came within 0.13%
(activations) and 1.3% (total). The same replay matched the measured CPU peak to within 64 bytes for tiny Qwen2, Qwen3,
Mistral, Phi-3, Gemma 2, Gemma 3, OPT and Falcon models (fp32), and a bf16 Llama and Mixtral. On meta an fp32 mixture of
experts fails (transformers' grouped_mm experts need bf16 there). The CUDA rules above follow PyTorch's dispatch
conditions; no CUDA device was at hand to measure them.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Allocations", "keep_inputs_", "simulate_step"]


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    """The tensors of an operator's arguments or outputs (tensors, or lists / tuples / dicts of them)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


class Allocations(TorchDispatchMode):
    """The timeline of storages a computation creates and frees, as (allocation id, +bytes / -bytes) events.

    A storage is new when an operator's output aliases none of its inputs and is not tracked yet; it is freed when
    its Python object dies (PyTorch keeps that object exactly as long as the storage lives, views included). In
    `backward`, an out-of-place add whose output replaces a dying input of the same size is folded into that input:
    outside a dispatch mode autograd's engine accumulates gradients in place there (`InputBuffer::accumulate`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[int, int]] = []
        self.backward = False
        # id(storage) -> (allocation, bytes, weak reference)
        self._alive: dict[int, tuple[int, int, weakref.ref]] = {}
        self._count = 0
        self._pending: tuple[int, int, int, set[int]] | None = None  # an add of backward to settle
        self._folded: dict[int, int] = {}  # an add's allocation -> the buffer it was folded into

    def allocation(self, tensor: torch.Tensor) -> int | None:
        """The id of the allocation holding `tensor`'s storage, or None (not created here, or freed)."""
        self.settle()
        entry = self._alive.get(id(tensor.untyped_storage()))
        return None if entry is None else self._root(entry[0])

    def _root(self, allocation: int) -> int:
        while allocation in self._folded:
            allocation = self._folded[allocation]
        return allocation

    def peak(self, exclude: set[int]) -> int:
        """The timeline's highest sum, leaving out the allocations in `exclude`."""
        self.settle()
        running = highest = 0
        for allocation, delta in self.events:
            if allocation not in exclude:
                running += delta
                highest = max(highest, running)
        return highest

    def settle(self) -> None:
        """Fold the last add of backward into the input it replaced, if that input died with it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        index, allocation, nbytes, inputs = pending
        for j in range(len(self.events) - 1, index, -1):
            freed, delta = self.events[j]
            if delta == -nbytes and freed in inputs:
                del self.events[j], self.events[index]
                self._folded[allocation] = self._root(freed)
                return

    def _free(self, key: int, allocation: int, nbytes: int) -> None:
        self._alive.pop(key, None)
        self.events.append((allocation, -nbytes))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.settle()
        out = func(*args, **(kwargs or {}))
        inputs: set[int] | None = None
        for tensor in _tensors(out):
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in self._alive:
                continue
            if inputs is None:
                inputs = {id(t.untyped_storage()) for t in _tensors((args, kwargs))}
            if key in inputs:  # a view or an in-place result
                continue
            self._count += 1
            allocation, nbytes = self._count, storage.nbytes()
            ref = weakref.ref(storage, lambda _, k=key, a=allocation, n=nbytes: self._free(k, a, n))
            self._alive[key] = (allocation, nbytes, ref)
            self.events.append((allocation, nbytes))
            if self.backward and func is torch.ops.aten.add.Tensor:
                sources = {self._alive[k][0] for k in inputs if k in self._alive}
                self._pending = (len(self.events) - 1, allocation, nbytes, sources)
        return out


class _FusedAttention(torch.autograd.Function):
    """The footprint of a fused attention kernel (flash / memory-efficient) on meta tensors: the output (laid out
    as the query on the CPU, whose flash kernel allocates it `empty_like(q)`; in (batch, seq, heads, dim) order on
    CUDA), an fp32 log-sum-exp per query row, and q, k, v (and a mask) kept for backward, which returns gradients
    shaped like q, k, v. Nothing is computed."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, device: str
    ) -> torch.Tensor:
        if device == "cpu":
            out = torch.empty_like(q)
        else:
            out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)
        logsumexp = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, logsumexp, mask)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None, None


def _sdpa_arguments(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float, bool]:
    """`F.scaled_dot_product_attention`'s arguments by name, however they were passed."""
    return query, key, value, attn_mask, dropout_p, enable_gqa


def _runs_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: float,
    gqa: bool,
    device: str,
) -> bool:
    """Whether PyTorch's sdpa picks a fused kernel for this call on `device` (its dispatch rules, simplified)."""
    dense = all(t.dim() == 4 and t.stride(-1) == 1 for t in (q, k, v))
    same_heads = q.shape[1] == k.shape[1] == v.shape[1]
    grouped = gqa and k.shape[1] == v.shape[1] and q.shape[1] % k.shape[1] == 0
    if not dense or q.shape[-1] != k.shape[-1] or not (same_heads or grouped):
        return False  # only the math path broadcasts heads or takes other layouts
    if device == "cpu":
        return not dropout  # the CPU flash kernel has no dropout
    # CUDA: memory-efficient takes fp32 and masks but not grouped heads; flash takes grouped heads, 16-bit only
    return same_heads or (q.dtype != torch.float32 and mask is None)


class _FusedSdpa(TorchFunctionMode):
    """`F.scaled_dot_product_attention` as the training device runs it: the fused kernel's footprint where that
    device has one for the call (module docstring), else the math path (what meta runs anyway)."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v, mask, dropout, gqa = _sdpa_arguments(*args, **kwargs)
            if _runs_fused(q, k, v, mask, dropout, gqa, self.device):
                return _FusedAttention.apply(q, k, v, mask, self.device)
        return func(*args, **kwargs)


def _labels(model: nn.Module, kind: str, batch_size: int, ids: torch.Tensor) -> torch.Tensor | None:
    if kind == "causal-lm":
        return ids
    if kind != "classification":
        return None
    cfg = model.config
    if cfg.problem_type == "multi_label_classification":
        return torch.zeros(batch_size, cfg.num_labels, device="meta")
    if cfg.problem_type == "regression" or (cfg.problem_type is None and cfg.num_labels == 1):
        return torch.zeros(batch_size, device="meta")
    return torch.zeros(batch_size, dtype=torch.long, device="meta")


class _KeepsInput(torch.autograd.Function):
    """x W^T + b with a frozen W that keeps x until backward, as bitsandbytes' int8 product does although no weight
    gradient needs it (bitsandbytes 0.50.2: `MatMul8bitFp` on the CPU keeps `ctx.A`, `MatMul8bitLt` on CUDA
    `ctx.tensors`, whenever an input needs a gradient)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Any) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        _, weight = ctx.saved_tensors
        return grad @ weight, None, None


def keep_inputs_(modules: list[nn.Linear]) -> None:
    """Make each frozen linear layer keep its input for backward (`_KeepsInput`): an int8 base in the replay."""
    for module in modules:
        module.forward = lambda x, m=module: _KeepsInput.apply(x, m.weight, m.bias)  # type: ignore[method-assign]


def simulate_step(model: nn.Module, kind: str, batch_size: int, seq_len: int, device: str) -> int:
    """The activation bytes of one training step of the adapted meta-device `model` (module docstring)."""
    model.train()
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    labels = _labels(model, kind, batch_size, ids)
    inputs = {"input_ids": ids} if labels is None else {"input_ids": ids, "labels": labels}
    timeline = Allocations()
    try:
        with timeline:
            with _FusedSdpa(device):
                out = model(**inputs)
            loss = out[0] if labels is not None else out[0].sum()
            # only the loss goes on into backward: the outputs (the logits among them) die here
            del out
            if loss.requires_grad:
                timeline.backward = True
                loss.backward()
            gradients = {
                timeline.allocation(p.grad) for p in model.parameters() if p.grad is not None
            }
            del loss
    except Exception as err:
        raise RuntimeError(
            f"the training step of {type(model).__name__} cannot run on the meta device ({err}); estimate "
            "without batch_size and seq_len"
        ) from err
    return timeline.peak(gradients - {None})
