"""The contract every optimizer in `lx.optim.available()` keeps: it descends, its state round-trips (save, load and
continue equals never stopping), a closure works, per-group options are honoured, bad input is refused without
changing anything, and it is gauge invariant exactly when it claims to be (optim_cases.GAUGE_INVARIANT)."""

from __future__ import annotations

import copy

import pytest
import torch
from optim_cases import (
    CONTRACT_OPTIONS,
    GAUGE_INVARIANT,
    LAYERS,
    closure_for,
    data,
    loss_of,
    regauged,
    relative_gap,
    steps,
    two_layer_model,
    weights,
)
from torch import nn

import loraredux as lx
from loraredux.optim import available, create

NAMES = available()
USES_CLOSURE = {
    "als"
}  # a closure changes what the step does (exact block solves), so no step() twin for these


def make(name: str, model: nn.Module, **extra):
    options = {"lr": 1e-2, **CONTRACT_OPTIONS.get(name, {}), **extra}
    return create(name, model, **options)


def test_every_optimizer_is_in_the_tables():
    assert set(CONTRACT_OPTIONS) <= set(NAMES) and set(GAUGE_INVARIANT) <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_descends(name):
    model = two_layer_model()
    x, y = data()
    opt = make(name, model)
    assert isinstance(opt, torch.optim.Optimizer)
    before = loss_of(model, x, y).item()
    steps(model, opt, x, y, n=20)
    assert loss_of(model, x, y).item() < 0.98 * before


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trips_and_continuing_equals_never_stopping(name):
    x, y = data()
    model = two_layer_model()
    opt = make(name, model)
    steps(model, opt, x, y, n=2)
    state = opt.state_dict()
    for per_param in state[
        "state"
    ].values():  # tensors only, so torch.save / safetensors-style stores can hold it
        for key, value in per_param.items():
            assert isinstance(value, torch.Tensor), (key, type(value))
    twin = copy.deepcopy(model)
    twin_opt = make(name, twin, lr=1.0)  # a different lr: the loaded groups must win
    twin_opt.load_state_dict(copy.deepcopy(state))
    steps(model, opt, x, y, n=3)
    steps(twin, twin_opt, x, y, n=3)
    for layer, w in weights(model).items():
        torch.testing.assert_close(weights(twin)[layer], w, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_a_closure_works(name):
    x, y = data()
    model = two_layer_model()
    opt = make(name, model)
    loss = opt.step(closure_for(model, opt, x, y))
    assert isinstance(loss, torch.Tensor)
    torch.testing.assert_close(loss, loss_of(two_layer_model(), x, y))
    if name in USES_CLOSURE:
        return
    twin = two_layer_model()
    steps(twin, make(name, twin), x, y, n=1)
    for layer, w in weights(model).items():
        torch.testing.assert_close(weights(twin)[layer], w, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_per_group_lr_is_honoured(name):
    """lr = 0 in the group of layer "0" leaves its W' alone while layer "2" moves."""
    x, y = data()
    model = two_layer_model()
    opt = make(name, model)
    groups = [g for g in opt.param_groups if g.get("pair") == "0"]
    if not groups:
        pytest.skip(f"{name} does not group by pair (plain torch groups)")
    for group in groups:
        group["lr"] = 0.0
    before = weights(model)
    steps(model, opt, x, y, n=2)
    after = weights(model)
    torch.testing.assert_close(after["0"], before["0"], rtol=0, atol=1e-12)
    assert relative_gap(after["2"] - before["2"], torch.zeros_like(before["2"])) > 0


@pytest.mark.parametrize("name", NAMES)
def test_gauge_invariance_exactly_when_claimed(name):
    """One step from (A, B) and from (G A, B G^{-1}): the same update of W' for the methods that claim invariance
    (relative gap < 1e-8); a different one (> 1e-2) for all others (AdamW and SGD are the classic negatives)."""
    x, y = data()
    claims = name in GAUGE_INVARIANT
    extra = GAUGE_INVARIANT.get(name, {})
    model = two_layer_model()
    other = regauged(model)
    start = weights(model)
    runs = [(m, make(name, m, lr=0.05, **extra)) for m in (model, other)]
    for m, opt in runs:
        opt.step(closure_for(m, opt, x, y))
    for layer in LAYERS:
        gap = relative_gap(
            weights(model)[layer] - start[layer], weights(other)[layer] - start[layer]
        )
        if claims:
            assert gap < 1e-8, (layer, gap)
        else:
            assert gap > 1e-2, (layer, gap)


def test_plain_sgd_is_not_gauge_invariant():
    """The negative control of the check above, with torch's own SGD."""
    x, y = data()
    model = two_layer_model()
    other = regauged(model)
    start = weights(model)
    for m in (model, other):
        steps(m, torch.optim.SGD(lx.trainable_parameters(m).values(), lr=0.05), x, y)
    assert relative_gap(weights(model)["0"] - start["0"], weights(other)["0"] - start["0"]) > 1e-2


@pytest.mark.parametrize("name", NAMES)
def test_a_non_finite_gradient_is_refused_and_nothing_changes(name):
    x, y = data()
    model = two_layer_model()
    opt = make(name, model)
    steps(model, opt, x, y, n=2)
    params = {k: v.clone() for k, v in lx.adapter_state_dict(model).items()}
    state = copy.deepcopy(opt.state_dict())

    def poisoned():
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        model.get_submodule("2").B.grad[0, 0] = float("nan")
        return loss

    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step(poisoned)
    for k, v in lx.adapter_state_dict(model).items():
        assert torch.equal(v, params[k]), k
    after = opt.state_dict()
    for key, per_param in state["state"].items():
        for field, value in per_param.items():
            assert torch.equal(after["state"][key][field], value), (key, field)


@pytest.mark.parametrize("name", NAMES)
def test_bad_models_and_options_are_refused(name):
    with pytest.raises(ValueError, match="no trainable parameter"):
        create(name, nn.Linear(3, 3).requires_grad_(False), lr=0.1)
    if name != "adamw":
        with pytest.raises(ValueError, match="factor pairs"):
            create(name, nn.Linear(3, 3), lr=0.1)
    with pytest.raises(ValueError, match="no_such_option"):
        make(name, two_layer_model(), no_such_option=1.0)
    with pytest.raises(ValueError, match="lr"):
        make(name, two_layer_model(), lr=-1.0)


@pytest.mark.parametrize("name", NAMES)
def test_creating_twice_on_one_model_works(name):
    """Re-creating an optimizer (a resumed loop, a second run) must not trip over what the first one set up."""
    model = two_layer_model()
    make(name, model)
    make(name, model)


def test_a_factor_frozen_by_lora_fa_is_named_by_the_next_optimizer():
    model = two_layer_model()
    make("lora_fa", model)
    with pytest.raises(ValueError, match="0: a factor this optimizer trains is frozen"):
        make("scaled_sgd", model)
