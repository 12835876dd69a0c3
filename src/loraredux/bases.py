"""Views of a frozen base layer, so every adapter sees one shape of thing: a linear map W0 of shape (out, in).

`nn.Linear` stores W0 as (out, in); transformers' `Conv1D` (GPT-2) stores its transpose (in, out); `nn.Embedding`
is the linear map from a one-hot token (in = num_embeddings) to a vector (out = embedding_dim), so W0 is the transpose
of its table. A view hides those conventions: adapters ask for `weight()` in (out, in) orientation, call
`forward_with(x, W)` to run the layer's own operation with any (out, in) weight, and `project(x, A)` to compute the
low-rank input projection x A^T in the layer's own input domain.

Quantized layers (bitsandbytes `Linear4bit` / `Linear8bitLt`, from `lx.quantize_` or transformers'
`BitsAndBytesConfig`) get a `QuantizedLinearView` of kind "linear", so every method that supports linear layers
runs on them unchanged; the view's `quantized` (True) and `format` ("nf4", "fp4", "int8") tell them apart, and a
method that cannot run on a format refuses it by its config's `quantized_formats`. On such a view:
- `weight()` dequantizes W0 on every call, in the layer's dtype (`lx.quant.layer_dtype`); nothing dense is kept.
- Adapters compute x W0^T with the layer's own forward (`self.base(x)`), the bitsandbytes kernel.
- `forward_with(x, W)` is `F.linear(x, W, bias)` with a dense W, in the compute dtype as the layer's forward;
  `rebuilt(W)` is a dense `nn.Linear` (what a merge gives; `lx.merge_(model, requantize=True)` quantizes it back).
- `set_weight(W)` quantizes W into a new weight like the old one (PiSSA's residual becomes QPiSSA's quantized
  residual). The first call keeps the layer's original weight (codes and quantization state, not a dense copy):
  `original_weight()` dequantizes it, and `restore()` (`lx.unadapt_`) puts that very parameter back, so the
  original codes return bit for bit, never re-quantized from W_res + s B0 A0.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quant.formats import backend_of
from .quant.protocol import QuantizedFormat, StoredWeight

try:  # transformers is a dependency, but keep the view usable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]

__all__ = [
    "BaseView",
    "EmbeddingView",
    "LinearView",
    "QuantizedLinearView",
    "TransposedLinearView",
    "is_adaptable",
    "view_of",
]


class BaseView:
    """The frozen layer seen as y = op(x, W0) + bias with W0 of shape (out, in)."""

    kind: str = "linear"
    #: Whether dropout may be applied to the layer's input (not for integer token ids).
    input_is_dense: bool = True
    #: Whether W0 is stored quantized (`QuantizedLinearView`), and in which format ("nf4", "fp4", "int8").
    quantized: bool = False
    format: str | None = None
    #: Whether `set_weight` keeps the original weight, so that `restore()` puts it back exactly.
    keeps_original: bool = False

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property
    def in_features(self) -> int:
        return self.weight().shape[1]

    @property
    def out_features(self) -> int:
        return self.weight().shape[0]

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.module, "bias", None)

    def weight(self) -> Tensor:
        """W0 as (out, in)."""
        raise NotImplementedError

    def forward_with(self, x: Tensor, weight: Tensor) -> Tensor:
        """The layer's operation with `weight` (out, in) in place of W0, bias included."""
        raise NotImplementedError

    def project(self, x: Tensor, A: Tensor) -> Tensor:
        """x A^T for A of shape (r, in), in the layer's input domain: (..., in) -> (..., r)."""
        return F.linear(x, A)

    def rebuilt(self, weight: Tensor) -> nn.Module:
        """A plain module of the base's type carrying `weight` (out, in) and the base's bias."""
        raise NotImplementedError

    def _stored(self, weight: Tensor) -> Tensor:
        """`weight` (out, in) in the module's own storage layout."""
        return weight

    def set_weight(self, weight: Tensor) -> None:
        """Make `weight` (out, in) the module's weight, as a new frozen parameter of the old one's dtype.

        The old parameter object is not written to, so anything else holding it (a tied module, the user's own
        reference) keeps its values.
        """
        old = self.module.weight
        new = self._stored(weight.detach()).to(old.dtype).contiguous()
        self.module.weight = nn.Parameter(new, requires_grad=False)

    def original_weight(self) -> Tensor | None:
        """W0 (out, in) as it was before the first `set_weight`, where the view keeps it (`keeps_original`); None
        for a dense layer, whose adapter rebuilds it (W_res + s B0 A0) or keeps a copy."""
        return None

    def restore(self) -> bool:
        """Put back the weight the layer had before the first `set_weight`, the very parameter, if the view kept
        it; returns whether it did (False for a dense layer: the adapter sets W0 back itself)."""
        return False


def _clone_with(module: nn.Module, **tensors: Tensor) -> nn.Module:
    """A copy of `module` whose named parameters are replaced, without copying the old ones first."""
    memo = {id(getattr(module, name)): None for name in tensors}
    # The memo maps the old parameters to None, so deepcopy does not copy them first.
    new = copy.deepcopy(module, memo)
    for name, value in tensors.items():
        old = getattr(module, name)
        setattr(new, name, nn.Parameter(value, requires_grad=old.requires_grad))
    return new


class LinearView(BaseView):
    kind = "linear"

    def weight(self) -> Tensor:
        return self.module.weight

    def forward_with(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, self.bias)

    def rebuilt(self, weight: Tensor) -> nn.Module:
        return _clone_with(self.module, weight=weight.contiguous())


class TransposedLinearView(BaseView):
    """transformers' `Conv1D`: y = x W + b with W stored as (in, out)."""

    kind = "conv1d"

    def weight(self) -> Tensor:
        return self.module.weight.T

    def forward_with(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, self.bias)

    def rebuilt(self, weight: Tensor) -> nn.Module:
        return _clone_with(self.module, weight=weight.T.contiguous())

    def _stored(self, weight: Tensor) -> Tensor:
        return weight.T


class EmbeddingView(BaseView):
    """`nn.Embedding` as the linear map one_hot(id) -> table[id]: W0 = table^T, shape (dim, num_embeddings)."""

    kind = "embedding"
    input_is_dense = False

    @property
    def bias(self) -> Tensor | None:
        return None

    def weight(self) -> Tensor:
        return self.module.weight.T

    def _lookup(self, ids: Tensor, table: Tensor) -> Tensor:
        m = self.module
        return F.embedding(
            ids, table, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse
        )

    def forward_with(self, x: Tensor, weight: Tensor) -> Tensor:
        return self._lookup(x, weight.T)

    def project(self, x: Tensor, A: Tensor) -> Tensor:
        # one_hot(x) A^T is row x of A^T; the padding row is not special for the adapter (as in PEFT).
        return F.embedding(x, A.T)

    def rebuilt(self, weight: Tensor) -> nn.Module:
        return _clone_with(self.module, weight=weight.T.contiguous())

    def _stored(self, weight: Tensor) -> Tensor:
        return weight.T


class QuantizedLinearView(LinearView):
    """A quantized linear layer seen as y = x W0^T + b with W0 = deq(codes), (out, in); see the module docstring."""

    quantized = True
    keeps_original = True

    def __init__(self, module: nn.Module, backend: QuantizedFormat) -> None:
        backend.check(module)
        super().__init__(module)
        self.backend = backend
        self.format = backend.format_of(module)
        self.dtype = backend.layer_dtype(module)
        self.compute_dtype = backend.compute_dtype(module)
        self._kept: StoredWeight | None = None  # the original weight, once set_weight replaced it

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def out_features(self) -> int:
        return self.module.out_features

    def weight(self) -> Tensor:
        with torch.no_grad():
            return self.backend.dequantize(self.module, self.dtype)  # (out, in), a fresh tensor

    def forward_with(self, x: Tensor, weight: Tensor) -> Tensor:
        """The layer's operation with a dense `weight` (out, in): x and the bias in the compute dtype, as the
        layer's own forward, and the result in x's dtype."""
        cd, b = self.compute_dtype, self.bias
        y = F.linear(x.to(cd), weight.to(cd), None if b is None else b.to(cd))
        return y.to(x.dtype)

    def rebuilt(self, weight: Tensor) -> nn.Module:
        """A dense `nn.Linear` in the layer's dtype carrying `weight` (out, in) and a copy of the bias."""
        b = self.bias
        layer = nn.Linear(self.in_features, self.out_features, bias=b is not None, device="meta")
        layer.weight = nn.Parameter(
            weight.detach().to(self.dtype).contiguous(), requires_grad=False
        )
        if b is not None:
            layer.bias = nn.Parameter(
                b.detach().to(self.dtype).clone(), requires_grad=b.requires_grad
            )
        return layer.train(self.module.training)

    def set_weight(self, weight: Tensor) -> None:
        """Quantize `weight` (out, in) like the layer's weight into a new one; the first call keeps the original."""
        new = self.backend.quantize_like(self.module, weight.detach())
        if self._kept is None:
            self._kept = self.backend.stored(self.module)
        self.backend.install(self.module, new)

    def original_weight(self) -> Tensor:
        with torch.no_grad():
            return self.backend.dequantize(self.module, self.dtype, self._kept)

    def restore(self) -> bool:
        if self._kept is None:
            return False
        self.backend.install(self.module, self._kept)
        self._kept = None
        return True


def _quantized_embedding(module: nn.Module) -> bool:
    # bitsandbytes' Embedding4bit / Embedding8bit are nn.Embedding subclasses whose table holds codes
    return isinstance(module, nn.Embedding) and not module.weight.is_floating_point()


def is_adaptable(module: nn.Module) -> bool:
    """Whether a view exists for this module type."""
    if _quantized_embedding(module):
        return False
    return isinstance(module, (nn.Linear, nn.Embedding)) or (
        Conv1D is not None and isinstance(module, Conv1D)
    )


def is_linear(module: nn.Module) -> bool:
    """A dense linear layer in the sense of `"all-linear"` (nn.Linear or transformers' Conv1D)."""
    return isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D))


def view_of(module: nn.Module) -> BaseView:
    """The view of a base layer.

    Raises:
        TypeError: the module type has no view (name the supported types), or a quantized layer that cannot be
            adapted (not quantized yet).
    """
    backend = backend_of(module)
    if backend is not None:  # before nn.Linear: bitsandbytes' layers subclass it
        return QuantizedLinearView(module, backend)
    if isinstance(module, nn.Linear):
        return LinearView(module)
    if Conv1D is not None and isinstance(module, Conv1D):
        return TransposedLinearView(module)
    if isinstance(module, nn.Embedding) and not _quantized_embedding(module):
        return EmbeddingView(module)
    raise TypeError(
        f"cannot adapt a {type(module).__name__}: supported base layers are torch.nn.Linear (bitsandbytes' "
        "Linear4bit and Linear8bitLt included), torch.nn.Embedding and transformers' Conv1D"
    )


@torch.no_grad()
def dense_weight(module: nn.Module) -> Tensor:
    """W0 (out, in) of any adaptable module, detached."""
    return view_of(module).weight().detach()
