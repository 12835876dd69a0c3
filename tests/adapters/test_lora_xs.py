"""LoRA-XS's own identities (Bałazy et al., arXiv 2405.17604): frozen truncated-SVD factors, an r x r core, r^2
parameters, the rank it reaches at LoRA's budget, bad shapes, and an exact native save/load."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraredux as lx
from loraredux.adapters import LoRAXS, LoRAXSConfig
from loraredux.adapters.lora_xs import top_singular_factors
from tiny_models import (
    assert_same_adapter,
    assert_unchanged,
    logits,
    randomized,
    snapshot,
    tiny_llama,
)


def test_frozen_factors_are_the_truncated_svd_with_sigma_on_the_input_side():
    torch.manual_seed(0)
    W0 = torch.randn(9, 12, dtype=torch.float64)
    A, B = top_singular_factors(W0, 4)
    U, S, Vt = np.linalg.svd(W0.numpy(), full_matrices=False)  # independent transcription
    best = U[:, :4] @ np.diag(S[:4]) @ Vt[:4]  # Eckart-Young: the best rank-4 approximation
    np.testing.assert_allclose((B @ A).numpy(), best, atol=1e-12)
    torch.testing.assert_close(B.T @ B, torch.eye(4, dtype=torch.float64))  # B = U_r, orthonormal
    # A = Σ_r V_r^T: orthogonal rows whose norms are the singular values (signs are not unique).
    torch.testing.assert_close(A @ A.T, torch.diag(torch.tensor(S[:4] ** 2)))


@given(
    n_in=st.integers(1, 10),
    n_out=st.integers(1, 10),
    data=st.data(),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    bias=st.booleans(),
)
def test_update_is_scaled_B_R_A_and_fast_path_agrees_for_all_shapes(n_in, n_out, data, lead, bias):
    r = data.draw(st.integers(1, min(n_in, n_out)))
    alpha = data.draw(st.sampled_from([1.0, 3.0, 16.0]))
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out, bias=bias).double()
    a = randomized(LoRAXS(base, lx.config("lora_xs", rank=r, alpha=alpha)))
    U, S, Vh = torch.linalg.svd(base.weight.detach(), full_matrices=False)
    # Up to the signs of the singular vectors, which the stored buffers fix: compare through them.
    signs = torch.sign((U[:, :r] * a.B).sum(0))
    torch.testing.assert_close(a.B, U[:, :r] * signs)
    torch.testing.assert_close(a.A, signs[:, None] * S[:r, None] * Vh[:r])
    expected_W = base.weight + (alpha / r) * a.B @ a.R @ a.A
    torch.testing.assert_close(a.effective_weight(), expected_W, rtol=1e-12, atol=1e-12)
    x = torch.randn(*lead, n_in, dtype=torch.float64)
    torch.testing.assert_close(
        a(x), x @ expected_W.T + (base.bias if bias else 0), rtol=1e-10, atol=1e-10
    )
    assert torch.linalg.matrix_rank(a.delta_weight()) <= r


def test_only_the_core_trains_and_the_count_is_r_squared_whatever_the_width():
    for n_in, n_out in [(16, 16), (64, 24), (300, 200)]:
        a = LoRAXS(nn.Linear(n_in, n_out), lx.config("lora_xs", rank=6))
        trainable = {n: p.numel() for n, p in a.named_parameters() if p.requires_grad}
        assert trainable == {"R": 36}
        assert a.config.parameter_count(n_in, n_out) == 36
        assert {n for n, _ in a.named_buffers()} == {"A", "B"}


def test_core_starts_as_the_authors_small_gaussian():
    torch.manual_seed(0)
    a = LoRAXS(nn.Linear(200, 150).double(), lx.config("lora_xs", rank=64))
    torch.testing.assert_close(a.R.std().item(), 1e-5, rtol=0.03, atol=0)
    assert 0 < a.delta_weight().abs().max() < 1e-3  # not W0, but close (identity_at_init is False)
    assert not LoRAXSConfig.identity_at_init
    exact = LoRAXS(nn.Linear(20, 15).double(), lx.config("lora_xs", rank=4, init_std=0.0))
    assert torch.count_nonzero(exact.R) == 0
    torch.testing.assert_close(exact.effective_weight(), exact.base.weight, rtol=0, atol=0)


def test_reaches_rank_sqrt_budget_where_lora_reaches_one():
    """At LoRA's rank-1 budget (in + out numbers) LoRA-XS can afford r = floor(sqrt(in + out))."""
    n_in, n_out = 40, 24
    budget = lx.config("lora", rank=1).parameter_count(n_in, n_out)
    r = math.isqrt(budget)
    torch.manual_seed(0)
    a = randomized(LoRAXS(nn.Linear(n_in, n_out).double(), lx.config("lora_xs", rank=r)))
    assert a.config.parameter_count(n_in, n_out) <= budget
    assert r == 8 and torch.linalg.matrix_rank(a.delta_weight()) == r


def test_gradient_reaches_only_R_by_the_chain_rule():
    base = nn.Linear(7, 5).double()
    a = randomized(LoRAXS(base, lx.config("lora_xs", rank=3, alpha=6)))
    x = torch.randn(4, 7, dtype=torch.float64)
    y = a(x)
    y.square().sum().backward()
    G = 2 * y.detach()  # dL/dy
    torch.testing.assert_close(a.R.grad, a.scale * a.B.T @ G.T @ x @ a.A.T)
    assert a.A.grad is None and a.B.grad is None and base.weight.grad is None


def test_conv1d_and_embedding_use_their_own_orientation():
    conv = Conv1D(5, 7).double()  # weight (in=7, out=5)
    torch.nn.init.normal_(conv.bias)
    a = randomized(LoRAXS(conv, lx.config("lora_xs", rank=3)))
    torch.testing.assert_close(a.B @ a.A, top_singular_factors(conv.weight.T, 3)[1] @ a.A)
    x = torch.randn(2, 7, dtype=torch.float64)
    torch.testing.assert_close(a(x), x @ (conv.weight + (a.scale * a.B @ a.R @ a.A).T) + conv.bias)

    emb = nn.Embedding(11, 6).double()
    e = randomized(LoRAXS(emb, lx.config("lora_xs", rank=4, alpha=2)))
    ids = torch.tensor([[0, 3, 10], [5, 5, 1]])
    table = emb.weight + 0.5 * (e.B @ e.R @ e.A).T  # (num_embeddings, dim)
    torch.testing.assert_close(e(ids), table[ids], rtol=1e-12, atol=1e-12)


def test_rank_above_the_svd_names_the_layer_and_leaves_the_model_unchanged():
    model = tiny_llama()  # q_proj 16 -> 16, v_proj 16 -> 8
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"v_proj.*rank 9 needs r <= min\(in, out\) = 8"):
        lx.adapt_(model, lx.config("lora_xs", rank=9), ["q_proj", "v_proj"])
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="init_std"):
        lx.config("lora_xs", init_std=-1.0)


def test_native_save_and_load_restore_the_frozen_factors_exactly(tmp_path):
    model = lx.adapt_(tiny_llama(), lx.config("lora_xs", rank=4, alpha=8), ["q_proj", "v_proj"])
    with torch.no_grad():
        for _, a in lx.adapters(model):
            randomized(a, seed=3)
            # Another valid SVD of the same W0 (signs flipped in pairs): only the file can restore it.
            a.B[:, 0].neg_()
            a.A[0].neg_()
    assert lx.save_adapter(model, tmp_path) == tmp_path  # "auto": LoRA-XS has no PEFT form
    assert '"format": "loraredux"' in (tmp_path / "adapter_config.json").read_text()
    loaded = lx.load_adapter(tiny_llama(), tmp_path)
    assert any(k.endswith(".A") for k in lx.adapter_state_dict(model))
    assert_same_adapter(loaded, model)
    with torch.no_grad():
        fresh = lx.adapt_(tiny_llama(), lx.config("lora_xs", rank=4, alpha=8), ["q_proj", "v_proj"])
        for (_, a), (_, f) in zip(lx.adapters(loaded), lx.adapters(fresh), strict=True):
            f.R.copy_(a.R)  # same core, recomputed factors: the flipped signs change the output
        assert not torch.allclose(logits(fresh), logits(model))
