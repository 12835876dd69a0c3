"""HiRA's own identities (Huang et al., ICLR 2025, https://openreview.net/forum?id=TwJrTz9cRS) and parity with PEFT.

The equation, the absence of a scale and the initialisation are PEFT's (`peft/tuners/hira/layer.py`, 0.21), which
agrees with the authors' code (W0 ⊙ (B A + 1) = W0 + W0 ⊙ B A).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraredux as lx
from loraredux.adapters.hira import HiRA
from tiny_models import (
    assert_unchanged,
    logits,
    randomize,
    randomized,
    snapshot,
    tiny_gpt2,
    tiny_llama,
)


def numerical_rank(M: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(M, rtol=1e-10))


def test_update_is_w0_times_ba_entrywise():
    """ΔW[i, j] = W0[i, j] * sum_k B[i, k] A[k, j], written out entry by entry: no scale, no transpose."""
    base = nn.Linear(5, 4).double()
    a = randomized(HiRA(base, lx.config("hira", rank=3)))
    W0, A, B = base.weight, a.A, a.B
    expected = torch.empty(4, 5, dtype=torch.float64)
    for i in range(4):
        for j in range(5):
            expected[i, j] = W0[i, j] + W0[i, j] * sum(B[i, k] * A[k, j] for k in range(3))
    torch.testing.assert_close(a.effective_weight(), expected, rtol=1e-13, atol=1e-13)


@given(
    n_in=st.integers(1, 10),
    n_out=st.integers(1, 10),
    r=st.integers(1, 12),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    bias=st.booleans(),
)
def test_fast_path_equals_the_definition_for_all_shapes(n_in, n_out, r, lead, bias):
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out, bias=bias).double()
    a = randomized(HiRA(base, lx.config("hira", rank=r)))
    x = torch.randn(*lead, n_in, dtype=torch.float64)
    W = base.weight + base.weight * (a.B @ a.A)
    expected = x @ W.T + (base.bias if bias else 0)
    torch.testing.assert_close(a(x), expected, rtol=1e-10, atol=1e-10)


@given(n=st.integers(2, 9), m=st.integers(2, 9), rho=st.integers(1, 4), r=st.integers(1, 4))
def test_rank_is_bounded_by_rank_w0_times_r_and_reaches_it(n, m, rho, r):
    """rank(W0 ⊙ B A) <= rank(W0) r (Hadamard product of ranks), attained generically up to min(out, in)."""
    g = torch.Generator().manual_seed(n * 100 + m * 10 + rho)
    rho = min(rho, n, m)
    W0 = torch.randn(n, rho, generator=g, dtype=torch.float64) @ torch.randn(
        rho, m, generator=g, dtype=torch.float64
    )
    base = nn.Linear(m, n, bias=False).double()
    with torch.no_grad():
        base.weight.copy_(W0)
    a = randomized(HiRA(base, lx.config("hira", rank=r)), seed=n + m)
    rank = numerical_rank(a.delta_weight())
    assert rank <= rho * r
    assert rank == min(rho * r, n, m)


def test_rank_at_loras_parameter_budget_exceeds_r():
    """Same r (in + out) parameters as LoRA rank 4: LoRA's update has rank 4, HiRA's is full (32)."""
    torch.manual_seed(0)
    base = nn.Linear(32, 32).double()
    hira = randomized(HiRA(base, lx.config("hira", rank=4)))
    lora = lx.LoRA(nn.Linear(32, 32).double(), lx.config("lora", rank=4))
    with torch.no_grad():
        lora.B.normal_()
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(hira) == count(lora) == 4 * (32 + 32)
    assert numerical_rank(lora.delta_weight()) == 4
    assert numerical_rank(hira.delta_weight()) == 32


@pytest.mark.parametrize(("n_in", "n_out", "r"), [(7, 5, 2), (16, 48, 4), (3, 3, 32)])
def test_parameter_count_is_r_times_in_plus_out(n_in, n_out, r):
    a = HiRA(nn.Linear(n_in, n_out), lx.config("hira", rank=r))
    own = sum(p.numel() for p in a.parameters() if p.requires_grad)
    assert own == r * (n_in + n_out) == a.config.parameter_count(n_in, n_out)


def test_default_init_is_peft_kaiming_and_zero_b_so_w_prime_is_w0():
    torch.manual_seed(0)
    base = nn.Linear(400, 300).double()
    a = HiRA(base, lx.config("hira"))
    assert a.config.rank == 32
    bound = 1 / math.sqrt(400)  # kaiming_uniform with a = sqrt(5)
    assert bound * 0.99 < a.A.abs().max() <= bound
    assert torch.count_nonzero(a.B) == 0
    assert torch.equal(a.effective_weight(), base.weight)


def test_gaussian_init_std_is_one_over_r():
    torch.manual_seed(0)
    a = HiRA(nn.Linear(500, 300), lx.config("hira", rank=50, init="gaussian"))
    torch.testing.assert_close(a.A.std().item(), 1 / 50, rtol=0.03, atol=0)
    assert torch.count_nonzero(a.B) == 0


def test_embedding_follows_peft_init_and_gathers_rows():
    torch.manual_seed(0)
    emb = nn.Embedding(20, 6, padding_idx=0).double()
    a = HiRA(emb, lx.config("hira", rank=3))
    assert torch.count_nonzero(a.A) == 0 and a.B.std() > 0.5  # PEFT: A = 0, B ~ N(0, 1)
    randomized(a)
    ids = torch.tensor([[0, 3, 19], [5, 5, 1]])
    table = emb.weight + emb.weight * (a.B @ a.A).T  # (num_embeddings, dim)
    torch.testing.assert_close(a(ids), table[ids], rtol=1e-12, atol=1e-12)


def test_conv1d_uses_the_transposed_weight():
    conv = Conv1D(5, 7).double()  # weight (in=7, out=5)
    torch.nn.init.normal_(conv.bias)
    a = randomized(HiRA(conv, lx.config("hira", rank=2)))
    x = torch.randn(3, 7, dtype=torch.float64)
    W = conv.weight + conv.weight * (a.B @ a.A).T  # (in, out)
    torch.testing.assert_close(a(x), x @ W + conv.bias)
    merged = a.merged()
    assert isinstance(merged, Conv1D)
    torch.testing.assert_close(merged.weight, W)


def test_dropout_acts_on_the_adapter_input_only():
    base = nn.Linear(10, 4).double()
    a = randomized(HiRA(base, lx.config("hira", rank=2, dropout=0.5)))
    x = torch.randn(8, 10, dtype=torch.float64)
    a.train()
    torch.manual_seed(5)
    y = a(x)
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(y, base(x) + dropped @ a.delta_weight().T)
    a.eval()
    torch.testing.assert_close(a(x), F.linear(x, a.effective_weight(), base.bias))


def test_any_rank_builds_even_above_min_in_out():
    """PEFT's default r = 32 on a layer 16 -> 8: B A is then unconstrained, ΔW = W0 ⊙ M for any M."""
    a = randomized(HiRA(nn.Linear(16, 8).double(), lx.config("hira")))
    assert a.A.shape == (32, 16) and numerical_rank(a.B @ a.A) == 8


@pytest.mark.parametrize("bad", [{"rank": 0}, {"dropout": 1.0}, {"init": "orthogonal"}])
def test_bad_config_values_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        lx.config("hira", **bad)


# ----------------------------------------------------------------------------------------------- PEFT parity


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


LAYERS = {
    "linear": (lambda: nn.Linear(12, 9), lambda: torch.randn(2, 3, 12, dtype=torch.float64)),
    "conv1d": (lambda: Conv1D(9, 12), lambda: torch.randn(2, 3, 12, dtype=torch.float64)),
    "embedding": (lambda: nn.Embedding(12, 9), lambda: torch.randint(0, 12, (2, 3))),
}


@pytest.mark.parity
@pytest.mark.parametrize("kind", list(LAYERS))
def test_layer_parity_with_peft(kind):
    make_layer, make_input = LAYERS[kind]
    torch.manual_seed(0)
    ours = _Holder(make_layer()).double()
    ref = copy.deepcopy(ours)
    ref = peft.inject_adapter_in_model(
        peft.HiraConfig(r=4, target_modules=["layer"], fan_in_fan_out=kind == "conv1d"), ref
    )
    lx.adapt_(ours, lx.config("hira", rank=4), targets=["layer"])
    randomized(ours.layer)
    names = (
        ("hira_embedding_A", "hira_embedding_B") if kind == "embedding" else ("hira_A", "hira_B")
    )
    with torch.no_grad():
        getattr(ref.layer, names[0])["default"].copy_(ours.layer.A)
        getattr(ref.layer, names[1])["default"].copy_(ours.layer.B)
    x = make_input()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


FILE_CASES = {
    "llama-q-v": (tiny_llama, ["q_proj", "v_proj"], {}),
    "llama-embedding": (tiny_llama, ["embed_tokens", "q_proj"], {}),
    "gpt2-conv1d": (tiny_gpt2, ["c_attn", "c_proj"], {}),
}


@pytest.mark.parity
@pytest.mark.parametrize("name", list(FILE_CASES))
def test_loraredux_file_loads_in_peft(name: str, tmp_path: Path) -> None:
    factory, targets, ranks = FILE_CASES[name]
    model = lx.adapt_(factory(), lx.config("hira", rank=4), targets, rank_pattern=ranks or None)
    randomize(list(lx.trainable_parameters(model).values()))
    expected = logits(model)
    with lx.disabled(model):
        assert not torch.allclose(logits(model), expected)

    lx.save_adapter(model, tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(factory(), tmp_path).eval()

    assert loaded.peft_config["default"].peft_type == peft.PeftType.HIRA
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parity
@pytest.mark.parametrize("name", list(FILE_CASES))
def test_peft_file_loads_in_loraredux(name: str, tmp_path: Path) -> None:
    factory, targets, ranks = FILE_CASES[name]
    config = peft.HiraConfig(r=4, target_modules=targets, rank_pattern=dict(ranks))
    peft_model = peft.get_peft_model(factory(), config)
    randomize([p for p in peft_model.parameters() if p.requires_grad])
    peft_model.eval()
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path)

    model = lx.load_adapter(factory(), tmp_path)

    assert not torch.allclose(logits(factory()), expected)
    torch.testing.assert_close(logits(model), expected, rtol=1e-10, atol=1e-10)
    assert {type(a) for _, a in lx.adapters(model)} == {HiRA}
    peft_ranks = {
        n.removeprefix("base_model.model."): m.r["default"]
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.hira.HiraLayer)
    }
    assert {p: a.config.rank for p, a in lx.adapters(model)} == peft_ranks


@pytest.mark.parity
def test_peft_default_rank_32_file_loads_on_narrow_layers(tmp_path: Path) -> None:
    """PEFT's default r = 32 on tiny_llama's 16 -> 8 k_proj: HiRA has no rank bound, so it must load."""
    peft_model = peft.get_peft_model(tiny_llama(), peft.HiraConfig(target_modules=["k_proj"]))
    randomize([p for p in peft_model.parameters() if p.requires_grad])
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    model = lx.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(model), logits(peft_model), rtol=1e-10, atol=1e-10)


@pytest.mark.parity
@pytest.mark.xfail(
    raises=RuntimeError,
    strict=True,
    reason="PEFT 0.21.2 and 0.22.0: HiRA ignores rank_pattern (hira/layer.py dispatch_default reads hira_config.r)",
)
def test_rank_pattern_file_loads_in_peft(tmp_path: Path) -> None:
    model = lx.adapt_(
        tiny_llama(),
        lx.config("hira", rank=4),
        ["q_proj", "down_proj"],
        rank_pattern={"down_proj": 6},
    )
    lx.save_adapter(model, tmp_path, format="peft")
    peft.PeftModel.from_pretrained(
        tiny_llama(), tmp_path
    )  # builds rank 4 everywhere, then the shapes clash


@pytest.mark.parity
def test_peft_rank_pattern_file_is_refused_with_the_shape_clash(tmp_path: Path) -> None:
    """PEFT writes rank_pattern but builds (and saves) every layer at r: we build what the file says and refuse the
    tensors that contradict it, naming the layer, rather than guess which of the two PEFT meant."""
    config = peft.HiraConfig(
        r=4, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 6}
    )
    peft.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"model.layers.0.mlp.down_proj.*hira_A: file \(4, 32\) vs layer \(6, 32\)"
    ):
        lx.load_adapter(model, tmp_path)
    assert_unchanged(model, before)
