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


# -- base formats: float32, bfloat16 and quantized bases ------------------------------------------------------------
#
# The same properties on one linear layer stored in each format a method accepts: dense float32 and bfloat16, and
# bitsandbytes NF4 (double quantized, float32 compute) and int8 made by `lx.quantize_`. bitsandbytes quantizes only
# float32 / bfloat16 / float16, hence a float32 model (the suite above is float64) and tolerances per format. The
# layer is 64 wide so that the 4-bit blocks of 64 fit, and everything runs in train mode, where bitsandbytes' CPU
# layers compute x deq(W)^T (its inference kernels quantize activations or use bfloat16 scales).

FORMATS = ("fp32", "bf16", "nf4", "int8")
QUANTIZED = ("nf4", "fp4", "int8")
#: max |a - b| <= tol * (1 + max |b|): rounding in float32 (dequantized bases included), or in bfloat16.
FORMAT_TOL = {"fp32": 2e-5, "bf16": 3e-2, "nf4": 2e-5, "int8": 2e-5}


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(x)))


def accepts(method: str, fmt: str) -> bool:
    cls = config_class(method)
    return "linear" in cls.base_kinds and (fmt in ("fp32", "bf16") or fmt in cls.quantized_formats)


FORMAT_CASES = [(m, f) for m in METHODS for f in FORMATS if accepts(m, f)]
REFUSED = [(m, f) for m in METHODS for f in QUANTIZED if "linear" in config_class(m).base_kinds]
REFUSED = [(m, f) for m, f in REFUSED if not accepts(m, f)] or [
    pytest.param(
        None, None, marks=pytest.mark.skip(reason="no method narrows its quantized formats")
    )
]


def wide(fmt: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Wide().to(torch.bfloat16 if fmt == "bf16" else torch.float32)
    if fmt in QUANTIZED:
        lx.quantize_(model, fmt, ["lin"])
    return model


def format_pair(method: str, fmt: str) -> tuple[nn.Module, nn.Module]:
    base, model = wide(fmt), wide(fmt)  # quantizing is deterministic: the same codes twice
    torch.manual_seed(100)
    lx.adapt_(model, small_config(method), targets=["lin"])
    return base, model


def wide_input(fmt: str) -> torch.Tensor:
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    return x.to(torch.bfloat16 if fmt == "bf16" else torch.float32)


def assert_near(a: torch.Tensor, b: torch.Tensor, fmt: str) -> None:
    gap, size = float((a - b).detach().abs().max()), float(b.detach().abs().max())
    assert gap <= FORMAT_TOL[fmt] * (1 + size), f"max gap {gap:.3g} at scale {size:.3g} ({fmt})"


@pytest.mark.parametrize(("method", "fmt"), FORMAT_CASES)
def test_format_forward_agrees_with_effective_weight(method, fmt):
    _, model = format_pair(method, fmt)
    perturb(model)
    a = model.lin
    assert a.view.format == (fmt if fmt in QUANTIZED else None)
    x = wide_input(fmt)
    assert_near(a(x), a.view.forward_with(x, a.effective_weight()), fmt)


@pytest.mark.parametrize(("method", "fmt"), FORMAT_CASES)
def test_format_identity_at_init_and_merge(method, fmt):
    base, model = format_pair(method, fmt)
    x = wide_input(fmt)
    if config_class(method).identity_at_init:
        assert_near(model(x), base(x), fmt)
    perturb(model)
    expected = model(x)
    lx.merge_(model)
    assert type(model.lin) is nn.Linear  # a quantized base merges into a dense layer of its dtype
    assert model.lin.weight.dtype == x.dtype
    assert_near(model(x), expected, fmt)


@pytest.mark.parametrize(("method", "fmt"), FORMAT_CASES)
def test_format_gradients_reach_every_adapter_parameter_only(method, fmt):
    _, model = format_pair(method, fmt)
    perturb(model)
    model(wide_input(fmt)).float().square().sum().backward()
    trainable = lx.trainable_parameters(model)
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().max() > 0, f"{name} got no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"


@pytest.mark.parametrize(("method", "fmt"), FORMAT_CASES)
def test_format_disabled_and_unadapt_give_back_the_base(method, fmt):
    base, model = format_pair(method, fmt)
    original = model.lin.base.weight
    stored = original.detach().clone()
    perturb(model)
    x = wide_input(fmt)
    with lx.disabled(model):
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    lx.unadapt_(model)
    assert model.lin.weight is original and torch.equal(original.detach(), stored)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)


@pytest.mark.parametrize(("method", "fmt"), FORMAT_CASES)
def test_format_state_round_trip_counts_and_lora_form(method, fmt):
    _, model = format_pair(method, fmt)
    perturb(model)
    _, other = format_pair(method, fmt)
    lx.load_adapter_state_dict(other, lx.adapter_state_dict(model))
    x = wide_input(fmt)
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    a = model.lin
    assert sum(p.numel() for p in a.parameters() if p.requires_grad) == a.config.parameter_count(
        a.in_features, a.out_features
    )
    try:
        A, B, s = a.lora_form()
    except NotImplementedError:
        return
    assert_near(a.effective_weight(), a.base_weight() + s * B @ A, fmt)


@pytest.mark.parametrize(("method", "fmt"), REFUSED)
def test_format_refused_by_name_with_the_model_unchanged(method, fmt):
    torch.manual_seed(0)
    model = lx.quantize_(Wide(), fmt, ["lin"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=rf"{method} cannot adapt a {fmt} quantized base"):
        lx.adapt_(model, small_config(method), targets=["lin"])
    assert type(model.lin).__module__.startswith("bitsandbytes")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
