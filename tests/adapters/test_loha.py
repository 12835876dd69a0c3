"""LoHa's own identities (FedPara, Hyeon-Woo et al., arXiv 2108.06098, §3) and parity with PEFT's LoHa.

The definition transcribed here independently of the layer: dW = (alpha / r) * (W1a W1b) ⊙ (W2a W2b).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from unittest import mock

import peft
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraredux as lx
from loraredux.adapters import LoHa, LoHaConfig
from loraredux.adapters import loha as loha_module
from loraredux.adapters.loha import face_split_factors, factorised_is_cheaper
from tiny_models import (
    assert_unchanged,
    logits,
    randomize,
    randomized,
    snapshot,
    tiny_gpt2,
    tiny_llama,
)


def definition(a: LoHa) -> torch.Tensor:
    """dW by the paper's formula, element by element: s * (sum_k X1[o,k] Y1[k,i]) * (sum_k X2[o,k] Y2[k,i])."""
    s = a.config.alpha / a.config.rank
    P = torch.einsum("ok,ki->oi", a.hada_w1_a, a.hada_w1_b)
    Q = torch.einsum("ok,ki->oi", a.hada_w2_a, a.hada_w2_b)
    return s * P * Q


# ------------------------------------------------------------------------------------------- the equation


def test_effective_weight_is_the_hadamard_product_scaled_by_alpha_over_r():
    base = nn.Linear(9, 7).double()
    a = randomized(LoHa(base, lx.config("loha", rank=3, alpha=12)))
    assert a.scale == 4.0
    torch.testing.assert_close(a.delta_weight(), definition(a), rtol=1e-12, atol=1e-12)


@given(n_out=st.integers(1, 9), n_in=st.integers(1, 9), r1=st.integers(1, 4), r2=st.integers(1, 4))
def test_face_splitting_identity_is_exact(n_out, n_in, r1, r2):
    """(P Q) ⊙ (R T) = (P • R)(Q ∗ T): the rank-r1 r2 LoRA form of the Hadamard product, any r1, r2."""
    g = torch.Generator().manual_seed(n_out * 100 + n_in * 10 + r1 + r2)
    P, R = (torch.randn(n_out, r, generator=g, dtype=torch.float64) for r in (r1, r2))
    Q, T = (torch.randn(r, n_in, generator=g, dtype=torch.float64) for r in (r1, r2))
    A, B = face_split_factors(P, Q, R, T)
    assert A.shape == (r1 * r2, n_in) and B.shape == (n_out, r1 * r2)
    torch.testing.assert_close(B @ A, (P @ Q) * (R @ T), rtol=1e-12, atol=1e-12)


@given(
    n_in=st.integers(1, 10),
    n_out=st.integers(1, 10),
    rank=st.integers(1, 4),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    bias=st.booleans(),
    path=st.sampled_from(
        [None, True, False]
    ),  # the cost rule's choice, or forced factorised / dense
)
def test_fast_path_equals_the_definition_for_all_shapes(n_in, n_out, rank, lead, bias, path):
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out, bias=bias).double()
    a = randomized(LoHa(base, lx.config("loha", rank=rank, alpha=3)))
    x = torch.randn(*lead, n_in, dtype=torch.float64)
    expected = x @ (base.weight + definition(a)).T + (base.bias if bias else 0)
    forced = (
        mock.patch.object(loha_module, "factorised_is_cheaper", return_value=path)
        if path is not None
        else mock.patch.object(loha_module, "factorised_is_cheaper", factorised_is_cheaper)
    )
    with forced:
        torch.testing.assert_close(a(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("factorised", [True, False])
def test_gradients_of_both_paths_are_those_of_the_definition(factorised):
    base = nn.Linear(6, 5).double()
    a = randomized(LoHa(base, lx.config("loha", rank=2, alpha=5)))
    x = torch.randn(4, 6, dtype=torch.float64)
    params = list(a.peft_tensors().values())
    with mock.patch.object(loha_module, "factorised_is_cheaper", return_value=factorised):
        fast = torch.autograd.grad(a(x).square().sum(), params)
    slow = torch.autograd.grad(
        F.linear(x, base.weight + definition(a), base.bias).square().sum(), params
    )
    for g_fast, g_slow in zip(fast, slow, strict=True):
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-10, atol=1e-10)


def test_cost_rule_prefers_the_factorised_form_except_for_large_r():
    # r = 8 on 4096 x 4096: r^2 (in + out) = 2^19 per token against in out = 2^24, at any token count.
    assert all(factorised_is_cheaper(t, 4096, 4096, 8) for t in (1, 16, 4096))
    # r^2 = 256 above in out / (in + out) = 8 on a 16 x 16 layer: the dense update is cheaper.
    assert not factorised_is_cheaper(1000, 16, 16, 16)
    # Token ids gather a row instead of multiplying: the factorised form wins on a 32000-row vocabulary.
    assert factorised_is_cheaper(512, 32000, 4096, 8, dense_input=False)


# ------------------------------------------------------------------------------------------- rank and size


@given(n_in=st.integers(1, 12), n_out=st.integers(1, 12), rank=st.integers(1, 5))
def test_parameter_count_is_2r_in_plus_out(n_in, n_out, rank):
    a = LoHa(nn.Linear(n_in, n_out), lx.config("loha", rank=rank))
    own = sum(p.numel() for p in a.parameters() if p.requires_grad)
    assert own == a.config.parameter_count(n_in, n_out) == 2 * rank * (n_in + n_out)


@pytest.mark.parametrize(
    ("n_in", "n_out", "rank"), [(40, 30, 3), (20, 20, 5), (50, 8, 2), (30, 30, 1)]
)
def test_rank_reaches_min_of_r_squared_and_the_shape(n_in, n_out, rank):
    """rank(dW) <= r^2 (FedPara §3), and random factors attain min(r^2, in, out)."""
    a = randomized(LoHa(nn.Linear(n_in, n_out).double(), lx.config("loha", rank=rank)))
    assert torch.linalg.matrix_rank(a.delta_weight()).item() == min(rank * rank, n_in, n_out)


def test_rank_at_loras_parameter_budget_exceeds_loras_rank():
    """64 x 64: LoRA r = 8 and LoHa r = 4 both train 1,024 numbers; LoHa's update has rank 16 > 8."""
    n = 64
    lora = lx.config("lora", rank=8)
    loha = lx.config("loha", rank=4)
    assert loha.parameter_count(n, n) == lora.parameter_count(n, n) == 1024
    torch.manual_seed(0)
    a = randomized(LoHa(nn.Linear(n, n).double(), loha))
    b = lx.LoRA(nn.Linear(n, n).double(), lora)
    with torch.no_grad():
        b.B.normal_()
    assert torch.linalg.matrix_rank(b.delta_weight()).item() == 8
    assert torch.linalg.matrix_rank(a.delta_weight()).item() == 16


def test_lora_form_is_exact_with_rank_r_squared():
    a = randomized(LoHa(nn.Linear(11, 13).double(), lx.config("loha", rank=3, alpha=2)))
    A, B, s = a.lora_form()
    assert A.shape == (9, 11) and B.shape == (13, 9) and s == 2 / 3
    torch.testing.assert_close(s * B @ A, definition(a), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------- initialisation


def test_peft_initialisation_kaiming_factors_and_zero_w2_b():
    torch.manual_seed(0)
    a = LoHa(nn.Linear(400, 300), lx.config("loha", rank=64))
    # kaiming_uniform with a = sqrt(5) draws from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = the second size.
    for p, fan_in in ((a.hada_w1_a, 64), (a.hada_w1_b, 400), (a.hada_w2_a, 64)):
        bound = 1 / math.sqrt(fan_in)
        assert bound * 0.99 < p.abs().max() <= bound
        torch.testing.assert_close(p.var().item(), bound**2 / 3, rtol=0.05, atol=0)
    assert torch.count_nonzero(a.hada_w2_b) == 0
    assert torch.count_nonzero(a.delta_weight()) == 0


# ------------------------------------------------------------------------------------------- dropouts


def peft_layer(n_in: int, n_out: int, **fields) -> tuple[nn.Module, LoHa]:
    """PEFT's LoHa layer and ours on the same base weights, with the same random factors."""
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out).double()
    ref = peft.inject_adapter_in_model(
        peft.LoHaConfig(target_modules=["0"], **fields), nn.Sequential(copy.deepcopy(base))
    )
    ours = randomized(
        LoHa(
            base,
            LoHaConfig.from_peft_fields({"r": fields.get("r", 8), "alpha": 8, **fields}),
        )
    )
    with torch.no_grad():
        for name, value in ours.peft_tensors().items():
            getattr(ref[0], name)["default"].copy_(value)
    return ref, ours


@pytest.mark.parity
def test_layer_parity_with_peft():
    ref, ours = peft_layer(12, 9, r=4, alpha=6)
    ref.eval()
    ours.eval()
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.delta_weight(), ref[0].get_delta_weight("default"))
    assert ours.scale == ref[0].scaling["default"]


@pytest.mark.parity
def test_peft_rounds_the_scale_to_float32():
    """PEFT's LoHa multiplies by torch.tensor(alpha / r), a float32 number; loraredux keeps alpha / r exact.

    So the two agree to 1e-12 where alpha / r is a float32 number (every parity test here) and otherwise
    differ by that rounding only (8 / 3 here, a relative 2e-8).
    """
    ref, ours = peft_layer(7, 5, r=3, alpha=8)
    s = 8 / 3
    s32 = torch.tensor(s).item()
    assert s32 != s and ours.scale == s
    peft_delta = ref[0].get_delta_weight("default")
    torch.testing.assert_close(peft_delta, ours.delta_weight() * (s32 / s), rtol=1e-12, atol=1e-12)
    assert not torch.equal(peft_delta, ours.delta_weight())


@pytest.mark.parity
@pytest.mark.parametrize(
    ("rank_dropout", "module_dropout"), [(0.3, 0.0), (0.0, 0.5), (0.4, 0.5), (0.6, 0.2)]
)
def test_training_dropouts_draw_as_peft(rank_dropout, module_dropout):
    """Under one seed PEFT and loraredux skip the same forward passes and drop the same rows."""
    ref, ours = peft_layer(10, 16, r=4, rank_dropout=rank_dropout, module_dropout=module_dropout)
    ref.train()
    ours.train()
    x = torch.randn(4, 10, dtype=torch.float64)
    outcomes = set()
    for seed in range(12):
        torch.manual_seed(seed)
        expected = ref(x)
        torch.manual_seed(seed)
        torch.testing.assert_close(ours(x), expected, rtol=1e-12, atol=1e-12)
        outcomes.add(torch.equal(expected, ours.base(x)))
    assert outcomes == ({False, True} if module_dropout else {False})
    ours.eval()  # no dropout outside training
    torch.testing.assert_close(ours(x), F.linear(x, ours.effective_weight(), ours.base.bias))


def test_rank_dropout_scales_kept_rows_by_the_inverse_kept_fraction():
    a = randomized(LoHa(nn.Linear(6, 40).double(), lx.config("loha", rank=2, rank_dropout=0.5)))
    a.train()
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.manual_seed(1)
    y = a(x)
    torch.manual_seed(1)
    torch.rand(1)  # the module-dropout coin comes first
    keep = (torch.rand(40) > 0.5).double()
    expected = a.base(x) + (x @ definition(a).T) * keep / keep.mean()
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert 0 < keep.sum() < 40


def test_a_mask_that_keeps_no_row_gives_the_base_not_nan():
    a = randomized(LoHa(nn.Linear(5, 1).double(), lx.config("loha", rank=2, rank_dropout=0.99)))
    a.train()
    x = torch.randn(2, 5, dtype=torch.float64)
    seeds = [
        s for s in range(50) if (torch.manual_seed(s), torch.rand(1), torch.rand(1))[2] <= 0.99
    ]
    torch.manual_seed(seeds[0])
    torch.testing.assert_close(a(x), a.base(x), rtol=0, atol=0)


@pytest.mark.parametrize("field", ["rank_dropout", "module_dropout"])
@pytest.mark.parametrize("value", [1.0, -0.1, True])
def test_dropout_outside_zero_one_is_refused(field, value):
    with pytest.raises(ValueError, match=f"loha: {field} must be a number in \\[0, 1\\)"):
        lx.config("loha", **{field: value})


# ------------------------------------------------------------------------------------------- base kinds


def test_conv1d_uses_the_transposed_weight():
    conv = Conv1D(5, 7).double()  # weight (in=7, out=5)
    torch.nn.init.normal_(conv.bias)
    a = randomized(LoHa(conv, lx.config("loha", rank=2)))
    x = torch.randn(3, 7, dtype=torch.float64)
    torch.testing.assert_close(a(x), x @ (conv.weight + definition(a).T) + conv.bias)
    merged = a.merged()
    assert isinstance(merged, Conv1D) and merged.weight.shape == (7, 5)


def test_embedding_looks_up_the_adapted_table():
    emb = nn.Embedding(20, 6, padding_idx=0).double()
    a = randomized(LoHa(emb, lx.config("loha", rank=2, alpha=4)))
    ids = torch.tensor([[0, 3, 19], [5, 5, 1]])
    table = emb.weight + definition(a).T  # (num_embeddings, dim)
    for factorised in (True, False):
        with mock.patch.object(loha_module, "factorised_is_cheaper", return_value=factorised):
            torch.testing.assert_close(a(ids), table[ids], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------- files


TARGETS = ["q_proj", "v_proj", "down_proj"]
# Every alpha / r here is a float32 number (see test_peft_rounds_the_scale_to_float32).
RANKS = {"layers.0.self_attn.q_proj": 2, "down_proj": 8}
ALPHAS = {"v_proj": 3.0, "layers.1.mlp.down_proj": 5.0}


@pytest.mark.parity
def test_loraredux_file_loads_in_peft(tmp_path: Path):
    fresh = tiny_llama()
    model = lx.adapt_(
        tiny_llama(),
        lx.config("loha", rank=4, alpha=8, rank_dropout=0.1),
        TARGETS,
        rank_pattern=RANKS,
        alpha_pattern=ALPHAS,
    )
    randomize(list(lx.trainable_parameters(model).values()))
    expected = logits(model)
    assert not torch.allclose(logits(tiny_llama()), expected)
    lx.save_adapter(model, tmp_path)  # auto: PEFT's format, every layer is an nn.Linear
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOHA" and "fan_in_fan_out" not in config
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-10, atol=1e-10)
    assert loaded.peft_config["default"].rank_dropout == 0.1


@pytest.mark.parity
def test_peft_file_loads_in_loraredux(tmp_path: Path):
    peft_model = peft.get_peft_model(
        tiny_llama(),
        peft.LoHaConfig(
            r=4, alpha=8, target_modules=TARGETS, rank_pattern=RANKS, alpha_pattern=ALPHAS
        ),
    )
    randomize([p for p in peft_model.parameters() if p.requires_grad])
    peft_model.eval()
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    model = lx.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(model), expected, rtol=1e-10, atol=1e-10)
    peft_layers = {
        n.removeprefix("base_model.model."): (m.r["default"], m.alpha["default"])
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.loha.LoHaLayer)
    }
    ours = {p: (a.config.rank, a.config.alpha) for p, a in lx.adapters(model)}
    assert ours == peft_layers and len(ours) == 6


@pytest.mark.parametrize(
    ("factory", "targets"), [(tiny_gpt2, ["c_attn"]), (tiny_llama, ["embed_tokens"])]
)
def test_conv1d_and_embedding_adapters_save_natively(factory, targets, tmp_path: Path):
    """PEFT's LoHa adapts neither GPT-2's Conv1D nor an embedding: its format is refused, ours round-trips."""
    model = lx.adapt_(factory(), lx.config("loha", rank=2), targets)
    randomize(list(lx.trainable_parameters(model).values()))
    kind = "conv1d" if factory is tiny_gpt2 else "embedding"
    with pytest.raises(ValueError, match=f"loha on {kind} layers.*no PEFT form"):
        lx.save_adapter(model, tmp_path / "peft", format="peft")
    lx.save_adapter(model, tmp_path / "auto")
    assert (
        json.loads((tmp_path / "auto" / "adapter_config.json").read_text())["format"] == "loraredux"
    )
    loaded = lx.load_adapter(factory(), tmp_path / "auto")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_a_bad_layer_rank_is_refused_and_the_model_left_unchanged():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="loha: rank must be an integer >= 1, got 0"):
        lx.adapt_(model, lx.config("loha", rank=2), TARGETS, rank_pattern={"down_proj": 0})
    assert_unchanged(model, before)
