"""LoftQ on a model that is already quantized: the dense weights come from its checkpoint, the base stays as loaded.

A model loaded in 4-bit holds Q = q(W0) and no longer W0; QLoRA then starts its adapter at B = 0 with the whole
quantisation error W0 - deq(Q) in the model. LoftQ (Li et al., arXiv 2310.08659, Algorithm 1) puts the best rank-r
part of that error into the adapter:

    s B_t A_t = SVD_r(W0 - deq(Q_t)),   Q_{t+1} = q(W0 - s B_t A_t),   t = 1..T,   Q_1 = the loaded base,

reading W0 one layer at a time from the safetensors checkpoint (`checkpoint_weights.py`). With T = 1 (the default,
as PEFT's `replace_lora_weights_loftq`) the base is not touched; by Eckart-Young the adapter then holds the optimal
rank-r correction of the loaded Q. T > 1 re-quantizes the base (see `loftq_from_checkpoint_`).

Each layer can be rolled back: by default when its relative weight error does not fall, or when a `callback`
(e.g. one comparing the model's logits with the dense model's, as PEFT suggests) says so.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .checkpoint_weights import CheckpointError, SafetensorsCheckpoint

__all__ = ["InMemoryWeights", "LayerReport", "LoftQReport", "loftq_from_checkpoint_", "rank_r_fit"]

logger = logging.getLogger(__name__)

#: Base kinds whose module stores W0 transposed, (in, out), as their checkpoints do (see `bases.py`).
TRANSPOSED_KINDS = ("conv1d", "embedding")


@dataclass(frozen=True)
class LayerReport:
    """What `loftq_from_checkpoint_` did to one layer. Errors are relative: ||W0 - deq(Q) - s B A||_F / ||W0||_F.

    Attributes:
        path: the adapter's module path.
        key: the checkpoint key W0 was read from.
        rank: r.
        norm: ||W0||_F.
        base_error: ||W0 - deq(Q)||_F / ||W0||_F for the base as found (QLoRA's error, B = 0).
        error_before: the error with the factors (and base) as found.
        error_after: the error with the new factors (and, for iters > 1, the new base), rolled back or not.
        kept: False when the layer was rolled back to its factors (and base) as found.
    """

    path: str
    key: str
    rank: int
    norm: float
    base_error: float
    error_before: float
    error_after: float
    kept: bool

    @property
    def error(self) -> float:
        """The error of the layer as it is now: `error_after` if kept, else `error_before`."""
        return self.error_after if self.kept else self.error_before


@dataclass(frozen=True)
class LoftQReport:
    """The per-layer reports, in model order, and their aggregate errors."""

    layers: tuple[LayerReport, ...]

    def aggregate(self, which: str = "error") -> float:
        """sqrt(sum_l (e_l ||W0_l||)^2) / sqrt(sum_l ||W0_l||^2): the relative error of all layers as one matrix.

        Args:
            which: a `LayerReport` error: "base_error", "error_before", "error_after" or "error" (as now).

        Raises:
            ValueError: another name.
        """
        if which not in ("base_error", "error_before", "error_after", "error"):
            raise ValueError(
                f"which must be 'base_error', 'error_before', 'error_after' or 'error', got {which!r}"
            )
        num = sum((getattr(r, which) * r.norm) ** 2 for r in self.layers)
        den = sum(r.norm**2 for r in self.layers)
        return math.sqrt(num / den) if den > 0 else 0.0

    @property
    def rolled_back(self) -> list[str]:
        """The paths of the layers that were rolled back."""
        return [r.path for r in self.layers if not r.kept]


class InMemoryWeights:
    """Dense weights given in memory, `{module path: W0}` in the module's own layout ((out, in) for nn.Linear), read
    as `SafetensorsCheckpoint` reads a folder: for W0 kept before `lx.quantize_` replaced the layers."""

    folder = "the weights given"

    def __init__(self, weights: Mapping[str, Tensor]) -> None:
        self.weights = dict(weights)

    def key_for(self, model: nn.Module, path: str) -> str:
        if path not in self.weights:
            raise CheckpointError(
                f"{self.folder}: no weight for the adapted layer {path!r} (given: "
                f"{sorted(self.weights)[:5]}{' ...' if len(self.weights) > 5 else ''})"
            )
        return path

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.weights[key].shape)

    def tensor(self, key: str) -> Tensor:
        return self.weights[key].detach()


def rank_r_fit(R: Tensor, rank: int, scale: float) -> tuple[Tensor, Tensor]:
    """A (r, in), B (out, r) with s B A = SVD_r(R) = U_r S_r V_r^T, split evenly: A = S_r^{1/2} V_r^T / sqrt(s),
    B = U_r S_r^{1/2} / sqrt(s) (as `init.loftq`). Exact SVD in R's dtype; a rank above min(out, in) gets zero rows
    and columns.
    """
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    k = min(rank, S.shape[0])
    root = (S[:k] / scale).sqrt()  # (k,)
    A = R.new_zeros(rank, R.shape[1])
    B = R.new_zeros(R.shape[0], rank)
    A[:k] = root[:, None] * Vh[:k]  # (k, in)
    B[:, :k] = U[:, :k] * root  # (out, k)
    return A, B


def _takes_a_pair(adapter: nn.Module, factor_init: type) -> bool:
    """Whether the adapter is W0 + s B A (`lora_form`) with a writable pair (`set_lora_form_`)."""
    if not isinstance(adapter, factor_init):
        return False
    if type(adapter).set_lora_form_ is factor_init.set_lora_form_:
        return False
    try:
        adapter.lora_form()
    except NotImplementedError:  # e.g. DoRA: a LoRA pair, but W' is not W0 + s B A
        return False
    return True


def _eligible(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from ..adapters.factor_init import FactorInit  # lazily: the adapters import loraredux.init
    from ..state import adapters

    found = list(adapters(model))
    if not found:
        raise ValueError(f"{type(model).__name__} has no adapted layer: lx.adapt_ it first")
    wrong = sorted({a.config.method for _, a in found if not _takes_a_pair(a, FactorInit)})
    if wrong:
        raise ValueError(
            f"LoftQ writes a free low-rank pair (A, B) into each adapter; {wrong} cannot take one "
            "(methods that can: those with an `init` field, e.g. lora, adalora, polar)"
        )
    moved = [path for path, a in found if a._moved]
    if moved:
        raise ValueError(
            f"the base of {moved[:3]}{' ...' if len(moved) > 3 else ''} was moved by the adapter's init "
            f"{found[0][1].config.init!r}: LoftQ corrects the base as loaded; adapt with a non-moving init "
            "(init=None, or e.g. 'gaussian')"
        )
    return found


def _stored_shape(adapter: nn.Module) -> tuple[int, int]:
    out, inp = adapter.out_features, adapter.in_features
    return (inp, out) if adapter.view.kind in TRANSPOSED_KINDS else (out, inp)


class _Saved:
    """One layer as found: copies of the adapter's own tensors, and its base's weight by reference.

    A base change gives the layer a new weight and leaves the old one as it was (`Adapter.replace_base_weight_`),
    so keeping the old one is enough: for a dense base its parameter objects; for a quantized base (a view with a
    `backend`, the `QuantizedFormat` protocol of `loraredux.quant`) the format's `stored` weight, which holds the
    side state too (bitsandbytes' `quant_state` on the module), put back with `install`.
    """

    def __init__(self, adapter: nn.Module) -> None:
        self.adapter = adapter
        own = [*adapter.named_parameters(), *adapter.named_buffers()]
        self.tensors = {k: v.detach().clone() for k, v in own if not k.startswith("base.")}
        self.backend = getattr(adapter.view, "backend", None)
        self.stored = None if self.backend is None else self.backend.stored(adapter.view.module)
        self.base = dict(adapter.base._parameters)

    @torch.no_grad()
    def restore(self) -> None:
        adapter = self.adapter
        current = dict([*adapter.named_parameters(), *adapter.named_buffers()])
        for k, v in self.tensors.items():
            current[k].copy_(v)
        adapter.__dict__.pop("_pending_base", None)
        if self.backend is not None:
            self.backend.install(adapter.view.module, self.stored)
            return
        for name, param in self.base.items():
            if adapter.base._parameters.get(name) is not param:
                setattr(adapter.base, name, param)


def _relative(W: Tensor, Q: Tensor, adapter: nn.Module, norm: float) -> float:
    A, B, s = adapter.lora_form()
    E = W - Q - s * (B.to(W.dtype) @ A.to(W.dtype))  # (out, in)
    return float(torch.linalg.matrix_norm(E)) / norm if norm > 0 else 0.0


@torch.no_grad()
def _one_layer(
    adapter: nn.Module,
    W: Tensor,
    iters: int,
    quantize: Callable[[Tensor], Tensor] | None,
    path: str,
) -> tuple[float, float, float, float]:
    """Run the alternation on one layer in place; returns ||W0||, base, before and after errors."""
    rank = adapter.lora_form()[0].shape[0]
    scale = adapter.lora_form()[2]
    Q = adapter.base_weight().detach().to(W.dtype)  # (out, in) deq(Q_1), the base as found
    norm = float(torch.linalg.matrix_norm(W))
    base_error = float(torch.linalg.matrix_norm(W - Q)) / norm if norm > 0 else 0.0
    before = _relative(W, Q, adapter, norm)
    A, B = rank_r_fit(W - Q, rank, scale)  # s B_1 A_1 = SVD_r(W0 - deq(Q_1))
    for _ in range(iters - 1):
        target = W - scale * (B @ A)  # Q_{t+1} = q(W0 - s B_t A_t), quantized by the base itself
        if quantize is not None:
            target = quantize(target)
        dtype = adapter.base_weight().dtype
        adapter.replace_base_weight_(target.to(dtype))
        Q = adapter.base_weight().detach().to(W.dtype)  # deq(Q_{t+1}), what the base really holds
        if quantize is None and torch.equal(Q, target.to(dtype).to(W.dtype)):
            raise ValueError(
                f"{path}: the base stored W0 - s B A as given, so it does not quantize: iters > 1 needs a "
                "quantized base (bitsandbytes 4-bit) or a quantizer, e.g. "
                "quantize=lx.init.loftq.nf4_roundtrip"
            )
        A, B = rank_r_fit(W - Q, rank, scale)  # s B_{t+1} A_{t+1} = SVD_r(W0 - deq(Q_{t+1}))
    adapter.set_lora_form_(A, B)
    return norm, base_error, before, _relative(W, Q, adapter, norm)


@torch.no_grad()
def loftq_from_checkpoint_(
    model: nn.Module,
    checkpoint: str | os.PathLike[str] | SafetensorsCheckpoint | Mapping[str, Tensor],
    *,
    iters: int = 1,
    callback: Callable[[nn.Module, str], bool] | None = None,
    quantize: Callable[[Tensor], Tensor] | None = None,
) -> LoftQReport:
    """LoftQ on every adapted layer of an already quantized model, from the dense weights in its checkpoint.

    For each adapted layer, with W0 read from `checkpoint` and deq(Q_1) = `adapter.base_weight()` (a quantized
    base is dequantized by its view; a dense base is used as it is):

        s B_t A_t = SVD_r(W0 - deq(Q_t)),   Q_{t+1} = q(W0 - s B_t A_t),   t = 1..T

    A = S_r^{1/2} V_r^T / sqrt(s), B = U_r S_r^{1/2} / sqrt(s) (exact SVD), written with the adapter's
    `set_lora_form_`, so s B A is the fit for any alpha. Li et al., "LoftQ", arXiv 2310.08659, Algorithm 1, started
    from the loaded Q_1 instead of q(W0) (the same when the model was loaded from this checkpoint), as PEFT's
    `replace_lora_weights_loftq`, which does T = 1 with PEFT's scale convention (its factors are sqrt(s) times ours).

    - T = 1 leaves the base as loaded: the adapter then holds the best rank-r correction of it (Eckart-Young), so
      the error is sqrt(sum_{i>r} sigma_i^2) / ||W0|| for the singular values sigma of W0 - deq(Q).
    - T > 1 re-quantizes: Q_{t+1} goes into the base through `adapter.replace_base_weight_`, and deq(Q_{t+1}) is read
      back with `adapter.base_weight()`, so the fit is always to what the base really holds. A quantized base
      (bitsandbytes `Linear4bit` / `Linear8bitLt`, from `lx.quantize_` or transformers' `BitsAndBytesConfig`)
      quantizes what it is given in its own format (blocks, double quantization): pass `quantize=None`. A dense
      base (a simulation, or tests) stores it as given, so pass `quantize`, the round trip W -> deq(q(W)) (e.g.
      `lx.init.loftq.nf4_roundtrip`, bitsandbytes' NF4 as `init="loftq"` uses); with neither, the call raises
      rather than leave an unquantized base. The base then holds Q_T, and `lx.disabled` computes with it;
      `lx.unadapt_` gives a quantized base its loaded weight back (its view keeps it), a dense one keeps Q_T. The
      adapter belongs with Q_T, not with the checkpoint's q(W0): save the whole model, or use T = 1 (as PEFT).

    Rollback: without `callback`, a layer whose relative error ||W0 - deq(Q) - s B A||_F / ||W0||_F does not fall
    below its value as found gets its adapter tensors and base back, bit for bit. With `callback`, it is called as
    `callback(model, path)` after each layer changed, and False rolls that layer back (the error is not consulted).
    Layers are done one at a time, in model order, each W0 read just before it is used.

    Args:
        model: a model adapted (`lx.adapt_`) with a method that takes a free low-rank pair (lora, adalora, polar)
            and no init that moved the base.
        checkpoint: the folder the model was loaded from (`model.safetensors` or sharded), an opened
            `SafetensorsCheckpoint`, or the dense weights in memory, `{module path: W0}` in each module's own
            layout (e.g. the weights of the layers `lx.quantize_` is about to replace, kept beforehand).
        iters: T >= 1 alternations.
        callback: `(model, path) -> bool`, True to keep the layer's change.
        quantize: for T > 1 on a base that does not quantize itself: W (out, in) -> deq(q(W)), same shape.

    Returns:
        A `LoftQReport`: per layer the errors before and after and whether it was kept; `aggregate()` for all.

    Raises:
        ValueError: no adapted layer, a method without a free pair, a moved base, iters < 1, a W0 of another
            shape than the layer's, or T > 1 on a base that stores what it is given with no `quantize`.
        TypeError: a callback that returns something other than a bool.
        CheckpointError, FileNotFoundError: no safetensors checkpoint there, or a layer's weight missing from it.

    On any exception every layer changed so far is restored, so the model is as it was. For that (and for
    rollback) the adapters' tensors as found are kept until the call returns, and for T > 1 the bases' parameters as
    found too: one more copy of the targeted base weights, in their stored (e.g. 4-bit) form.
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an integer >= 1 (alternations T), got {iters!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (model, path) -> bool, got {callback!r}")
    if quantize is not None and not callable(quantize):
        raise TypeError(f"quantize must be callable W -> deq(q(W)), got {quantize!r}")
    if isinstance(checkpoint, Mapping):
        ckpt: SafetensorsCheckpoint | InMemoryWeights = InMemoryWeights(checkpoint)
    elif isinstance(checkpoint, SafetensorsCheckpoint):
        ckpt = checkpoint
    else:
        ckpt = SafetensorsCheckpoint(checkpoint)
    layers = _eligible(model)
    keys = {}
    for path, adapter in layers:  # every key and shape checked before any layer changes
        keys[path] = key = ckpt.key_for(model, path)
        if ckpt.shape(key) != _stored_shape(adapter):
            raise CheckpointError(
                f"{ckpt.folder}: {key!r} has shape {ckpt.shape(key)}, but {path!r} "
                f"({adapter.view.kind}, out={adapter.out_features}, in={adapter.in_features}) stores "
                f"{_stored_shape(adapter)}: the model was not loaded from this checkpoint"
            )

    saved: list[_Saved] = []
    reports = []
    try:
        for path, adapter in layers:
            base = adapter.base_weight()
            work = torch.float64 if base.dtype == torch.float64 else torch.float32
            W = ckpt.tensor(keys[path]).to(device=base.device, dtype=work)
            if adapter.view.kind in TRANSPOSED_KINDS:
                W = W.T  # (out, in)
            saved.append(_Saved(adapter))
            as_found = adapter.base_weight().detach().clone() if iters > 1 else None
            norm, base_error, before, after = _one_layer(adapter, W, iters, quantize, path)
            del W
            if callback is None:
                kept = after < before
            else:
                kept = callback(model, path)
                if not isinstance(kept, bool):
                    raise TypeError(
                        f"callback returned {type(kept).__name__} for {path!r}; expected a bool "
                        "(True keeps the layer's change)"
                    )
            if not kept:
                saved[-1].restore()
                if as_found is not None and not torch.equal(adapter.base_weight(), as_found):
                    raise RuntimeError(
                        f"{path}: rolling back did not give the base weight as found: a base view must "
                        "give the layer a new parameter when its weight is replaced, leaving the old one as "
                        "it was (Adapter.replace_base_weight_)"
                    )
            logger.debug(
                "%s: error %.4g -> %.4g (%s)",
                path,
                before,
                after,
                "kept" if kept else "rolled back",
            )
            reports.append(
                LayerReport(
                    path,
                    keys[path],
                    adapter.lora_form()[0].shape[0],
                    norm,
                    base_error,
                    before,
                    after,
                    kept,
                )
            )
    except BaseException:
        for layer in reversed(saved):
            layer.restore()
        raise
    return LoftQReport(tuple(reports))
