"""An adapter file for a base of another format: loraredux's format records each layer's base format, and a load
that would move the base (A0, B0 of PiSSA / QPiSSA, ...) onto a base of another format is refused, naming the layer
and both formats, with the model unchanged; an adapter that leaves the base as it is loads onto any format."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import loraredux as lx
from loraredux.io import AdapterFileError
from tiny_models import assert_unchanged, snapshot

pytest.importorskip("bitsandbytes")
# the tests below edit adapter_config.json by hand, which the loader notices and says
pytestmark = pytest.mark.filterwarnings("ignore:.*is not the config")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 32)
        self.b = nn.Linear(32, 64)
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def dense(dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


def quantized(fmt: str = "nf4") -> Net:
    return lx.quantize_(dense(), fmt, ["a", "b"], block_size=32)


X = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def trained(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    for p in lx.trainable_parameters(model).values():
        p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def saved(tmp_path, model: nn.Module, init: str = "kaiming") -> nn.Module:
    lx.adapt_(model, lx.config("lora", rank=4, alpha=8, init=init), ["a", "b"])
    trained(model)
    lx.save_adapter(model, tmp_path, format="native")
    return model


def test_the_native_file_records_each_layers_base_format(tmp_path):
    saved(tmp_path / "q", quantized("nf4"))
    saved(tmp_path / "d", dense(torch.float64))
    read = {k: json.loads((tmp_path / k / "adapter_config.json").read_text()) for k in "qd"}
    assert read["q"]["base_formats"] == {"a": "nf4", "b": "nf4"}
    assert read["d"]["base_formats"] == {"a": "fp64", "b": "fp64"}


@pytest.mark.parametrize(
    ("init", "source", "target", "saved_fmt", "present"),
    [
        (
            "pissa",
            quantized,
            dense,
            "nf4",
            "fp32",
        ),  # QPiSSA onto a dense base: the residual unquantized
        (
            "pissa",
            dense,
            quantized,
            "fp32",
            "nf4",
        ),  # PiSSA onto nf4: a quantized residual it never saw
        ("milora", lambda: quantized("nf4"), lambda: quantized("int8"), "nf4", "int8"),
    ],
)
def test_a_moved_base_onto_another_format_is_refused_unchanged(
    tmp_path, init, source, target, saved_fmt, present
):
    saved(tmp_path, source(), init)
    model = target()
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        lx.load_adapter(model, tmp_path)
    text = str(err.value)
    assert f"layer 'a': the adapter was saved on a {saved_fmt} base" in text
    assert f"its init {init!r} moved" in text and f"onto this {present} base" in text
    assert "Load it onto " in text and "lx.merge_" in text
    assert_unchanged(model, before)
    assert not list(lx.adapters(model))


def test_a_moved_base_loads_onto_the_same_format_or_another_dense_dtype(tmp_path):
    model = saved(tmp_path / "q", quantized("nf4"), "pissa")
    other = lx.load_adapter(quantized("nf4"), tmp_path / "q")
    torch.testing.assert_close(other(X), model(X), rtol=1e-6, atol=1e-6)
    # dense formats count as one: W_res differs by the dtypes' rounding only
    wide = saved(tmp_path / "d", dense(torch.float64), "pissa")
    narrow = lx.load_adapter(dense(torch.float32), tmp_path / "d")
    torch.testing.assert_close(narrow(X), wide(X.double()).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("present", ["fp32", "int8"])
def test_an_adapter_that_left_the_base_as_it_was_loads_onto_any_format(tmp_path, present):
    model = saved(tmp_path, quantized("nf4"))  # plain LoRA trained on nf4
    target = dense() if present == "fp32" else quantized("int8")
    W0 = {n: lx.quant.dequantize(m) if lx.quant.is_quantized(m) else m.weight.detach().clone()
          for n, m in ((n, target.get_submodule(n)) for n in "ab")}  # fmt: skip
    lx.load_adapter(target, tmp_path)
    for name in "ab":
        ours, theirs = target.get_submodule(name), model.get_submodule(name)
        A, B, s = theirs.lora_form()
        # the same update on this base: W' = W0 (this format) + s B A
        torch.testing.assert_close(ours.effective_weight(), W0[name] + s * B @ A, rtol=0, atol=1e-6)
        assert lx.adapters(target) and torch.equal(ours.lora_form()[0], A)


def test_a_file_without_base_formats_is_not_checked(tmp_path):
    saved(tmp_path, quantized("nf4"), "pissa")
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    del config["base_formats"]  # a file written before the formats were recorded
    path.write_text(json.dumps(config))
    lx.load_adapter(dense(), tmp_path)  # moves the dense base as the file says, as before


@pytest.mark.parametrize(
    "formats", [{"a": 4, "b": "nf4"}, {"a": "nf4", "nosuch": "nf4"}, ["nf4", "nf4"]]
)
def test_malformed_base_formats_are_refused_by_name(tmp_path, formats):
    saved(tmp_path, quantized("nf4"))
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_formats"] = formats
    path.write_text(json.dumps(config))
    model = quantized("nf4")
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match="'base_formats' must"):
        lx.load_adapter(model, tmp_path)
    assert_unchanged(model, before)
