"""LoRA's own identities (Hu et al., arXiv 2106.09685; rsLoRA, arXiv 2312.03732) and layer parity with PEFT."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraredux as lx
from tiny_models import randomized


@pytest.mark.parametrize(("rslora", "expected"), [(False, 12.0 / 4), (True, 12.0 / 2)])
def test_scale_is_alpha_over_r_or_over_sqrt_r(rslora, expected):
    base = nn.Linear(9, 7).double()
    a = randomized(lx.LoRA(base, lx.config("lora", rank=4, alpha=12, rslora=rslora)))
    assert a.scale == expected
    dW = a.effective_weight() - base.weight
    torch.testing.assert_close(dW, expected * a.B @ a.A, rtol=1e-12, atol=1e-12)


@given(
    n_in=st.integers(1, 12),
    n_out=st.integers(1, 12),
    data=st.data(),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    bias=st.booleans(),
)
def test_fast_path_equals_the_definition_for_all_shapes(n_in, n_out, data, lead, bias):
    r = data.draw(st.integers(1, min(n_in, n_out)))
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out, bias=bias).double()
    a = randomized(lx.LoRA(base, lx.config("lora", rank=r, alpha=3)))
    x = torch.randn(*lead, n_in, dtype=torch.float64)
    expected = x @ (base.weight + (3 / r) * a.B @ a.A).T + (base.bias if bias else 0)
    torch.testing.assert_close(a(x), expected, rtol=1e-10, atol=1e-10)
    assert torch.linalg.matrix_rank(a.delta_weight()) <= r


def test_kaiming_init_bound_and_zero_B():
    torch.manual_seed(0)
    a = lx.LoRA(nn.Linear(400, 300), lx.config("lora", rank=64))
    bound = 1 / math.sqrt(400)  # kaiming_uniform with a = sqrt(5): sqrt(6 / ((1 + 5) * fan_in))
    assert a.A.abs().max() <= bound
    assert a.A.abs().max() > 0.99 * bound  # uniform on [-bound, bound]: the extremes are reached
    torch.testing.assert_close(a.A.var().item(), bound**2 / 3, rtol=0.05, atol=0)
    assert torch.count_nonzero(a.B) == 0


def test_gaussian_init_std_is_one_over_r():
    torch.manual_seed(0)
    a = lx.LoRA(nn.Linear(500, 300), lx.config("lora", rank=50, init="gaussian"))
    torch.testing.assert_close(a.A.std().item(), 1 / 50, rtol=0.03, atol=0)
    assert torch.count_nonzero(a.B) == 0


def test_embedding_follows_peft_init_and_lookup():
    torch.manual_seed(0)
    emb = nn.Embedding(20, 6, padding_idx=0).double()
    a = lx.LoRA(emb, lx.config("lora", rank=3, alpha=6))
    assert torch.count_nonzero(a.A) == 0 and a.B.std() > 0.5  # PEFT: A = 0, B ~ N(0, 1)
    randomized(a)
    ids = torch.tensor([[0, 3, 19], [5, 5, 1]])
    table = emb.weight + 2.0 * (a.B @ a.A).T  # (num_embeddings, dim)
    torch.testing.assert_close(a(ids), table[ids], rtol=1e-12, atol=1e-12)
    assert a.in_features == 20 and a.out_features == 6


def test_conv1d_uses_the_transposed_weight():
    conv = Conv1D(5, 7).double()  # weight (in=7, out=5)
    torch.nn.init.normal_(conv.bias)
    a = randomized(lx.LoRA(conv, lx.config("lora", rank=2)))
    x = torch.randn(3, 7, dtype=torch.float64)
    torch.testing.assert_close(a(x), x @ (conv.weight + (a.B @ a.A).T * a.scale) + conv.bias)
    merged = a.merged()
    assert isinstance(merged, Conv1D) and merged.weight.shape == (7, 5)


def test_dropout_acts_on_the_adapter_input_only():
    base = nn.Linear(10, 4).double()
    a = randomized(lx.LoRA(base, lx.config("lora", rank=2, dropout=0.5)))
    x = torch.randn(8, 10, dtype=torch.float64)
    a.train()
    torch.manual_seed(5)
    y = a(x)
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(y, base(x) + a.scale * dropped @ a.A.T @ a.B.T)
    a.eval()
    torch.testing.assert_close(a(x), F.linear(x, a.effective_weight(), base.bias))


def test_gradients_are_the_chain_rule_of_the_definition():
    base = nn.Linear(6, 5).double()
    a = randomized(lx.LoRA(base, lx.config("lora", rank=2, alpha=5)))
    x = torch.randn(4, 6, dtype=torch.float64)
    a(x).square().sum().backward()
    G = 2 * (base(x) + a.scale * x @ a.A.T @ a.B.T)  # dL/dy
    torch.testing.assert_close(a.B.grad, a.scale * G.T @ x @ a.A.T.detach())
    torch.testing.assert_close(a.A.grad, a.scale * a.B.T.detach() @ G.T @ x)


@pytest.mark.parity
@pytest.mark.parametrize("rslora", [False, True])
def test_layer_parity_with_peft(rslora):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 9)).double()
    ref = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=6, use_rslora=rslora, target_modules=["0"]),
        torch.nn.Sequential(nn.Linear(12, 9)).double(),
    )
    ref[0].base_layer.load_state_dict(base[0].state_dict())
    ours = lx.LoRA(base[0], lx.config("lora", rank=4, alpha=6, rslora=rslora))
    randomized(ours)
    with torch.no_grad():
        ref[0].lora_A["default"].weight.copy_(ours.A)
        ref[0].lora_B["default"].weight.copy_(ours.B)
    x = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.scale, ref[0].scaling["default"])
