"""Views of a frozen base layer, so every adapter sees one shape of thing: a linear map W0 of shape (out, in).

`nn.Linear` stores W0 as (out, in); transformers' `Conv1D` (GPT-2) stores its transpose (in, out); `nn.Embedding`
is the linear map from a one-hot token (in = num_embeddings) to a vector (out = embedding_dim), so W0 is the transpose
of its table. A view hides those conventions: adapters ask for `weight()` in (out, in) orientation, call
`forward_with(x, W)` to run the layer's own operation with any (out, in) weight, and `project(x, A)` to compute the
low-rank input projection x A^T in the layer's own input domain.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # transformers is a dependency, but keep the view usable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]

__all__ = [
    "BaseView",
    "EmbeddingView",
    "LinearView",
    "TransposedLinearView",
    "is_adaptable",
    "view_of",
]


class BaseView:
    """The frozen layer seen as y = op(x, W0) + bias with W0 of shape (out, in)."""

    kind: str = "linear"
    #: Whether dropout may be applied to the layer's input (not for integer token ids).
    input_is_dense: bool = True

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


def is_adaptable(module: nn.Module) -> bool:
    """Whether a view exists for this module type."""
    return isinstance(module, (nn.Linear, nn.Embedding)) or (
        Conv1D is not None and isinstance(module, Conv1D)
    )


def is_linear(module: nn.Module) -> bool:
    """A dense linear layer in the sense of `"all-linear"` (nn.Linear or transformers' Conv1D)."""
    return isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D))


def view_of(module: nn.Module) -> BaseView:
    """The view of a base layer.

    Raises:
        TypeError: the module type has no view (name the supported types).
    """
    if isinstance(module, nn.Linear):
        return LinearView(module)
    if Conv1D is not None and isinstance(module, Conv1D):
        return TransposedLinearView(module)
    if isinstance(module, nn.Embedding):
        return EmbeddingView(module)
    raise TypeError(
        f"cannot adapt a {type(module).__name__}: supported base layers are torch.nn.Linear, "
        "torch.nn.Embedding and transformers' Conv1D"
    )


@torch.no_grad()
def dense_weight(module: nn.Module) -> Tensor:
    """W0 (out, in) of any adaptable module, detached."""
    return view_of(module).weight().detach()
