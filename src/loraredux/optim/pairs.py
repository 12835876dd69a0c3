"""Explicit (A, B) factor pairs of an adapted model, for optimizers that treat the two factors of B A together.

A pair is found by structure: an adapter that exposes `factor_pair()` (LoRA, DoRA) names its own A (r, in) and
B (out, r) with W' = W0 + s B A (DoRA: the direction W0 + s B A). Nothing is paired by list position or by
parameter-name prefixes (DESIGN.md §5).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..verbs import adapters

__all__ = ["Pair", "find_pairs"]


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
