"""KronA's own identities (Edalati et al., arXiv 2212.10650): ΔW = s (A ⊗ B), the Kronecker-vector product without the
dense matrix, rank(A ⊗ B) = rank(A) rank(B), the factor-shape constraint, and native save / load (PEFT has no KronA).
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
from loraredux.adapters.krona import KronA, balanced_factor, kron_matvec
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


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@given(
    a_out=st.integers(1, 4),
    a_in=st.integers(1, 4),
    b_out=st.integers(1, 4),
    b_in=st.integers(1, 4),
    tokens=st.integers(1, 3),
)
def test_kronecker_vector_product_without_the_dense_matrix(a_out, a_in, b_out, b_in, tokens):
    """(A ⊗ B) x = vec(A X B^T) (row-major X = x as (a_in, b_in)), against torch.kron and against the entry formula
    (A ⊗ B)[i1 b_out + i2, j1 b_in + j2] = A[i1, j1] B[i2, j2] written out by hand."""
    g = torch.Generator().manual_seed(a_out * 1000 + a_in * 100 + b_out * 10 + b_in)
    A = torch.randn(a_out, a_in, generator=g, dtype=F64)
    B = torch.randn(b_out, b_in, generator=g, dtype=F64)
    x = torch.randn(tokens, a_in * b_in, generator=g, dtype=F64)
    K = torch.empty(a_out * b_out, a_in * b_in, dtype=F64)
    for i1 in range(a_out):
        for i2 in range(b_out):
            for j1 in range(a_in):
                for j2 in range(b_in):
                    K[i1 * b_out + i2, j1 * b_in + j2] = A[i1, j1] * B[i2, j2]
    torch.testing.assert_close(torch.kron(A, B), K, rtol=0, atol=0)
    torch.testing.assert_close(kron_matvec(A, B, x), x @ K.T, rtol=1e-12, atol=1e-12)
    # The column-major statement of the same identity: (A ⊗ B) vec_c(X') = vec_c(B X' A^T) with X' = X^T.
    Xc = x[0].reshape(a_in, b_in).T  # (b_in, a_in), column-major vec of this is x[0]
    torch.testing.assert_close((B @ Xc @ A.T).T.reshape(-1), K @ x[0], rtol=1e-12, atol=1e-12)


@given(
    n_in=st.integers(1, 12),
    n_out=st.integers(1, 12),
    data=st.data(),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    bias=st.booleans(),
)
def test_fast_path_equals_the_definition_for_all_shapes(n_in, n_out, data, lead, bias):
    a_out = data.draw(st.sampled_from(divisors(n_out)))
    a_in = data.draw(st.sampled_from(divisors(n_in)))
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out, bias=bias).double()
    a = randomized(KronA(base, lx.config("krona", a_out=a_out, a_in=a_in, scale=0.7)))
    assert a.A.shape == (a_out, a_in) and a.B.shape == (n_out // a_out, n_in // a_in)
    x = torch.randn(*lead, n_in, dtype=F64)
    W = base.weight + 0.7 * torch.kron(a.A, a.B)
    torch.testing.assert_close(a(x), x @ W.T + (base.bias if bias else 0), rtol=1e-10, atol=1e-10)


@given(
    shapes=st.tuples(*[st.integers(1, 4)] * 4),
    ranks=st.tuples(st.integers(1, 4), st.integers(1, 4)),
)
def test_rank_of_a_kronecker_product_is_the_product_of_ranks(shapes, ranks):
    a_out, a_in, b_out, b_in = shapes
    ra, rb = min(ranks[0], a_out, a_in), min(ranks[1], b_out, b_in)
    g = torch.Generator().manual_seed(sum(shapes) * 10 + ra + rb)

    def lowrank(m: int, n: int, r: int) -> torch.Tensor:
        return torch.randn(m, r, generator=g, dtype=F64) @ torch.randn(r, n, generator=g, dtype=F64)

    base = nn.Linear(a_in * b_in, a_out * b_out).double()
    a = KronA(base, lx.config("krona", a_out=a_out, a_in=a_in))
    with torch.no_grad():
        a.A.copy_(lowrank(a_out, a_in, ra))
        a.B.copy_(lowrank(b_out, b_in, rb))
    assert numerical_rank(a.delta_weight()) == ra * rb


def test_rank_at_loras_parameter_budget():
    """What KronA reaches: on a 36 x 36 layer LoRA's smallest budget, r = 1, is 72 numbers and rank 1; KronA with
    6 x 6 factors (the default balanced shape) trains the same 72 numbers and reaches full rank 36."""
    torch.manual_seed(0)
    krona = randomized(KronA(nn.Linear(36, 36).double(), lx.config("krona")))
    lora = lx.LoRA(nn.Linear(36, 36).double(), lx.config("lora", rank=1))
    with torch.no_grad():
        lora.B.normal_()
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert krona.A.shape == krona.B.shape == (6, 6)
    assert count(krona) == count(lora) == 72
    assert numerical_rank(lora.delta_weight()) == 1
    assert numerical_rank(krona.delta_weight()) == 36


@pytest.mark.parametrize(
    ("n_in", "n_out", "a_out", "a_in", "expected"),
    [
        (8, 7, None, None, 1 * 2 + 7 * 4),  # out 7 is prime: A (1, 2), B (7, 4)
        (768, 768, None, None, 24 * 24 + 32 * 32),  # 768 = 24 * 32 both ways
        (12, 6, 3, 4, 3 * 4 + 2 * 3),
    ],
)
def test_parameter_count_is_a_out_a_in_plus_b_out_b_in(n_in, n_out, a_out, a_in, expected):
    a = KronA(nn.Linear(n_in, n_out), lx.config("krona", a_out=a_out, a_in=a_in))
    own = sum(p.numel() for p in a.parameters() if p.requires_grad)
    assert own == expected == a.config.parameter_count(n_in, n_out)


@pytest.mark.parametrize(
    ("n", "factor"), [(1, 1), (7, 1), (8, 2), (12, 3), (36, 6), (768, 24), (4096, 64)]
)
def test_balanced_factor_is_the_largest_divisor_up_to_the_square_root(n, factor):
    assert balanced_factor(n) == factor
    assert n % factor == 0 and factor <= math.isqrt(n)


def test_init_a_kaiming_b_zero_so_w_prime_is_w0():
    torch.manual_seed(0)
    base = nn.Linear(400, 300).double()
    a = KronA(base, lx.config("krona", a_out=15, a_in=20))
    bound = 1 / math.sqrt(20)  # kaiming_uniform with a = sqrt(5), fan_in = a_in
    assert 0.9 * bound < a.A.abs().max() <= bound
    assert torch.count_nonzero(a.B) == 0
    assert torch.equal(a.effective_weight(), base.weight)


def test_embedding_gathers_columns_of_the_kronecker_product():
    torch.manual_seed(0)
    emb = nn.Embedding(12, 6, padding_idx=0).double()
    a = randomized(KronA(emb, lx.config("krona", a_out=2, a_in=3, scale=1.5)))  # W0 is (6, 12)
    ids = torch.tensor([[0, 3, 11], [5, 5, 1]])
    table = emb.weight + 1.5 * torch.kron(a.A, a.B).T  # (num_embeddings, dim)
    torch.testing.assert_close(a(ids), table[ids], rtol=1e-12, atol=1e-12)


def test_conv1d_uses_the_transposed_weight():
    conv = Conv1D(6, 4).double()  # weight (in=4, out=6)
    torch.nn.init.normal_(conv.bias)
    a = randomized(KronA(conv, lx.config("krona", a_out=3, a_in=2)))
    x = torch.randn(3, 4, dtype=F64)
    W = conv.weight + torch.kron(a.A, a.B).T  # (in, out)
    torch.testing.assert_close(a(x), x @ W + conv.bias)
    assert isinstance(a.merged(), Conv1D)


def test_dropout_acts_on_the_adapter_input_only():
    base = nn.Linear(10, 4).double()
    a = randomized(KronA(base, lx.config("krona", dropout=0.5)))
    x = torch.randn(8, 10, dtype=F64)
    a.train()
    torch.manual_seed(5)
    y = a(x)
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(y, base(x) + dropped @ a.delta_weight().T)


def test_factor_that_does_not_divide_is_refused_naming_layer_and_constraint():
    model = tiny_llama()  # k_proj is 16 -> 8, q_proj 16 -> 16
    before = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"q_proj.*a_out=3 does not divide out=16: KronA needs A ⊗ B of shape \(out, in\)",
    ):
        lx.adapt_(model, lx.config("krona", a_out=3), ["q_proj"])
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "bad", [{"a_out": 0}, {"a_in": 2.5}, {"scale": float("nan")}, {"dropout": 1.0}]
)
def test_bad_config_values_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        lx.config("krona", **bad)


# ----------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize(
    ("factory", "targets", "fields"),
    [
        (tiny_llama, ["embed_tokens", "q_proj", "v_proj", "down_proj"], {"scale": 2.0}),
        (tiny_gpt2, "all-linear", {"a_in": 4}),
    ],
)
def test_native_save_and_load_are_exact(factory, targets, fields, tmp_path: Path):
    model = lx.adapt_(factory(), lx.config("krona", **fields), targets)
    randomize(model)
    lx.save_adapter(model, tmp_path)  # auto: KronA has no PEFT form, so native
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["format"], config["method"]) == ("loraredux", "krona")

    loaded = lx.load_adapter(factory(), tmp_path)

    assert_same_adapter(loaded, model)
    assert not torch.allclose(logits(factory()), logits(loaded))
