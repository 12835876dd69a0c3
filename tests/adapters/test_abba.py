"""ABBA's own identities (Singhal et al., arXiv 2505.14238): the Khatri-Rao forward, the rank r1 r2 at LoRA's budget,
the mixed SVD / zero initialisation, and native save / load (PEFT has no ABBA).

The Khatri-Rao factor layout and the initialisation are the authors' (github.com/CERT-Lab/abba, `abba.py`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraredux as lx
from loraredux.adapters import abba as abba_module
from loraredux.adapters.abba import ABBA, khatri_rao_columns, khatri_rao_rows
from tiny_models import (
    assert_same_adapter,
    assert_unchanged,
    logits,
    randomize,
    randomized,
    snapshot,
    tiny_gpt2,
    tiny_llama,
)

F64 = torch.float64


def numerical_rank(M: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(M, rtol=1e-10))


@given(out=st.integers(1, 8), n_in=st.integers(1, 8), r1=st.integers(1, 4), r2=st.integers(1, 4))
def test_khatri_rao_identity(out, n_in, r1, r2):
    """(B1 A1) ⊙ (B2 A2) = (B1 •ᵣ B2)(A1 ∗ A2), against a transcription summing over both ranks by hand."""
    g = torch.Generator().manual_seed(out * 1000 + n_in * 100 + r1 * 10 + r2)
    B1, B2 = (
        torch.randn(out, r1, generator=g, dtype=F64),
        torch.randn(out, r2, generator=g, dtype=F64),
    )
    A1, A2 = (
        torch.randn(r1, n_in, generator=g, dtype=F64),
        torch.randn(r2, n_in, generator=g, dtype=F64),
    )
    by_hand = torch.zeros(out, n_in, dtype=F64)
    for k in range(r1):
        for l in range(r2):
            by_hand += torch.outer(B1[:, k] * B2[:, l], A1[k] * A2[l])
    Bkr, Akr = khatri_rao_rows(B1, B2), khatri_rao_columns(A1, A2)
    assert Bkr.shape == (out, r1 * r2) and Akr.shape == (r1 * r2, n_in)
    torch.testing.assert_close(Bkr @ Akr, by_hand, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((B1 @ A1) * (B2 @ A2), by_hand, rtol=1e-12, atol=1e-12)


def test_update_is_s_times_hadamard_of_two_products_entrywise():
    base = nn.Linear(5, 4).double()
    a = randomized(ABBA(base, lx.config("abba", rank=2, rank2=3, alpha=1.5)))
    expected = base.weight.detach().clone()
    for i in range(4):
        for j in range(5):
            p1 = sum(a.B1[i, k] * a.A1[k, j] for k in range(2))
            p2 = sum(a.B2[i, k] * a.A2[k, j] for k in range(3))
            expected[i, j] += 1.5 * p1 * p2
    torch.testing.assert_close(a.effective_weight(), expected, rtol=1e-13, atol=1e-13)
    A, B, s = a.lora_form()  # ABBA is exactly a rank-r1 r2 LoRA
    assert (A.shape, B.shape, s) == ((6, 5), (4, 6), 1.5)


@given(
    n_in=st.integers(1, 10),
    n_out=st.integers(1, 10),
    data=st.data(),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    bias=st.booleans(),
    rank_stable=st.booleans(),
)
def test_fast_path_equals_the_definition_for_all_shapes(n_in, n_out, data, lead, bias, rank_stable):
    r1 = data.draw(st.integers(1, min(n_in, n_out)))
    r2 = data.draw(st.integers(1, 5))
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out, bias=bias).double()
    cfg = lx.config("abba", rank=r1, rank2=r2, alpha=3.0, rank_stable=rank_stable)
    a = randomized(ABBA(base, cfg))
    s = 3.0 / math.sqrt(r1 * r2) if rank_stable else 3.0
    x = torch.randn(*lead, n_in, dtype=F64)
    W = base.weight + s * (a.B1 @ a.A1) * (a.B2 @ a.A2)
    torch.testing.assert_close(a(x), x @ W.T + (base.bias if bias else 0), rtol=1e-10, atol=1e-10)


@given(n=st.integers(2, 12), m=st.integers(2, 12), r1=st.integers(1, 4), r2=st.integers(1, 4))
def test_rank_is_at_most_r1_r2_and_reaches_it(n, m, r1, r2):
    r1 = min(r1, n, m)
    torch.manual_seed(n * 100 + m)
    a = randomized(ABBA(nn.Linear(m, n).double(), lx.config("abba", rank=r1, rank2=r2)), seed=n + m)
    rank = numerical_rank(a.delta_weight())
    assert rank <= r1 * r2
    assert rank == min(r1 * r2, n, m)  # random factors: the bound is attained


def test_rank_at_loras_parameter_budget_exceeds_r():
    """LoRA r = 8 and ABBA r1 = r2 = r / 2 = 4 both train 8 (32 + 32) = 512 numbers; ABBA's update has rank
    r1 r2 = 16, LoRA's 8."""
    torch.manual_seed(0)
    abba = randomized(ABBA(nn.Linear(32, 32).double(), lx.config("abba", rank=4)))
    lora = lx.LoRA(nn.Linear(32, 32).double(), lx.config("lora", rank=8))
    with torch.no_grad():
        lora.B.normal_()
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(abba) == count(lora) == 512
    assert numerical_rank(lora.delta_weight()) == 8
    assert numerical_rank(abba.delta_weight()) == 16


@pytest.mark.parametrize(
    ("n_in", "n_out", "r1", "r2"), [(7, 5, 2, 2), (16, 48, 4, 1), (9, 3, 3, 6)]
)
def test_parameter_count_is_r1_plus_r2_times_in_plus_out(n_in, n_out, r1, r2):
    a = ABBA(nn.Linear(n_in, n_out), lx.config("abba", rank=r1, rank2=r2))
    own = sum(p.numel() for p in a.parameters() if p.requires_grad)
    assert own == (r1 + r2) * (n_in + n_out) == a.config.parameter_count(n_in, n_out)


def test_scale_is_alpha_or_rank_stable():
    assert (
        lx.config("abba", rank=4, alpha=8.0).scale == 8.0
    )  # the authors' sqrt(alpha1) sqrt(alpha2)
    assert (
        lx.config("abba", rank=4, rank2=9, alpha=12.0, rank_stable=True).scale == 2.0
    )  # 12 / sqrt(36)


def test_init_first_pair_is_w0_truncated_svd_second_is_zero_and_kaiming():
    torch.manual_seed(0)
    base = nn.Linear(40, 30).double()
    W0 = base.weight.detach().clone()
    a = ABBA(base, lx.config("abba", rank=5))
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    best = U[:, :5] @ torch.diag(S[:5]) @ Vh[:5]
    torch.testing.assert_close(a.B1 @ a.A1, best, rtol=1e-10, atol=1e-10)  # Eckart-Young optimum
    # Balanced split of sqrt(Σ): B1^T B1 = A1 A1^T = Σ_r1.
    torch.testing.assert_close(a.B1.T @ a.B1, torch.diag(S[:5]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a.A1 @ a.A1.T, torch.diag(S[:5]), rtol=1e-10, atol=1e-10)
    assert torch.count_nonzero(a.B2) == 0
    bound = math.sqrt(6 / 40)  # kaiming_uniform with a = 0, as the authors
    assert 0.9 * bound < a.A2.abs().max() <= bound
    assert torch.equal(base.weight, W0)  # W0 is not moved
    assert torch.equal(a.effective_weight(), W0)  # identity at init


def test_mixed_init_trains_where_the_lora_style_init_is_stuck():
    """At init only B2 has a gradient, and it is non-zero; with B1 = B2 = 0 (LoRA's init for both pairs) every
    factor's gradient is zero, so training could never start (the paper's reason for the mixed init)."""
    torch.manual_seed(0)
    a = ABBA(nn.Linear(6, 5).double(), lx.config("abba", rank=2))
    x = torch.randn(4, 6, dtype=F64)
    a(x).square().sum().backward()
    assert a.B2.grad.abs().max() > 1e-3
    for p in (a.A1, a.B1, a.A2):
        assert torch.count_nonzero(p.grad) == 0
    with torch.no_grad():
        a.B1.zero_()
    for p in (a.A1, a.B1, a.A2, a.B2):
        p.grad = None
    a(x).square().sum().backward()
    for p in (a.A1, a.B1, a.A2, a.B2):
        assert torch.count_nonzero(p.grad) == 0


def test_large_layers_use_the_randomized_svd(monkeypatch):
    """Above EXACT_SVD_LIMIT the first pair comes from torch.svd_lowrank (10 power iterations, as the authors):
    on a spectrum that decays it matches the exact truncated SVD closely."""
    monkeypatch.setattr(abba_module, "EXACT_SVD_LIMIT", 4)
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(60, 20, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(50, 20, generator=g, dtype=F64))
    S = 2.0 ** -torch.arange(20, dtype=F64)
    base = nn.Linear(50, 60, bias=False).double()
    with torch.no_grad():
        base.weight.copy_(U @ torch.diag(S) @ V.T)
    torch.manual_seed(1)
    a = ABBA(base, lx.config("abba", rank=3))
    best = U[:, :3] @ torch.diag(S[:3]) @ V[:, :3].T
    torch.testing.assert_close(a.B1 @ a.A1, best, rtol=0, atol=1e-8)


def test_half_precision_base_gets_a_float32_svd():
    base = nn.Linear(12, 10).to(torch.bfloat16)
    a = ABBA(base, lx.config("abba", rank=2))
    assert a.A1.dtype == a.B1.dtype == torch.bfloat16
    assert torch.isfinite(a.B1).all() and a.B1.abs().max() > 0


def test_embedding_gathers_the_khatri_rao_projection():
    torch.manual_seed(0)
    emb = nn.Embedding(20, 6, padding_idx=0).double()
    a = randomized(ABBA(emb, lx.config("abba", rank=2, rank2=3, alpha=0.5)))
    ids = torch.tensor([[0, 3, 19], [5, 5, 1]])
    table = emb.weight + 0.5 * ((a.B1 @ a.A1) * (a.B2 @ a.A2)).T  # (num_embeddings, dim)
    torch.testing.assert_close(a(ids), table[ids], rtol=1e-12, atol=1e-12)


def test_conv1d_uses_the_transposed_weight():
    conv = Conv1D(5, 7).double()  # weight (in=7, out=5)
    torch.nn.init.normal_(conv.bias)
    a = randomized(ABBA(conv, lx.config("abba", rank=2)))
    x = torch.randn(3, 7, dtype=F64)
    W = conv.weight + a.scale * ((a.B1 @ a.A1) * (a.B2 @ a.A2)).T  # (in, out)
    torch.testing.assert_close(a(x), x @ W + conv.bias)
    assert isinstance(a.merged(), Conv1D)


def test_dropout_acts_on_the_adapter_input_only():
    base = nn.Linear(10, 4).double()
    a = randomized(ABBA(base, lx.config("abba", rank=2, dropout=0.5)))
    x = torch.randn(8, 10, dtype=F64)
    a.train()
    torch.manual_seed(5)
    y = a(x)
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(y, base(x) + dropped @ a.delta_weight().T)


def test_rank_above_min_in_out_is_refused_naming_the_layer_and_the_model_is_unchanged():
    model = tiny_llama()  # k_proj is 16 -> 8
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"k_proj.*rank \(r1\) 9 is above min\(in, out\) = 8.*truncated SVD"
    ):
        lx.adapt_(model, lx.config("abba", rank=9), ["q_proj", "k_proj"])
    assert_unchanged(model, before)


@pytest.mark.parametrize("bad", [{"rank2": 0}, {"rank": 0}, {"dropout": -0.1}, {"alpha": 0}])
def test_bad_config_values_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        lx.config("abba", **bad)


# ----------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize(
    ("factory", "targets", "kwargs"),
    [
        (
            tiny_llama,
            ["embed_tokens", "q_proj", "v_proj", "down_proj"],
            {"rank_pattern": {"down_proj": 3}},
        ),
        (tiny_gpt2, ["c_attn", "c_fc"], {"alpha_pattern": {"c_fc": 2.0}}),
    ],
)
def test_native_save_and_load_are_exact(factory, targets, kwargs, tmp_path: Path):
    model = lx.adapt_(factory(), lx.config("abba", rank=2, rank2=3, alpha=4.0), targets, **kwargs)
    randomize(model)
    lx.save_adapter(model, tmp_path)  # auto: ABBA has no PEFT form, so native
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["format"], config["method"]) == ("loraredux", "abba")

    loaded = lx.load_adapter(factory(), tmp_path)

    assert_same_adapter(loaded, model)
    assert not torch.allclose(logits(factory()), logits(loaded))


def test_peft_format_is_refused():
    model = lx.adapt_(tiny_llama(), lx.config("abba", rank=2), ["q_proj"])
    with pytest.raises(ValueError, match="no PEFT form"):
        lx.save_adapter(model, "/nonexistent/never/written", format="peft")
