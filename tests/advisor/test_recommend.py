"""The advisor end to end on planted problems with known answers:

- two layers fed the same inputs, whose targets differ from W0 by updates of rank 2 and rank 8: the advisor
  recovers 2 and 8 as the layers' ranks (a rank pattern), and the configuration it returns builds those ranks;
- targets that differ from W0 x by label noise only: every layer gets the minimal rank, and the init stays kaiming;
- an update planted in W0's principal (minor) singular subspace: PiSSA (MiLoRA) is picked, and the other is not;
- the global rules from their inputs (optimizer, method, base format, serving), and bad input named.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import loraredux as lx
from loraredux.advisor import rules
from loraredux.advisor.measure import (
    LayerMeasurement,
    measure_layer,
    optimal_threshold,
    spectrum_stats,
)
from loraredux.advisor.recommend import advise, parse_bytes

D_IN, D_OUT = 48, 64


class TwoBranches(nn.Module):
    """Two linear layers on the same input; the output is their outputs side by side."""

    def __init__(self, W_a: torch.Tensor, W_b: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Linear(D_IN, D_OUT, bias=False, dtype=torch.float64)
        self.b = nn.Linear(D_IN, D_OUT, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.a.weight.copy_(W_a)
            self.b.weight.copy_(W_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=-1)


def orthonormal(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q


def decaying_weight(g: torch.Generator) -> torch.Tensor:
    U, V = orthonormal(D_OUT, D_IN, g), orthonormal(D_IN, D_IN, g)
    s = torch.logspace(0, -2, D_IN, dtype=torch.float64)
    return U @ torch.diag(s) @ V.T


def low_rank(rank: int, g: torch.Generator, size: float = 1.0) -> torch.Tensor:
    return size * orthonormal(D_OUT, rank, g) @ orthonormal(D_IN, rank, g).T


def regression_batches(
    model: TwoBranches, updates: tuple[torch.Tensor, torch.Tensor], noise: float, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """16 batches of 128 Gaussian inputs, targets (W + ΔW) x + noise for each branch."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(16):
        x = torch.randn(128, D_IN, generator=g, dtype=torch.float64)
        with torch.no_grad():
            clean = model(x) + torch.cat([x @ updates[0].T, x @ updates[1].T], dim=-1)
        out.append(
            {
                "x": x,
                "y": clean + noise * torch.randn(clean.shape, generator=g, dtype=torch.float64),
            }
        )
    return out


def mse(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (model(batch["x"]) - batch["y"]).pow(2).mean()


def test_planted_ranks_per_layer_are_recovered_and_become_a_rank_pattern():
    g = torch.Generator().manual_seed(0)
    model = TwoBranches(decaying_weight(g), decaying_weight(g))
    updates = (low_rank(2, g), low_rank(8, g))
    batches = regression_batches(model, updates, noise=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    rec = advise(model, batches, mse, targets=["a", "b"], max_rank=32)

    assert rec.layers["a"].rank == 2 and rec.layers["b"].rank == 8
    assert rec.layers["a"].measurement.needed_rank == 2
    assert rec.layers["b"].measurement.needed_rank == 8
    assert "Gavish-Donoho" in rec.layers["b"].reason
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # left alone
    assert rec.rank in (2, 8) and set(rec.rank_pattern) == (
        {"a", "b"} - {"a" if rec.rank == 2 else "b"}
    )
    # rsLoRA with alpha = 2√8: every layer's scale is 2√(8 / r), the default's s = 2 at r = 8
    assert (
        rec.alpha == pytest.approx(2 * 8**0.5) and rec.config().rslora and rec.alpha_pattern == {}
    )

    rec.apply_(model, calibration=batches, loss_fn=mse)
    adapters = dict(lx.adapters(model))
    assert adapters["a"].A.shape[0] == 2 and adapters["b"].A.shape[0] == 8
    assert adapters["a"].scale == pytest.approx(2 * (8 / 2) ** 0.5)
    assert adapters["b"].scale == pytest.approx(2.0)


def test_pure_noise_gets_the_minimal_rank_and_the_plain_init():
    g = torch.Generator().manual_seed(1)
    model = TwoBranches(decaying_weight(g), decaying_weight(g))
    zero = torch.zeros(D_OUT, D_IN, dtype=torch.float64)
    batches = regression_batches(model, (zero, zero), noise=1.0, seed=1)

    rec = advise(model, batches, mse, targets=["a", "b"], min_rank=1)

    for advice in rec.layers.values():
        assert advice.measurement.needed_rank == 0
        assert advice.rank == 1 and "the minimum" in advice.rank_reason
        assert advice.init == "kaiming"
    assert rec.rank == 1 and rec.init == "kaiming" and rec.rank_pattern == {}
    assert rec.optimizer == "adamw"
    rec2 = advise(model, batches, mse, targets=["a", "b"], min_rank=4)
    assert {a.rank for a in rec2.layers.values()} == {4}


@pytest.mark.parametrize("where, expected, not_expected", [
    ("principal", "pissa", "milora"),
    ("minor", "milora", "pissa"),
])  # fmt: skip
def test_the_init_follows_the_subspace_the_update_lies_in(where, expected, not_expected):
    g = torch.Generator().manual_seed(2)
    W = decaying_weight(g)
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    cols = slice(0, 3) if where == "principal" else slice(D_IN - 3, D_IN)
    update = U[:, cols] @ torch.diag(torch.tensor([0.5, 0.4, 0.3], dtype=torch.float64)) @ Vh[cols]
    model = TwoBranches(W, W.clone())
    batches = regression_batches(model, (update, update), noise=0.05, seed=2)

    rec = advise(model, batches, mse, targets=["a", "b"])

    for advice in rec.layers.values():
        assert advice.measurement.needed_rank == 3
        assert advice.init == expected, advice.reason
        assert where in advice.init_reason
    assert rec.init == expected and rec.init != not_expected


def test_a_sharp_gradient_outside_w0s_subspaces_gets_a_gradient_start():
    g = torch.Generator().manual_seed(3)
    model = TwoBranches(decaying_weight(g), decaying_weight(g))
    update = low_rank(2, g, size=2.0)  # random directions: neither principal nor minor
    batches = regression_batches(model, (update, update), noise=0.01, seed=3)

    rec = advise(model, batches, mse, targets=["a", "b"])

    for advice in rec.layers.values():
        m = advice.measurement
        assert m.principal_alignment < rules.ALIGNED and m.minor_alignment < rules.ALIGNED
        assert advice.init == "lora_one", advice.reason
    rec.apply_(model, calibration=batches, loss_fn=mse)  # lora_one reads the calibration batches
    with pytest.raises(ValueError, match="calibration=batches"):
        rec.apply_(TwoBranches(decaying_weight(g), decaying_weight(g)))


def test_many_adapters_over_little_storage_share_one_basis():
    g = torch.Generator().manual_seed(7)
    model = TwoBranches(decaying_weight(g), decaying_weight(g))
    updates = (low_rank(2, g), low_rank(8, g))
    batches = regression_batches(model, updates, noise=0.5, seed=7)
    rec = advise(model, batches, mse, targets=["a", "b"], adapters=10_000, storage="10MiB")
    assert rec.method == "lotr" and "10000 LoRA adapters take" in rec.choices["method"].reason
    assert rec.choices["serving"].value == "unmerged-multi-adapter"
    assert rec.optimizer == "adamw"  # the pair optimizers do not train a shared basis
    kwargs = rec.adapt_kwargs()
    assert (
        kwargs["rank_pattern"] is None and kwargs["alpha_pattern"] is None
    )  # one rank for a shared bank
    rec.apply_(model)
    assert {type(a).__name__ for _, a in lx.adapters(model)} == {"LoTR"}


def test_without_data_the_defaults_are_named_as_such():
    g = torch.Generator().manual_seed(4)
    model = TwoBranches(decaying_weight(g), decaying_weight(g))
    rec = advise(model, targets=["a", "b"])
    assert rec.rank == rules.DEFAULT_RANK and rec.init == "kaiming" and rec.method == "lora"
    assert "no calibration data" in rec.layers["a"].reason
    assert rec.memory is None and "no transformers config" in rec.choices["base"].reason
    data = rec.to_dict()
    json.dumps(data)  # JSON-ready
    assert (
        data["config"]
        == lx.config("lora", rank=8, alpha=2 * 8**0.5, rslora=True, init="kaiming").to_dict()
    )  # s = alpha / √8 = 2, the default's
    assert data["layers"]["a"]["gradient"] is None
    assert len(data["layers"]["a"]["weight"]["singular_values"]) == D_IN


def test_bad_arguments_are_refused_by_name():
    g = torch.Generator().manual_seed(5)
    model = TwoBranches(decaying_weight(g), decaying_weight(g))
    with pytest.raises(ValueError, match="max_rank 2 is below min_rank 4"):
        advise(model, targets=["a"], min_rank=4, max_rank=2)
    with pytest.raises(ValueError, match="adapters must be an integer >= 1"):
        advise(model, targets=["a"], adapters=0)
    with pytest.raises(ValueError, match="cannot read '24 parsecs' as a memory size"):
        advise(model, targets=["a"], budget="24 parsecs")
    with pytest.raises(ValueError, match="match no module of TwoBranches"):
        advise(model, targets=["nothing"])
    assert parse_bytes("24GiB") == 24 << 30 and parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes(1024) == 1024 and parse_bytes(None) is None


# ------------------------------------------------------------------------------------ the global rules alone


def measured(values: list[float], threshold: float) -> LayerMeasurement:
    s = torch.tensor(values, dtype=torch.float64)
    return LayerMeasurement(
        weight=spectrum_stats(torch.ones(4, dtype=torch.float64)),
        gradient=spectrum_stats(s),
        noise=threshold / 10,
        needed_rank=int((s > threshold).sum()),
        gradient_values=s,
        threshold=threshold,
    )


def test_the_optimizer_turns_gauge_invariant_only_for_strong_ill_conditioned_updates():
    ill = measured([100.0, 20.0, 5.0, 0.1], threshold=1.0)  # strong part 100..5: κ = 20
    mild = measured([10.0, 8.0, 5.0, 0.1], threshold=1.0)  # κ = 2
    weak = measured([2.0, 1.5, 0.1], threshold=1.0)  # nothing above 3 τ
    assert rules.choose_optimizer({"x": ill, "y": ill, "z": mild}).value == "lora_rite"
    assert rules.choose_optimizer({"x": ill, "y": mild, "z": mild}).value == "adamw"
    choice = rules.choose_optimizer({"x": weak})
    assert choice.value == "adamw" and "two singular values well above the noise" in choice.reason
    assert rules.choose_optimizer({"x": ill}, shared=True).value == "adamw"


def test_the_method_rule():
    needed = {"x": 3, "y": 5}
    ranks = {"x": 3, "y": 5}
    assert rules.choose_method(needed, ranks, max_rank=64).value == "lora"
    assert rules.choose_method({"x": 80, "y": 100}, {"x": 64, "y": 64}, max_rank=64).value == "mora"
    assert rules.choose_method({"x": 1, "y": 2}, {"x": 1, "y": 2}, max_rank=64).value == "dora"
    assert rules.choose_method({"x": 1, "y": 2}, {"x": 1, "y": 2}, max_rank=64,
                               dora_fits=False).value == "lora"  # fmt: skip
    shared = rules.choose_method(needed, ranks, max_rank=64, adapters=1000,
                                 storage_bytes=10 << 20, adapter_bytes=1 << 20)  # fmt: skip
    assert shared.value == "lotr" and "1000 LoRA adapters take 1000.00 MiB" in shared.reason
    assert rules.choose_method(needed, ranks, max_rank=64, adapters=5,
                               storage_bytes=10 << 20, adapter_bytes=1 << 20).value == "lora"  # fmt: skip
    assert rules.choose_method({"x": None}, {"x": 8}, max_rank=64).value == "lora"


def test_the_base_format_is_the_widest_that_fits():
    totals = {"bf16": 30 << 30, "int8": 18 << 30, "nf4": 12 << 30}
    assert rules.choose_base(totals, 24 << 30).value == "int8"
    assert rules.choose_base(totals, 40 << 30).value == "bf16"
    tight = rules.choose_base(totals, 8 << 30)
    assert tight.value == "nf4" and "nothing fits" in tight.reason
    assert rules.choose_base(totals, None, current="bf16").value == "bf16"


def test_alpha_gives_every_rank_the_default_step():
    # s√r stays 2√8 at every rank: with rsLoRA (s = alpha / √r) through one alpha, else (s = alpha / r) per layer
    for r in (1, 2, 8, 27):
        assert rules.layer_alpha(r) / r * r**0.5 == pytest.approx(2 * 8**0.5)
    assert rules.layer_alpha(8) == pytest.approx(16.0)
    rs = rules.choose_alpha(15, rslora=True)
    assert rs.value == pytest.approx(2 * 8**0.5) and "rsLoRA" in rs.reason
    plain = rules.choose_alpha(2, rslora=False)
    assert plain.value == pytest.approx(8.0) and "alpha pattern" in plain.reason


def test_serving_and_the_global_rank():
    assert rules.choose_serving(1).value == "merge"
    many = rules.choose_serving(10, base_bytes=1 << 30)
    assert many.value == "unmerged-multi-adapter" and "10.00 GiB" in many.reason
    assert rules.choose_rank({"a": 4, "b": 4, "c": 8}).value == 4
    assert rules.choose_rank({"a": 4, "b": 8}).value == 8  # a tie goes to the larger
    with pytest.raises(ValueError, match="no layer ranks"):
        rules.choose_rank({})


def test_measure_layer_keeps_the_threshold_it_used():
    g = torch.Generator().manual_seed(6)
    W = decaying_weight(g)
    signal = low_rank(2, g)
    grads = [signal + 0.01 * torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
             for _ in range(6)]  # fmt: skip
    m = measure_layer(W, grads)
    assert m.needed_rank == int((m.gradient_values > m.threshold).sum()) == 2
    assert m.threshold == pytest.approx(optimal_threshold((D_OUT, D_IN), m.noise))


# ------------------------------------------------------------------------------------ no surer than the evidence


def test_fewer_than_two_calibration_batches_are_refused_with_the_reason():
    g = torch.Generator().manual_seed(6)
    model = TwoBranches(decaying_weight(g), decaying_weight(g))
    batches = regression_batches(model, (low_rank(2, g), low_rank(2, g)), noise=0.1)
    for n in (0, 1):
        with pytest.raises(
            ValueError, match=r"batches: the advisor needs at least 2 .* two halves"
        ):
            advise(model, batches[:n], mse, targets=["a"])
    assert advise(model, batches[:2], mse, targets=["a"]).layers["a"].measurement.noise is not None


def test_an_adapted_model_is_refused_with_what_to_do():
    g = torch.Generator().manual_seed(7)
    model = TwoBranches(decaying_weight(g), decaying_weight(g))
    lx.adapt_(model, lx.config("lora", rank=2), targets=["a", "b"])
    with pytest.raises(ValueError, match=r"already adapted .* lx\.unadapt_\(model\)"):
        advise(model, targets="all-linear")
    lx.unadapt_(model)
    assert set(advise(model, targets="all-linear").layers) == {"a", "b"}


def test_the_config_rank_says_how_many_layers_hold_it_and_the_median():
    # the minilm case: the most common rank (5) is held by 4 of 12 layers, the median is 12
    ranks = dict(enumerate([14, 13, 15, 5, 15, 5, 14, 5, 14, 5, 1, 11]))
    choice = rules.choose_rank(ranks)
    assert choice.value == 5
    assert choice.reason.startswith(
        "rank 5 is only the config's r (4 of 12 layers; layer ranks 1-15, median 12)"
    )
    assert "not the rank most layers get" in choice.reason and "the 8 others" in choice.reason
    # a rank most layers hold says so, and the one other layer is named in the singular
    most = rules.choose_rank({"a": 4, "b": 4, "c": 8})
    assert most.reason == (
        "rank 4, the rank of most layers (2 of 3 layers; layer ranks 4-8, median 4); the other layer gets its "
        "own rank in the rank pattern"
    )
    assert (
        rules.choose_rank({"a": 3, "b": 3}).reason == "rank 3: every one of the 2 layers needs it"
    )


def test_the_base_reason_says_what_its_estimate_counts():
    totals = {"bf16": 30 << 30, "int8": 18 << 30}
    counts = (
        "the base weights, ..., and the activations of one training step on 8 × 512 tokens on cuda"
    )
    reason = rules.choose_base(totals, 24 << 30, counts=counts).reason
    assert reason == (
        "int8: the widest format whose training estimate, 18.00 GiB, fits the 24.00 GiB budget (bf16 30.00 GiB "
        f"would not fit); each estimate counts {counts}"
    )
    assert (
        "training estimate at bf16 is 30.00 GiB"
        in rules.choose_base(totals, None, counts=counts).reason
    )


def test_the_phases_are_logged_and_the_bar_can_be_turned_off(caplog):
    g = torch.Generator().manual_seed(8)
    model = TwoBranches(decaying_weight(g), decaying_weight(g))
    batches = regression_batches(model, (low_rank(2, g), low_rank(2, g)), noise=0.1)[:4]
    with caplog.at_level("INFO", logger="loraredux.advisor"):
        advise(model, batches, mse, targets=["a", "b"], progress=False)
    messages = [r.getMessage() for r in caplog.records]
    assert "advise: measuring TwoBranches on 4 calibration batches" in messages
    assert "measuring layer 1/2: a" in messages and "measuring layer 2/2: b" in messages
    assert any(
        m.startswith("calibration pass 1/1: gradients and inputs of layers 1-2 of 2")
        for m in messages
    )


def test_a_transformers_model_gets_a_base_reason_that_names_what_its_estimate_counts():
    from tiny_models import tiny_bert

    model = tiny_bert()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 64, (4, 16), generator=g),
                "labels": torch.randint(0, 3, (4,), generator=g)} for _ in range(2)]  # fmt: skip
    rec = advise(model, batches, targets=["query", "value"], device="cpu", progress=False)
    assert rec.memory is not None and rec.base == "fp32"
    assert rec.choices["base"].reason.endswith(
        "; each estimate counts the base weights at that format, the adapters, their gradients and optimizer "
        "states, and the activations of one training step on 4 × 16 tokens on cpu; an estimate, not a "
        "measurement"
    )
    layer = rec.to_dict()["layers"]["bert.encoder.layer.0.attention.self.query"]
    assert layer["reason"] == f"{layer['rank_reason']}. {layer['init_reason']}."
