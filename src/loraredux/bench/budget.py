"""Equal-budget comparisons: the rank at which a method trains as many parameters as a reference.

`rank_for_budget(model, method, targets, budget)` adapts copies of the model at trial ranks (bisection: a method's
trainable count grows with its rank) and returns the largest rank whose count does not exceed the budget, with that
count. The `classify` suite's `budget` preset holds the ranks it found for MiniLM's query/value layers against LoRA
r = 8, and a test checks they still are what it finds.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

import loraredux as lx

__all__ = ["rank_for_budget", "trainable_count"]


def trainable_count(
    model: nn.Module, method: str, targets: Sequence[str], rank: int, **fields: Any
) -> int:
    """The adapter parameters a method trains on a copy of `model` at `rank` (the model is left alone)."""
    probe = copy.deepcopy(model)
    with lx.core.skip_initialisation():  # counts only: no initial values needed
        lx.adapt_(probe, lx.config(method, rank=rank, **fields), list(targets))
    return sum(p.numel() for p in lx.trainable_parameters(probe).values())


def rank_for_budget(
    model: nn.Module,
    method: str,
    targets: Sequence[str],
    budget: int,
    *,
    max_rank: int = 1 << 16,
    **fields: Any,
) -> tuple[int, int]:
    """The largest rank whose trainable count is at most `budget` (among the ranks the method can build on these
    layers), and that count.

    Raises:
        ValueError: even rank 1 trains more than the budget.
    """

    def fits(rank: int) -> bool:
        try:
            return trainable_count(model, method, targets, rank, **fields) <= budget
        except (
            ValueError
        ):  # a rank the layers cannot take (above min(in, out), ...) is out of reach too
            return False

    low, high = 1, max_rank
    if not fits(low):
        raise ValueError(f"{method} at rank 1 already trains more than {budget} parameters")
    while low < high:  # invariant: fits(low)
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low, trainable_count(model, method, targets, low, **fields)
