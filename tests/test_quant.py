"""Quantized bases (`lx.quantize_`, `lx.quant`, the quantized view): the codes are bitsandbytes' own, an adapted
layer is the base's output plus the dense update from the dequantized W0, merges equal the unmerged model, the
requantizing merge reports a hand-computable error, and un-adapting restores the original codes bit for bit.

bitsandbytes is called directly here (`quantize_4bit`, `int8_vectorwise_quant`) to transcribe what the library must
produce. Everything runs in train mode on CPU: there bitsandbytes' layers compute x deq(W)^T with the dequantized
weight, which is what the identities below are about.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loraredux as lx
from loraredux import quant
from tiny_models import assert_unchanged, snapshot, tiny_llama

bnbF = pytest.importorskip("bitsandbytes.functional")
bnn = pytest.importorskip("bitsandbytes.nn")

FOUR_BIT = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


class Net(nn.Module):
    """Two layers to quantize (in = 64 and 32, so blocks of 32 or 64 fit) and a dense head."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.a = nn.Linear(64, 32)
        self.b = nn.Linear(32, 64)
        self.head = nn.Linear(64, 3)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def net(dtype: torch.dtype = torch.float32, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net(dtype)


def inputs(dtype: torch.dtype = torch.float32, rows: int = 6) -> torch.Tensor:
    return torch.randn(rows, 64, generator=torch.Generator().manual_seed(1)).to(dtype)


def quantized(fmt: str = "nf4", double_quant: bool = True, **kw) -> Net:
    model = net(kw.pop("dtype", torch.float32))
    return quant.quantize_(model, fmt, ["a", "b"], double_quant=double_quant, block_size=32, **kw)


@torch.no_grad()
def randomize(model: nn.Module, std: float = 0.3, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in lx.trainable_parameters(model).values():
        p.copy_(std * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))


def codes(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Everything that defines a quantized weight, cloned: codes and (nested) scales."""
    w = layer.weight
    if quant.format_of(layer) == "int8":
        scb = w.SCB if w.SCB is not None else layer.state.SCB
        return {"codes": w.data.clone(), "SCB": scb.clone()}
    qs = w.quant_state
    out = {"codes": w.data.clone(), "absmax": qs.absmax.clone()}
    if qs.nested:
        out |= {"nested_absmax": qs.state2.absmax.clone(), "offset": qs.offset.clone()}
    return out


def assert_same_codes(layer: nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = codes(layer)
    assert list(now) == list(before)
    for key, value in before.items():
        assert torch.equal(now[key], value), key


# -- quantize_ against bitsandbytes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "double_quant"), FOUR_BIT)
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_quantize_gives_bitsandbytes_codes_and_forward(fmt, double_quant, compute):
    dense = net()
    model = quantized(fmt, double_quant, compute_dtype=compute)
    x = inputs()
    for name in ("a", "b"):
        W, layer = dense.get_submodule(name).weight.detach(), model.get_submodule(name)
        assert type(layer) is bnn.Linear4bit and quant.format_of(layer) == fmt
        assert quant.layer_dtype(layer) == torch.float32 and quant.compute_dtype(layer) == compute
        q, state = bnbF.quantize_4bit(
            W, blocksize=32, compress_statistics=double_quant, quant_type=fmt
        )
        assert torch.equal(layer.weight.data, q)
        assert torch.equal(layer.weight.quant_state.absmax, state.absmax)
        deq = bnbF.dequantize_4bit(q, state)  # (out, in) float32
        assert torch.equal(quant.dequantize(layer, torch.float32), deq)
        err = float(torch.linalg.matrix_norm(deq - W) / torch.linalg.matrix_norm(W))
        # NF4 ~0.09, FP4 ~0.12 (4 bits per value)
        assert 0.03 < err < (0.12 if fmt == "nf4" else 0.16)
        h = x if name == "a" else torch.randn(6, 32)
        expected = F.linear(h.to(compute), deq.to(compute), layer.bias.to(compute)).float()
        assert torch.equal(layer(h), expected)


def test_quantize_a_bfloat16_model_keeps_its_dtype():
    dense = net(torch.bfloat16)
    model = quantized("nf4", dtype=torch.bfloat16)
    layer = model.a
    assert quant.layer_dtype(layer) == quant.compute_dtype(layer) == torch.bfloat16
    W = dense.a.weight.detach()
    q, state = bnbF.quantize_4bit(W, blocksize=32, compress_statistics=True, quant_type="nf4")
    assert torch.equal(layer.weight.data, q)
    assert torch.equal(quant.dequantize(layer), bnbF.dequantize_4bit(q, state))
    assert model(inputs(torch.bfloat16)).dtype == torch.bfloat16


def test_quantize_int8_gives_bitsandbytes_codes_and_forward():
    dense = net()
    model = quantized("int8")
    layer, W = model.a, dense.a.weight.detach()
    assert type(layer) is bnn.Linear8bitLt and quant.format_of(layer) == "int8"
    CB, SCB, _ = bnbF.int8_vectorwise_quant(W.half())
    assert torch.equal(layer.weight.data, CB) and torch.equal(layer.weight.SCB, SCB)
    deq = CB.float() * (SCB[:, None] / 127.0)  # row-wise absmax: W ≈ CB * absmax_row / 127
    torch.testing.assert_close(quant.dequantize(layer), deq, rtol=1e-6, atol=0)
    assert float(torch.linalg.matrix_norm(deq - W) / torch.linalg.matrix_norm(W)) < 0.02
    x = inputs()
    torch.testing.assert_close(layer(x), F.linear(x, deq, layer.bias), rtol=1e-6, atol=1e-6)
    assert quant.format_of(model.head) is None and not quant.is_quantized(model.head)


def test_quantized_like_copies_the_format():
    model = quantized("fp4", double_quant=False, compute_dtype=torch.bfloat16)
    W = torch.randn(32, 64)
    new = quant.quantized_like(model.a, W)
    assert type(new) is bnn.Linear4bit and new.compute_dtype == torch.bfloat16
    w = new.weight
    assert (w.quant_type, w.blocksize, w.compress_statistics) == ("fp4", 32, False)
    q, state = bnbF.quantize_4bit(W, blocksize=32, quant_type="fp4")
    assert torch.equal(w.data, q)
    assert torch.equal(quant.dequantize(new, torch.float32), bnbF.dequantize_4bit(q, state))
    assert new.bias is not model.a.bias and torch.equal(new.bias, model.a.bias)


# -- adapted layers ------------------------------------------------------------------------------------------------


def dense_update(adapter: lx.Adapter, W0: torch.Tensor) -> torch.Tensor:
    """ΔW (out, in) of the method from W0, written out for the methods with a closed form here."""
    c = adapter.config
    if c.method == "lora":
        return adapter.scale * adapter.B @ adapter.A
    if c.method == "dora":
        V = W0 + adapter.scale * adapter.B @ adapter.A
        return adapter.magnitude[:, None] * V / V.norm(dim=1, keepdim=True) - W0
    if c.method == "hira":
        return W0 * (adapter.B @ adapter.A)
    return adapter.effective_weight() - W0  # the method's own spec, on the dequantized W0


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize(
    "config",
    [
        lx.config("lora", rank=4, alpha=8),
        lx.config("lora", rank=4, alpha=8, rslora=True),
        lx.config("dora", rank=4),
        lx.config("hira", rank=4),
        lx.config("loha", rank=4),
        lx.config("vera", rank=8),
        lx.config("lora_xs", rank=4),
        lx.config("adalora", init_r=4, target_r=2),
    ],
    ids=lambda c: c.method + ("_rs" if getattr(c, "rslora", False) else ""),
)
def test_adapted_layer_is_base_plus_the_dense_update(fmt, config):
    model = quantized(fmt)
    base = copy.deepcopy(model.a)
    W0 = quant.dequantize(model.a, torch.float32)  # before adapting: the view must not change it
    lx.adapt_(model, config, targets=["a", "b"])
    randomize(model)
    adapter = model.a
    assert adapter.view.quantized and adapter.view.format == fmt
    assert torch.equal(adapter.base_weight(), W0)
    x = inputs()
    with torch.no_grad():
        expected = base(x) + F.linear(x, dense_update(adapter, W0))
    torch.testing.assert_close(adapter(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_gradients_reach_the_adapter_only(fmt, method):
    model = quantized(fmt)
    lx.adapt_(model, lx.config(method, rank=4), targets=["a", "b"])
    randomize(model)
    model(inputs().requires_grad_()).square().sum().backward()
    trainable = lx.trainable_parameters(model)
    assert trainable and all(p.is_floating_point() for p in trainable.values())
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert p.grad is None, name


def test_dora_norm_comes_from_the_dequantized_weight_and_is_cached_for_inference():
    model = quantized("nf4")
    W0 = quant.dequantize(model.a, torch.float32)
    lx.adapt_(model, lx.config("dora", rank=4), targets=["a"])
    adapter = model.a
    torch.testing.assert_close(adapter.magnitude, W0.norm(dim=1))  # m = ||W0||_c at init (B = 0)
    randomize(model)
    adapter.eval()
    calls = []
    dequantize = adapter.view.backend.dequantize
    adapter.view.backend.dequantize = lambda *a, **k: calls.append(1) or dequantize(*a, **k)
    try:
        with torch.no_grad():
            first = adapter.norm()
            # computed once, then cached
            assert torch.equal(adapter.norm(), first) and len(calls) == 1
    finally:
        del adapter.view.backend.dequantize
    V = W0 + adapter.scale * adapter.B @ adapter.A
    torch.testing.assert_close(first, V.norm(dim=1))


# -- merging -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("method", ["lora", "dora", "loha"])
def test_merge_gives_dense_layers_equal_to_the_unmerged_model(fmt, method):
    model = quantized(fmt)
    lx.adapt_(model, lx.config(method, rank=4), targets=["a", "b"])
    randomize(model)
    x = inputs()
    expected = model(x)
    lx.merge_(model)
    assert type(model.a) is nn.Linear and model.a.weight.dtype == torch.float32
    assert not model.a.weight.requires_grad
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_merge_of_a_bfloat16_compute_layer_is_in_the_layer_dtype():
    model = quantized("nf4", compute_dtype=torch.bfloat16)
    lx.adapt_(model, lx.config("lora", rank=4), targets=["a"])
    randomize(model)
    x = inputs()
    expected = model(x)
    lx.merge_(model)
    assert model.a.weight.dtype == torch.float32
    # the base computes in bfloat16
    torch.testing.assert_close(model(x), expected, rtol=2e-2, atol=2e-2)


def test_requantized_merge_reports_the_hand_computed_error(caplog):
    model = quantized("nf4")
    lx.adapt_(model, lx.config("lora", rank=4, alpha=4), targets=["a", "b"])
    randomize(model, std=0.02)
    with torch.no_grad():
        model.b.B.mul_(30.0)  # a large update on b, a small one on a
    expected = {}
    for name in ("a", "b"):
        adapter = model.get_submodule(name)
        W0 = bnbF.dequantize_4bit(adapter.base.weight.data, adapter.base.weight.quant_state)
        delta = (adapter.scale * adapter.B @ adapter.A).detach()
        W1 = W0 + delta
        q, state = bnbF.quantize_4bit(W1, blocksize=32, compress_statistics=True, quant_type="nf4")
        back = bnbF.dequantize_4bit(q, state)
        expected[name] = (float((back - W1).norm() / delta.norm()), q)
    # the usual case, and one the adapter dominates
    assert expected["a"][0] > 0.5 > expected["b"][0]
    with (
        warnings.catch_warnings(record=True) as caught,
        caplog.at_level(logging.INFO, "loraredux.quant"),
    ):
        warnings.simplefilter("always")
        report = quant.merge_requantized(model)
    assert report == pytest.approx({n: e for n, (e, _) in expected.items()}, rel=1e-4)
    lost = [str(w.message) for w in caught if "requantizing" in str(w.message)]
    assert len(lost) == 1 and "a (" in lost[0] and "b (" not in lost[0]
    assert sum("requantized merge error" in r.getMessage() for r in caplog.records) == 2
    for name in ("a", "b"):
        layer = model.get_submodule(name)
        assert type(layer) is bnn.Linear4bit and layer.weight.compress_statistics
        assert torch.equal(layer.weight.data, expected[name][1])


def test_merge_requantize_flag_keeps_the_signature():
    model = quantized("int8")
    lx.adapt_(model, lx.config("lora", rank=4), targets=["a"])
    randomize(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert lx.merge_(model, requantize=True) is model
    assert type(model.a) is bnn.Linear8bitLt and not list(lx.adapters(model))


def test_requantize_on_a_dense_layer_is_refused_and_changes_nothing():
    model = quant.quantize_(net(), "nf4", ["a"], block_size=32)
    lx.adapt_(model, lx.config("lora", rank=4), targets=["a", "b"])
    randomize(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"never quantized: \['b'\]"):
        lx.merge_(model, requantize=True)
    assert_unchanged(model, before)


# -- base-moving inits and un-adapting -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("init", ["kaiming", "pissa", "olora", "milora"])
def test_unadapt_restores_the_codes_bit_for_bit(fmt, init):
    model = quantized(fmt)
    reference = quantized(fmt)
    originals = {n: model.get_submodule(n).weight for n in ("a", "b")}
    before = {n: codes(model.get_submodule(n)) for n in ("a", "b")}
    x = inputs()
    y0 = reference(x)
    lx.adapt_(model, lx.config("lora", rank=4, init=init), targets=["a", "b"])
    moved = init != "kaiming"
    assert (model.a.base.weight is not originals["a"]) == moved
    randomize(model)
    # int8 moves its codes into module.state on a forward: restoring must cope
    model(x).sum().backward()
    with lx.disabled(model):  # the original model, not deq(q(W_res)) + s B0 A0
        torch.testing.assert_close(model(x), y0, rtol=0, atol=0)
    lx.unadapt_(model)
    for name in ("a", "b"):
        layer = model.get_submodule(name)
        assert layer.weight is originals[name]
        assert_same_codes(layer, before[name])
    torch.testing.assert_close(model(x), y0, rtol=0, atol=0)


def test_qpissa_quantizes_the_residual():
    model = quantized("nf4")
    W0 = quant.dequantize(model.a, torch.float32)
    lx.adapt_(model, lx.config("lora", rank=4, alpha=4, init="pissa"), targets=["a"])
    adapter = model.a
    residual = (W0 - adapter.scale * adapter.B0 @ adapter.A0).float()
    q, state = bnbF.quantize_4bit(
        residual, blocksize=32, compress_statistics=True, quant_type="nf4"
    )
    assert torch.equal(adapter.base.weight.data, q)  # QPiSSA: the residual, quantized like the base
    torch.testing.assert_close(adapter.base_weight(), bnbF.dequantize_4bit(q, state))
    torch.testing.assert_close(adapter.original_weight(), W0, rtol=0, atol=0)  # the kept original


def test_saved_qpissa_adapter_loads_onto_the_original_base(tmp_path):
    model = quantized("nf4")
    before = codes(model.a)
    lx.adapt_(model, lx.config("lora", rank=4, init="pissa"), targets=["a"])
    randomize(model)
    # PEFT's rank-2r form would stand for W_res + s B A, not the quantized q(W_res) + s B A the model computes
    with pytest.raises(
        ValueError, match="init 'pissa' moved the base by more than a low-rank term"
    ):
        lx.save_adapter(model, tmp_path, format="peft")
    lx.save_adapter(model, tmp_path)  # "auto" picks loraredux's format, which moves the base again
    assert (tmp_path / "adapter_config.json").exists()
    other = quantized("nf4")
    lx.load_adapter(other, tmp_path)
    torch.testing.assert_close(other(inputs()), model(inputs()), rtol=1e-5, atol=1e-5)
    lx.unadapt_(other)
    assert_same_codes(other.a, before)


# -- bad inputs: an error naming what is wrong, and the model unchanged ------------------------------------------------


def test_without_bitsandbytes_quantize_says_how_to_install(monkeypatch):
    model = net()
    before = snapshot(model)
    for name in ("bitsandbytes", "bitsandbytes.nn", "bitsandbytes.functional"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(
        ImportError, match=r"lx.quantize_ needs bitsandbytes.*pip install loraredux\[quant\]"
    ):
        quant.quantize_(model, "nf4", block_size=32)
    assert_unchanged(model, before)


class IntLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 32)
        self.b = nn.Linear(32, 64)
        self.b.weight = nn.Parameter(torch.ones(64, 32, dtype=torch.int32), requires_grad=False)


@pytest.mark.parametrize(
    ("make", "kwargs", "error", "match"),
    [
        (
            lambda: net(torch.float64),
            {},
            ValueError,
            r"'a' holds a torch.float64 weight.*float32, bfloat16",
        ),
        (IntLinear, {}, ValueError, r"'b' holds a torch.int32 weight"),
        (
            net,
            {"block_size": 64},
            ValueError,
            r"'b' has in_features = 32, not a multiple of block_size = 64",
        ),
        (net, {"block_size": 48}, ValueError, r"block_size must be one of"),
        (net, {"fmt": "int4"}, ValueError, r"fmt must be one of"),
        (
            net,
            {"fmt": "int8", "compute_dtype": torch.bfloat16},
            ValueError,
            r"compute_dtype applies to nf4",
        ),
        (net, {"double_quant": 1}, TypeError, r"double_quant must be True or False"),
        (net, {"targets": ["head", "a"], "block_size": 32, "exclude": None}, None, None),
    ],
)
def test_bad_quantize_inputs_change_nothing(make, kwargs, error, match):
    model = make()
    before = snapshot(model)
    kwargs = {"fmt": "nf4", **kwargs}
    if error is None:  # the control: the same call quantizes
        quant.quantize_(model, kwargs.pop("fmt"), **kwargs)
        assert quant.is_quantized(model.a) and quant.is_quantized(model.head)
        return
    with pytest.raises(error, match=match):
        quant.quantize_(model, kwargs.pop("fmt"), **kwargs)
    assert_unchanged(model, before)


def test_quantize_refuses_quantized_adapted_nonfinite_and_non_linear_layers():
    model = quantized("nf4")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'a' is already quantized \(nf4\)"):
        quant.quantize_(model, "nf4", ["a"], block_size=32)
    assert_unchanged(model, before)
    lx.adapt_(model, lx.config("lora", rank=2), targets=["a"])
    with pytest.raises(ValueError, match="already adapted"):
        quant.quantize_(model, "nf4", ["head"], block_size=32)
    model = net()
    with torch.no_grad():
        model.b.weight[0, 0] = math.inf
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'b' holds 1 NaN or infinite"):
        quant.quantize_(model, "int8")
    assert_unchanged(model, before)
    gpt2_like = nn.Sequential(nn.Embedding(8, 64), nn.Linear(64, 32))
    with pytest.raises(TypeError, match=r"'0' is a Embedding; quantize_ replaces torch.nn.Linear"):
        quant.quantize_(gpt2_like, "nf4", ["0", "1"])


def test_gradient_inits_refuse_a_quantized_base():
    model = quantized("nf4")
    before = snapshot(model)
    batches = [inputs()]
    with pytest.raises(
        ValueError, match=r"init 'lora_ga' needs the gradient .* quantized base layer"
    ):
        lx.adapt_(
            model,
            lx.config("lora", rank=2, init="lora_ga"),
            targets=["a"],
            calibration=batches,
            loss_fn=lambda m, x: m(x).square().mean(),
        )
    assert_unchanged(model, before)


def test_a_method_refusing_a_format_names_it_and_changes_nothing():
    import dataclasses
    from typing import ClassVar

    @dataclasses.dataclass(frozen=True)
    # not registered: a stand-in for a method that narrows its formats
    class NF4OnlyLoRA(lx.LoRAConfig):
        quantized_formats: ClassVar[tuple[str, ...]] = ("nf4",)
        quantized_reason: ClassVar[str] = "it reads the codes"

    model = quantized("int8")
    before = snapshot(model)
    with pytest.raises(
        TypeError, match=r"a: lora cannot adapt a int8 quantized base .*: it reads the codes"
    ):
        lx.adapt_(model, NF4OnlyLoRA(rank=2), targets=["a"])
    assert_unchanged(model, before)
    lx.adapt_(quantized("nf4"), NF4OnlyLoRA(rank=2), targets=["a"])  # its own format is accepted


# -- transformers' BitsAndBytesConfig --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(hidden=64, dtype=torch.float32, intermediate_size=128).save_pretrained(path)
    return path


def load_quantized(path, **config):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(**config), dtype=torch.float32
    )


@pytest.mark.parametrize(
    "config",
    [
        {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": torch.float32,
        },
        {"load_in_8bit": True},
    ],
    ids=["4bit", "8bit"],
)
def test_a_transformers_quantized_model_adapts_and_trains(llama_dir, config):
    model = load_quantized(llama_dir, **config).train()
    fmt = "nf4" if config.get("load_in_4bit") else "int8"
    dense = tiny_llama(hidden=64, dtype=torch.float32, intermediate_size=128)
    # the same layers through lx.quantize_: the same codes
    same = quant.quantize_(dense, fmt, block_size=64)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert quant.format_of(q_proj) == fmt
    assert torch.equal(q_proj.weight.data, same.model.layers[0].self_attn.q_proj.weight.data)
    before = codes(q_proj)
    lx.adapt_(model, lx.config("lora", rank=4, init="pissa"), targets="all-linear")
    assert all(a.view.format == fmt for _, a in lx.adapters(model))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(lx.trainable_parameters(model).values(), lr=0.5)
    losses = []
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[1] < losses[0]
    lx.unadapt_(model)
    assert_same_codes(model.model.layers[0].self_attn.q_proj, before)


def test_a_layer_bitsandbytes_repacked_for_cpu_inference_still_dequantizes(llama_dir):
    model = load_quantized(llama_dir, load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    layer = model.model.layers[0].self_attn.q_proj
    if not getattr(layer, "support_avx512bf16_for_cpu", False):
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    W0 = quant.dequantize(layer)
    with torch.no_grad():
        # repacks in place (bfloat16 scales)
        model.eval()(input_ids=torch.zeros(1, 3, dtype=torch.long))
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    torch.testing.assert_close(quant.dequantize(layer), W0, rtol=1e-2, atol=1e-2)
