"""The base format of a training run (`loraredux.base_format`): which layers are quantized and which stay dense,
LoftQ from the dense weights kept before quantizing (and refused on a quantized layer otherwise), and the dense or
requantized model a merge writes."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

import loraredux as lx
from loraredux.base_format import (
    BaseFormat,
    convert_base_,
    dequantize_,
    quantization_config,
)
from tiny_models import assert_unchanged, snapshot, tiny_gpt2, tiny_llama

bnbF = pytest.importorskip("bitsandbytes.functional")


class Net(nn.Module):
    """in = 128 and 64 (blocks of 64 fit), in = 48 (they do not), a module to save and an output head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(128, 64)
        self.b = nn.Linear(64, 48)
        self.odd = nn.Linear(48, 64)
        self.extra = nn.Sequential(nn.Linear(64, 64))  # trained in full
        self.classifier = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.odd(torch.tanh(self.b(torch.tanh(self.a(x))))))
        return self.classifier(self.extra(h))


def net() -> Net:
    torch.manual_seed(0)
    return Net()


X = torch.randn(6, 128, generator=torch.Generator().manual_seed(1))


def test_dense_formats_convert_the_whole_model():
    model = net()
    assert (
        convert_base_(model, "bf16").describe()
        == "base bf16: the model's weights in torch.bfloat16"
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    convert_base_(model, "fp32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_quantized_formats_name_what_stays_dense_and_give_bitsandbytes_codes():
    model = net()
    W = model.a.weight.detach().clone()
    base = convert_base_(model, "nf4", keep=["extra"])
    assert base.quantized == ["a", "b"]  # not the head, not the module to save
    assert base.dense == {"odd": "in_features 48 is not a multiple of 64"}
    assert "left dense: odd (in_features 48 is not a multiple of 64)" in base.describe()
    assert type(model.odd) is nn.Linear and type(model.extra[0]) is nn.Linear
    assert type(model.classifier) is nn.Linear
    codes, _ = bnbF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(model.a.weight.data, codes)  # QLoRA's NF4: blocks of 64, double quantization
    assert base.to_dict() == {"format": "nf4", "quantized_layers": 2, "block_size": 64,
                              "double_quant": True, "dense_layers": base.dense}  # fmt: skip
    gpt2 = convert_base_(
        tiny_gpt2().float(), "int8"
    )  # transformers' Conv1D: no nn.Linear to quantize
    assert gpt2.quantized == [] and set(gpt2.dense.values()) == {"a Conv1D, not an nn.Linear"}
    with pytest.raises(ValueError, match="base must be one of"):
        convert_base_(net(), "nf8")


def test_loftq_on_a_quantized_layer_is_refused_by_name_and_changes_nothing():
    model = net()
    convert_base_(model, "nf4")
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        lx.adapt_(model, lx.config("lora", rank=4, init="loftq"), ["a", "b"])
    text = str(err.value)
    assert text.startswith("a: init 'loftq' cannot run on this nf4 quantized base")
    assert "quantize the quantized weight again" in text
    assert "lx.init.loftq_from_checkpoint_(model, folder)" in text
    assert_unchanged(model, before)


def test_loftq_from_the_dense_weights_kept_before_quantizing():
    model = net()
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in ("a", "b", "odd")}
    base = convert_base_(model, "nf4", keep_weights=True)
    codes = model.a.weight.data.clone()
    config, iters = base.deferred_loftq(lx.config("lora", rank=4, alpha=8, init="loftq"))
    assert (config.init, iters) == ("kaiming", 1)  # LoRA's own init, then LoftQ with T = 1
    lx.adapt_(model, config, ["a", "b", "odd"])
    report = base.loftq_(model, iters)
    assert base.weights == {}  # dropped once used
    for path in ("a", "b"):  # s B A = SVD_r(W0 - deq(Q)): Eckart-Young's best rank-4 correction
        layer = model.get_submodule(path)
        R = dense[path] - lx.quant.dequantize(layer.base)
        U, S, Vh = torch.linalg.svd(R.double())
        A, B, s = layer.lora_form()
        best = (U[:, :4] * S[:4]) @ Vh[:4]
        torch.testing.assert_close((s * B @ A).double(), best, rtol=0, atol=1e-5)
        line = next(r for r in report.layers if r.path == path)
        tail = float(S[4:].square().sum().sqrt() / torch.linalg.matrix_norm(dense[path].double()))
        assert line.kept and line.error_after == pytest.approx(tail, rel=1e-4)
        assert line.error_after < line.base_error
    assert torch.equal(
        model.a.base.weight.data, codes
    )  # T = 1 leaves the base as quantize_ made it
    assert report.rolled_back == ["odd"]  # dense: nothing to correct, it keeps its init (B = 0)
    assert torch.count_nonzero(model.odd.lora_form()[1]) == 0
    assert base.to_dict()["loftq"]["error_loftq"] < base.to_dict()["loftq"]["error_qlora"]


def test_deferred_loftq_keeps_other_inits_and_refuses_another_quantizer():
    base = BaseFormat("nf4", ["a"])
    pissa = lx.config("lora", init="pissa")
    assert base.deferred_loftq(pissa) == (pissa, None)
    assert BaseFormat("fp32").deferred_loftq(lx.config("lora", init="loftq"))[1] is None
    with pytest.raises(ValueError, match="give only iters"):
        base.deferred_loftq(lx.config("lora", init="loftq", init_options={"block_size": 32}))
    with pytest.raises(ValueError, match="needs the dense weights"):
        base.loftq_(net())


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_a_merge_is_dense_or_requantized_and_transformers_reloads_it(tmp_path, fmt):
    model = tiny_llama(hidden=64, intermediate_size=128, dtype=torch.float32).train()
    convert_base_(model, fmt)
    lx.adapt_(model, lx.config("lora", rank=4, alpha=8), ["q_proj", "v_proj"])
    with torch.no_grad():
        for p in lx.trainable_parameters(model).values():
            p.normal_(std=0.1)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    dense = copy.deepcopy(model)
    lx.merge_(dense)
    assert (
        len(dequantize_(dense)) == 10
    )  # the 14 linear layers but q and v, left quantized by the merge
    assert not any(lx.quant.is_quantized(m) for m in dense.modules())
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it names the layers whose update requantizing lost
        errors = lx.quant.merge_requantized(model)
    assert (
        set(errors) == {p for p in errors if p.endswith(("q_proj", "v_proj"))} and len(errors) == 4
    )
    model.config.quantization_config = quantization_config(model, fmt)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        requantized = model(input_ids=ids).logits
        again = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).train()
        torch.testing.assert_close(again(input_ids=ids).logits, requantized, rtol=0, atol=0)
    with pytest.raises(ValueError, match="for nf4, fp4 or int8"):
        quantization_config(model, "bf16")
