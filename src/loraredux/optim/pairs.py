"""Explicit (A, B) factor pairs of an adapted model, for optimizers that treat the two factors of B A together.

A pair is found by structure: an adapter that exposes `factor_pair()` (LoRA, DoRA) names its own A (r, in) and
B (out, r) with W' = W0 + s B A (DoRA: the direction W0 + s B A). Nothing is paired by list position or by
parameter-name prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..verbs import adapters

__all__ = ["Pair", "find_pairs", "split_model"]


@dataclass(frozen=True)
class Pair:
    """One adapted layer's factors.

    Attributes:
        name: the layer's path in the model.
        A: (r, in), the input-side factor.
        B: (out, r), the output-side factor.
        scale: s in W' = W0 + s B A.
    """

    name: str
    A: nn.Parameter
    B: nn.Parameter
    scale: float

    def check(self) -> None:
        """Raises ValueError unless A is (r, in) and B is (out, r) with the same r. (Whether a factor must be
        trainable is the optimizer's business: LoRA-FA freezes A.)"""
        if self.A.ndim != 2 or self.B.ndim != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(
                f"{self.name}: a factor pair needs A (r, in) and B (out, r) with the same r, got A "
                f"{tuple(self.A.shape)} and B {tuple(self.B.shape)}"
            )


def find_pairs(model: nn.Module) -> list[Pair]:
    """The factor pairs of every adapted layer that has one, in module order (each checked)."""
    found = []
    for name, adapter in adapters(model):
        get = getattr(adapter, "factor_pair", None)
        if not callable(get):
            continue
        A, B = get()
        pair = Pair(name=name, A=A, B=B, scale=float(adapter.scale))
        pair.check()
        found.append(pair)
    return found


def split_model(model: nn.Module, optimizer: str) -> tuple[list[Pair], list[nn.Parameter]]:
    """The model's factor pairs and its other trainable parameters, for the pair optimizer `optimizer`.

    Raises:
        ValueError: the model has no trainable parameter, or no factor pair.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameter: adapt it first (lx.adapt_)"
        )
    pairs = find_pairs(model)
    if not pairs:
        raise ValueError(
            f"{optimizer} needs factor pairs (LoRA or DoRA adapters); the model has none"
        )
    paired = {id(t) for pair in pairs for t in (pair.A, pair.B)}
    return pairs, [p for p in params if id(p) not in paired]
