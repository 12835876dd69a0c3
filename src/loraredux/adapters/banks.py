"""Shared cross-layer state (issue 7): the bank modules that many adapted layers compute with.

A bank lives once per model, registered by `lx.adapt_` at the root as `loraredux_banks.<key>` (an `nn.ModuleDict`),
and each adapter that uses it holds a plain reference (not a submodule) and its coordinates in the bank. So the
model's parameters, `.to()`, `model.state_dict()` and `lx.adapter_state_dict` see each shared tensor once, however
many layers use it; `lx.merge_` and `lx.unadapt_` remove the banks with the adapters.

Layers of different shapes cannot share one (out, in) factor: `shape_groups` splits a plan by shape (attention
against MLP, grouped-query attention's narrower K/V), and each group gets its own bank. VeRA instead keeps PEFT's
one bank of the largest shape, sliced per layer, so that its files are PEFT's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..bases import view_of

__all__ = ["Bank", "shape_groups", "use_bank"]


class Bank(nn.Module):
    """A shared module with the key it is registered under (`loraredux_banks.<key>`)."""

    def __init__(self, key: str) -> None:
        super().__init__()
        if not key or "." in key:
            raise ValueError(f"a bank key is a non-empty name without dots, got {key!r}")
        self.key = key

    def extra_repr(self) -> str:
        return f"key={self.key!r}"


def use_bank(adapter: nn.Module, bank: Bank) -> None:
    """Give `adapter` a reference to `bank` that is not a submodule (so its tensors are not the adapter's)."""
    object.__setattr__(adapter, "_bank", bank)


def shape_groups(layers: Mapping[str, tuple[nn.Module, Any]]) -> dict[tuple[int, int], list[str]]:
    """The paths of a plan (`{path: (module, config)}`) grouped by their (out, in) shape, each group in plan order,
    the groups in order of their first layer."""
    groups: dict[tuple[int, int], list[str]] = {}
    for path, (module, _) in layers.items():
        view = view_of(module)
        groups.setdefault((view.out_features, view.in_features), []).append(path)
    return groups
