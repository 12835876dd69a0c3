"""Rank augmentation, side by side: at LoRA's parameter budget, which ranks can each method's update reach?

One 32 x 32 layer with a full-rank W0; LoRA at r = 8 spends 8 (32 + 32) = 512 trainable numbers and its update has
rank 8 at most. Each method below gets a config of at most that budget, random trainable values (float64), and the
numerical rank of W' - W0 is measured. The per-method files prove each bound in general; this table shows the
survey's point in one place: HiRA, LoHa, LoKr, MoRA, ABBA, KronA and SVFT exceed r where LoRA cannot.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loraredux as lx

IN = OUT = 32
LORA_RANK = 8
BUDGET = LORA_RANK * (IN + OUT)

# (method, fields, rank the update reaches with random values)
CASES = [
    ("lora", {"rank": 8}, 8),
    ("hira", {"rank": 8}, 32),  # W0 ⊙ (B A): rank <= rank(W0) r, full here
    ("loha", {"rank": 4}, 16),  # 2 r (in + out) = 512: rank r^2
    ("abba", {"rank": 4}, 16),  # (r1 + r2)(in + out) = 512: rank r1 r2
    ("mora", {"rank": 8, "compress": "sharing"}, 22),  # r_hat = floor(sqrt(64 * 8)) = 22
    ("mora", {"rank": 8, "compress": "rotation"}, 32),  # rotated chunks: full rank
    ("lokr", {"rank": 8}, 32),  # 4 x 4 ⊗ 8 x 8: rank 4 * 8
    ("krona", {}, 32),  # 4 x 4 ⊗ 8 x 8
    ("svft", {"pattern": "plain"}, 32),  # one coefficient per singular value
    (
        "lora_xs",
        {"rank": 8},
        8,
    ),  # r^2 = 64 numbers, but rank r: a cheaper LoRA, not an augmentation
]


@pytest.mark.parametrize(("method", "fields", "rank"), CASES, ids=[f"{m}-{f}" for m, f, _ in CASES])
def test_rank_reached_at_loras_parameter_budget(method: str, fields: dict, rank: int) -> None:
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT).double()
    adapter = lx.config(method, **fields).build(base)
    params = [p for p in adapter.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) <= BUDGET
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    reached = int(torch.linalg.matrix_rank(adapter.delta_weight().detach()))
    assert reached == rank
    if method not in ("lora", "lora_xs"):
        assert reached > LORA_RANK
