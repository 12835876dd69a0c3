"""Equal budgets: `rank_for_budget` finds the largest rank within a parameter budget, and the `classify` suite's
`budget` preset holds exactly the ranks it finds for MiniLM's query/value layers against LoRA r = 8."""

from __future__ import annotations

import pytest
import torch

from loraredux import assets
from loraredux.bench.budget import rank_for_budget, trainable_count
from loraredux.bench.suites import BUDGET_RANKS, SPECS
from tiny_models import tiny_llama


def test_the_largest_rank_within_the_budget_is_found():
    model = tiny_llama()
    targets = ["q_proj", "v_proj"]
    budget = trainable_count(model, "lora", targets, 3)
    assert budget == 2 * 3 * ((16 + 16) + (16 + 8))  # two layers: q 16 -> 16, v 16 -> 8
    assert rank_for_budget(model, "lora", targets, budget) == (3, budget)
    assert (
        rank_for_budget(model, "lora", targets, budget + 1)[0] == 3
    )  # one more parameter buys nothing
    # LoTR: r (16 + 16) + 2 r^2 for q, r (8 + 16) + 2 r^2 for v (one bank per shape)
    rank, count = rank_for_budget(model, "lotr", targets, budget)
    assert count == rank * 32 + 2 * rank**2 + rank * 24 + 2 * rank**2 <= budget
    assert (rank + 1) * 56 + 4 * (
        rank + 1
    ) ** 2 > budget or rank + 1 > 8  # the next rank is over (or unbuildable)
    with pytest.raises(ValueError, match="at rank 1 already trains more than 10"):
        rank_for_budget(model, "lora", targets, 10)
    assert not hasattr(model, "loraredux_banks")  # the model itself was never adapted
    assert all(p.requires_grad for p in model.parameters())


def test_the_budget_preset_holds_the_ranks_found_for_minilm():
    torch.manual_seed(0)
    model, _ = assets.load_minilm(num_labels=2)
    targets = ["query", "value"]
    budget = trainable_count(model, "lora", targets, 8)
    assert budget == 73_728
    preset = SPECS["classify"]["budget"]
    for variant in preset["variants"][1:]:
        (method,) = variant["methods"]
        name, options = (
            (method, {}) if isinstance(method, str) else (method["name"], method["options"])
        )
        found, count = rank_for_budget(model, name, targets, budget, max_rank=8192, **options)
        assert variant["ranks"] == [found] == [BUDGET_RANKS[name]], name
        assert 0.95 * budget < count <= budget, name  # within 5% of LoRA's budget, never above
