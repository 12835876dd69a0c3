"""The contract every registered method keeps (DESIGN.md §8). A new method is covered by registering it.

Each property is checked in float64 on a tiny model holding one base layer of every kind the method supports
(nn.Embedding, nn.Linear, transformers' Conv1D), after the adapter parameters are moved off their initial values so
that an adapter that ignored its parameters would fail.
"""

import copy
import json

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraredux as lx
from loraredux.core import config_class

METHODS = lx.available_methods()
KIND_TARGET = {"embedding": "emb", "linear": "lin", "conv1d": "conv"}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 8)
        self.lin = nn.Linear(8, 7)
        self.conv = Conv1D(6, 7)  # nf = out = 6, nx = in = 7
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = torch.tanh(self.lin(h))
        h = torch.tanh(self.conv(h))
        return self.head(h)


# Fields for methods whose defaults do not fit the tiny model at rank 2 (one line per method).
OVERRIDES: dict[str, dict] = {
    "adalora": {"init_r": 2, "target_r": 1},  # default init_r = 12 exceeds the tiny layers
}


def small_config(method: str) -> lx.AdapterConfig:
    fields = {"rank": 2} if "rank" in config_class(method).__dataclass_fields__ else {}
    return lx.config(method, **{**fields, **OVERRIDES.get(method, {})})


def targets_for(method: str) -> list[str]:
    return [KIND_TARGET[k] for k in config_class(method).base_kinds]


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 13, (2, 5), generator=torch.Generator().manual_seed(1))


def make_pair(method: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    base = Tiny().double()
    model = copy.deepcopy(base)
    torch.manual_seed(seed + 100)
    lx.adapt_(model, small_config(method), targets=targets_for(method))
    return base, model


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in lx.trainable_parameters(model).values():
        p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def layer_io(model: nn.Module, ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    seen = {}
    hooks = [
        a.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
        for n, a in lx.adapters(model)
    ]
    model(ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("method", METHODS)
def test_forward_agrees_with_effective_weight(method, ids):
    _, model = make_pair(method)
    perturb(model)
    io = layer_io(model, ids)
    assert set(io) == set(targets_for(method))
    for name, (x, y) in io.items():
        a = model.get_submodule(name)
        torch.testing.assert_close(
            y, a.view.forward_with(x, a.effective_weight()), rtol=1e-10, atol=1e-10
        )


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init(method, ids):
    if not config_class(method).identity_at_init:
        pytest.skip(f"{method} does not promise W' = W0 at initialisation")
    base, model = make_pair(method)
    torch.testing.assert_close(model(ids), base(ids), rtol=1e-12, atol=1e-12)
    for _, a in lx.adapters(model):
        torch.testing.assert_close(a.effective_weight(), a.base_weight(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_perturbed_adapter_changes_output(method, ids):
    base, model = make_pair(method)
    perturb(model)
    assert (model(ids) - base(ids)).abs().max() > 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_merge_equivalence(method, ids):
    base, model = make_pair(method)
    perturb(model)
    expected = model(ids)
    lx.merge_(model)
    assert not list(lx.adapters(model))
    for name in targets_for(method):
        assert type(model.get_submodule(name)) is type(base.get_submodule(name))
    torch.testing.assert_close(model(ids), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_base_frozen_and_every_adapter_parameter_learns(method, ids):
    _, model = make_pair(method)
    perturb(model)
    model(ids).square().sum().backward()
    trainable = lx.trainable_parameters(model)
    assert trainable, "an adapted model must have trainable parameters"
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().max() > 0, f"{name} got no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"


@pytest.mark.parametrize("method", METHODS)
def test_state_round_trip(method, ids):
    _, model = make_pair(method, seed=0)
    perturb(model)
    _, other = make_pair(method, seed=0)
    for p in lx.trainable_parameters(
        other
    ).values():  # make sure loading has something to overwrite
        torch.nn.init.normal_(p)
    lx.load_adapter_state_dict(other, lx.adapter_state_dict(model))
    torch.testing.assert_close(other(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_disabled_equals_base_and_restores(method, ids):
    base, model = make_pair(method)
    perturb(model)
    adapted = model(ids)
    with lx.disabled(model):
        torch.testing.assert_close(model(ids), base(ids), rtol=0, atol=0)
    torch.testing.assert_close(model(ids), adapted, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_unadapt_gives_back_the_original_layers(method, ids):
    torch.manual_seed(0)
    base = Tiny().double()
    model = copy.deepcopy(base)
    model.head.weight.requires_grad_(False)  # a flag the user set before adapting...
    originals = {n: model.get_submodule(n) for n in targets_for(method)}
    lx.adapt_(model, small_config(method), targets=targets_for(method))
    perturb(model)
    lx.unadapt_(model)
    for n, m in originals.items():
        assert model.get_submodule(n) is m
    assert not model.head.weight.requires_grad  # ...is kept...
    assert model.lin.weight.requires_grad  # ...and the ones adapt_ turned off are back
    torch.testing.assert_close(model(ids), base(ids), rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_parameter_count_matches_the_paper(method):
    _, model = make_pair(method)
    for _, a in lx.adapters(model):
        own = sum(p.numel() for p in a.parameters() if p.requires_grad)
        assert own == a.config.parameter_count(a.in_features, a.out_features)


@pytest.mark.parametrize("method", METHODS)
def test_lora_form_is_the_effective_weight(method):
    _, model = make_pair(method)
    perturb(model)
    for _, a in lx.adapters(model):
        try:
            A, B, s = a.lora_form()
        except NotImplementedError:
            pytest.skip(f"{method} is not additive low rank")
        expected = a.base_weight() + s * B @ A
        torch.testing.assert_close(a.effective_weight(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_config_round_trips_through_json(method):
    cfg = small_config(method)
    assert lx.config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
