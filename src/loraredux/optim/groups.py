"""What the pair optimizers share: one parameter group per factor pair, the option checks, the gradient checks.

Each pair is its own group (`{"params": [...], "pair": layer path}`), so the pair is explicit and per-group
options (`lr`, `delta`) can be changed by the user; other trainable tensors form one group with `"pair": None`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .pairs import Pair

__all__ = [
    "CheckedAdamW",
    "check_choice",
    "check_count",
    "check_finite",
    "check_options",
    "checked_grad",
    "evaluate",
    "pair_groups",
    "set_group_defaults",
]


def checked_grad(p: Tensor, name: str) -> Tensor:
    """p's gradient (zeros if it has none).

    Raises:
        FloatingPointError: a non-finite entry (raised before any parameter changes).
    """
    g = p.grad if p.grad is not None else torch.zeros_like(p)
    if not torch.isfinite(g).all():
        raise FloatingPointError(
            f"{name}: the gradient has non-finite entries; no parameter was changed"
        )
    return g


def check_finite(param_groups: Sequence[dict[str, Any]]) -> None:
    """Every gradient in the groups is finite (one reduction, one device sync).

    Raises:
        FloatingPointError: naming the group's pair (or the parameter's shape) of the first non-finite gradient;
            raised before any parameter changes.
    """
    found = [(g, p) for g in param_groups for p in g["params"] if p.grad is not None]
    if not found:
        return
    finite = torch.stack([p.grad.isfinite().all() for _, p in found])
    if bool(finite.all()):
        return
    group, p = found[int((~finite).nonzero()[0])]
    where = group.get("pair") or f"a parameter of shape {tuple(p.shape)}"
    raise FloatingPointError(
        f"{where}: the gradient has non-finite entries; no parameter was changed"
    )


class CheckedAdamW(torch.optim.AdamW):
    """torch's AdamW that refuses a non-finite gradient (FloatingPointError, nothing changed) instead of writing
    NaN into the weights and moments; otherwise the same step. (Under AMP, `GradScaler.step` skips steps with
    inf gradients before calling this, as with any optimizer.)"""

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Evaluate the closure, check every gradient, then AdamW's step."""
        loss = evaluate(closure)
        check_finite(self.param_groups)
        super().step()
        return loss


def pair_groups(
    pairs: Sequence[Pair],
    others: Sequence[nn.Parameter],
    factors: Callable[[Pair], list[nn.Parameter]] = lambda pair: [pair.A, pair.B],
) -> list[dict[str, Any]]:
    """One group per pair holding `factors(pair)` (each pair checked) with its layer path ("pair") and its scale s
    ("scale"), plus one group of the others ("pair": None).

    Raises:
        ValueError: a pair whose shapes do not match, a factor to optimize that is frozen, or no parameters.
    """
    groups: list[dict[str, Any]] = []
    for pair in pairs:
        pair.check()
        params = factors(pair)
        if not all(p.requires_grad for p in params):
            raise ValueError(
                f"{pair.name}: a factor this optimizer trains is frozen (requires_grad=False); unfreeze it "
                "(another optimizer, such as lora_fa, may have frozen it)"
            )
        groups.append({"params": params, "pair": pair.name, "scale": pair.scale})
    if others:
        groups.append({"params": list(others), "pair": None})
    if not groups:
        raise ValueError("no parameters to optimize (is the model adapted?)")
    return groups


def check_options(lr: float, delta: float) -> None:
    """Raises ValueError unless lr > 0 and delta >= 0."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not delta >= 0:
        raise ValueError(f"delta must be >= 0, got {delta!r}")


def check_count(name: str, value: Any, least: int) -> None:
    """Raises ValueError unless `value` is an integer >= least (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raises ValueError unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def set_group_defaults(optimizer: torch.optim.Optimizer, **defaults: Any) -> None:
    """Options a base optimizer (AdamW) does not know, as defaults and in every group."""
    optimizer.defaults.update(defaults)
    for group in optimizer.param_groups:
        for key, value in defaults.items():
            group.setdefault(key, value)


def evaluate(closure: Callable[[], Tensor] | None) -> Tensor | None:
    """The closure's loss, with autograd on (step runs under no_grad); evaluated before any gradient is used."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
