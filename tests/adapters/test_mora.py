"""MoRA's own identities (Jiang et al., arXiv 2405.12130): the square size, the operators against an independent
transcription, the rotation matrices, the closed-form merge, the rank reached at LoRA's budget and native files."""

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
from loraredux.adapters.mora import MoRA, rope_tables, rotate, square_size
from tiny_models import (
    assert_same_adapter,
    assert_unchanged,
    logits,
    randomize,
    snapshot,
    tiny_gpt2,
    tiny_llama,
)

KINDS = ["truncation", "sharing", "rotation"]
F64 = torch.float64


# ----------------------------------------------------------------------------- independent transcription
# One vector at a time, index by index, as the paper and the authors' code describe the operators.


def ref_padded(x: torch.Tensor, r_hat: int) -> torch.Tensor:
    """x̃ (n r̂,): x padded cyclically to whole chunks, x̃_m = x_{m mod k}."""
    k = x.shape[0]
    n = -(-k // r_hat)
    return torch.stack([x[m % k] for m in range(n * r_hat)])


def ref_rotation(c: int, size: int) -> torch.Tensor:
    """RoPE's rotation at position c: 2x2 blocks on the pairs (j, j + size // 2), angle c * 10000^(-2j/size)."""
    R = torch.eye(size, dtype=F64)
    h = size // 2
    for j in range(h):
        t = c * 10000.0 ** (-2.0 * j / size)
        R[j, j], R[j, j + h] = math.cos(t), -math.sin(t)
        R[j + h, j], R[j + h, j + h] = math.sin(t), math.cos(t)
    return R


def ref_compress(kind: str, x: torch.Tensor, r_hat: int) -> torch.Tensor:
    if kind == "truncation":
        return x[:r_hat].clone()
    xt = ref_padded(x, r_hat)
    if kind == "sharing":
        s = torch.zeros(r_hat, dtype=F64)
        for m in range(xt.shape[0]):
            s[m % r_hat] += xt[m]
        return s
    n = xt.shape[0] // r_hat
    return torch.stack([ref_rotation(c, r_hat) @ xt[c * r_hat : (c + 1) * r_hat] for c in range(n)])


def ref_decompress(kind: str, y: torch.Tensor, d: int) -> torch.Tensor:
    flat = y.reshape(-1)
    out = torch.zeros(d, dtype=F64)
    for o in range(d):
        if kind == "truncation":
            out[o] = flat[o] if o < flat.shape[0] else 0.0
        else:  # sharing repeats z, rotation repeats (or cuts) the concatenated chunk outputs
            out[o] = flat[o % flat.shape[0]]
    return out


def ref_update(kind: str, M: torch.Tensor, x: torch.Tensor, d: int) -> torch.Tensor:
    """f_decomp(M f_comp(x)) for one vector; for rotation M acts on every chunk."""
    z = ref_compress(kind, x, M.shape[0])
    return ref_decompress(kind, z @ M.T, d)


# ----------------------------------------------------------------------------- helpers


def fitting_rank(k: int, d: int) -> int:
    """The largest LoRA rank whose square size fits min(d, k)."""
    return ((min(d, k) + 1) ** 2 - 1) // (d + k)


def mora(k: int, d: int, rank: int, kind: str, seed: int = 0, bias: bool = True) -> MoRA:
    torch.manual_seed(seed)
    base = nn.Linear(k, d, bias=bias).to(F64)
    a = MoRA(base, lx.config("mora", rank=rank, compress=kind))
    with torch.no_grad():
        a.M.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return a


shapes = st.tuples(st.integers(1, 14), st.integers(1, 14)).filter(lambda s: fitting_rank(*s) >= 1)


# ----------------------------------------------------------------------------- square size and budget


@given(shape=shapes, data=st.data())
def test_square_size_is_the_floor_of_lora_budget(shape, data):
    k, d = shape
    r = data.draw(st.integers(1, fitting_rank(k, d)))
    r_hat = square_size(k, d, r)
    assert (
        r_hat**2 <= (d + k) * r < (r_hat + 1) ** 2
    )  # r̂ = ⌊√((d + k) r)⌋, never above LoRA's budget
    a = MoRA(nn.Linear(k, d), lx.config("mora", rank=r))
    trainable = [p for p in a.parameters() if p.requires_grad]
    assert [tuple(p.shape) for p in trainable] == [(r_hat, r_hat)]  # one square M, nothing else
    assert a.square_size == r_hat == a.config.square_size(k, d)
    assert a.config.parameter_count(k, d) == r_hat**2 == sum(p.numel() for p in trainable)


def test_square_size_examples():
    assert (
        square_size(4096, 4096, 8) == 256
    )  # LLaMA attention at r = 8: 65,536 = LoRA's 2 * 4096 * 8
    # LLaMA's MLP at r = 8: the floor gives 347; the authors' round-to-nearest would give 348, whose
    # 348^2 = 121,104 exceeds LoRA's (4096 + 11008) * 8 = 120,832.
    assert square_size(4096, 11008, 8) == 347 and 348**2 > (4096 + 11008) * 8 >= 347**2


def test_defaults_are_the_authors_small_rank_choice_and_start_at_identity():
    config = lx.config("mora")
    assert (config.rank, config.compress, config.dropout) == (8, "rotation", 0.0)
    assert config.base_kinds == ("linear", "conv1d")
    base = nn.Linear(40, 30).double()
    a = MoRA(base, lx.config("mora", rank=2))
    assert torch.count_nonzero(a.M) == 0
    x = torch.randn(3, 40, dtype=F64)
    torch.testing.assert_close(a(x), base(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- operators vs transcription


@pytest.mark.parametrize("kind", KINDS)
@given(shape=shapes, data=st.data())
def test_each_compressor_matches_the_transcription(kind, shape, data):
    k, d = shape
    a = mora(k, d, data.draw(st.integers(1, fitting_rank(k, d))), kind)
    x = torch.randn(4, k, dtype=F64)
    z = a.compress(x)
    for t in range(4):
        expected = ref_compress(kind, x[t], a.square_size)
        if kind == "rotation":  # chunks whose outputs f_decomp cuts (past ⌈d / r̂⌉) are not computed
            assert z.shape[1] == min(expected.shape[0], -(-d // a.square_size))
            expected = expected[: z.shape[1]]
        torch.testing.assert_close(z[t], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@given(shape=shapes, data=st.data())
def test_each_decompressor_matches_the_transcription(kind, shape, data):
    k, d = shape
    a = mora(k, d, data.draw(st.integers(1, fitting_rank(k, d))), kind)
    z = torch.randn(4, *a.compress(torch.zeros(1, k, dtype=F64)).shape[1:], dtype=F64)
    out = a.decompress(z)
    for t in range(4):
        torch.testing.assert_close(out[t], ref_decompress(kind, z[t], d), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@given(
    shape=shapes,
    data=st.data(),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    bias=st.booleans(),
)
def test_forward_is_the_paper_equation(kind, shape, data, lead, bias):
    k, d = shape
    a = mora(k, d, data.draw(st.integers(1, fitting_rank(k, d))), kind, bias=bias)
    x = torch.randn(*lead, k, dtype=F64)
    rows = x.reshape(-1, k)
    expected = torch.stack([ref_update(kind, a.M.detach(), v, d) for v in rows]) + a.base(rows)
    torch.testing.assert_close(a(x), expected.reshape(*lead, d), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@given(shape=shapes, data=st.data())
def test_closed_form_update_equals_the_identity_pushed_through_the_fast_path(kind, shape, data):
    k, d = shape
    a = mora(k, d, data.draw(st.integers(1, fitting_rank(k, d))), kind)
    eye = torch.eye(k, dtype=F64)
    pushed = (a(eye) - a.base(eye)).T  # column j = update of e_j
    torch.testing.assert_close(a.delta_weight(), pushed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.effective_weight(), a.base.weight + pushed, rtol=1e-12, atol=1e-12)


def test_truncation_update_is_M_in_the_corner():
    a = mora(9, 7, 2, "truncation")  # r̂ = 5
    dW = a.delta_weight()
    torch.testing.assert_close(dW[:5, :5], a.M.detach(), rtol=0, atol=0)
    assert torch.count_nonzero(dW[5:]) == 0 and torch.count_nonzero(dW[:, 5:]) == 0


# ----------------------------------------------------------------------------- rotation matrices


@pytest.mark.parametrize(("chunks", "size"), [(4, 6), (3, 7), (5, 2), (2, 1)])
def test_rotation_matrices_are_orthogonal_distinct_rope_blocks(chunks, size):
    cos, sin = rope_tables(chunks, size)
    eye = torch.eye(size, dtype=F64)
    # rotate() acts on rows, so rotating the rows of I gives R_c^T.
    R = torch.stack([rotate(eye, cos[c], sin[c]).T for c in range(chunks)])
    for c in range(chunks):
        torch.testing.assert_close(R[c].T @ R[c], eye, rtol=0, atol=1e-14)
        torch.testing.assert_close(torch.linalg.det(R[c]), torch.tensor(1.0, dtype=F64))
        torch.testing.assert_close(R[c], ref_rotation(c, size), rtol=0, atol=1e-14)
    torch.testing.assert_close(
        R[0], eye, rtol=0, atol=0
    )  # position 0 is not rotated (authors' t = 0..n-1)
    if size % 2:  # an odd size leaves its last coordinate fixed
        torch.testing.assert_close(R[:, -1, -1], torch.ones(chunks, dtype=F64), rtol=0, atol=0)
    if size > 1:  # the rotations tell the chunks apart
        for c in range(chunks):
            for e in range(c):
                assert (R[c] - R[e]).abs().max() > 1e-3


def test_rotated_chunks_are_rotations_of_the_padded_input():
    a = mora(11, 9, 2, "rotation")  # r̂ = 6, n = 2, pad = 1
    x = torch.randn(11, dtype=F64)
    chunks = ref_padded(x, 6).reshape(2, 6)
    torch.testing.assert_close(a.compress(x[None])[0].norm(dim=-1), chunks.norm(dim=-1))


# ----------------------------------------------------------------------------- rank at LoRA's budget


@pytest.mark.parametrize(
    ("d", "k", "r"), [(48, 48, 2), (40, 64, 2), (64, 40, 2), (30, 30, 1), (60, 36, 3)]
)
def test_rank_at_lora_budget_exceeds_lora_rank(d, k, r):
    """At LoRA's parameter count, LoRA's update has rank r; MoRA's reaches r̂ (truncation, sharing) and
    min(d, k) (rotation: a block diagonal of full-rank blocks, cut to d rows and folded to k columns)."""
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(d, r, generator=g, dtype=F64), torch.randn(r, k, generator=g, dtype=F64)
    assert torch.linalg.matrix_rank(B @ A) == r
    ranks = {}
    for kind in KINDS:
        a = mora(k, d, r, kind)
        assert a.M.numel() <= r * (d + k)
        ranks[kind] = int(torch.linalg.matrix_rank(a.delta_weight()))
    r_hat = square_size(k, d, r)
    assert r < r_hat < min(d, k)
    assert ranks == {"truncation": r_hat, "sharing": r_hat, "rotation": min(d, k)}


def test_rotation_tells_the_diagonal_blocks_apart():
    """Block c of ΔW is M R_c; decoupling alone (every R_c = I, paper Eq. 8) repeats M on the diagonal."""
    a = mora(24, 24, 2, "rotation")  # r̂ = ⌊√96⌋ = 9, n = 3, pad = 3
    M, dW = a.M.detach(), a.delta_weight().detach()
    torch.testing.assert_close(dW[:9, :9], M, rtol=0, atol=1e-14)  # R_0 = I
    torch.testing.assert_close(dW[9:18, 9:18], M @ ref_rotation(1, 9), rtol=0, atol=1e-14)
    assert (dW[9:18, 9:18] - M).abs().max() > 1e-2
    with torch.no_grad():
        a.cos.fill_(1.0)
        a.sin.zero_()
    dW = a.delta_weight().detach()
    torch.testing.assert_close(dW[9:18, 9:18], M, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["truncation", "sharing"])
@given(shape=shapes, data=st.data())
def test_truncation_and_sharing_rank_is_at_most_r_hat(kind, shape, data):
    k, d = shape
    a = mora(k, d, data.draw(st.integers(1, fitting_rank(k, d))), kind)
    assert torch.linalg.matrix_rank(a.delta_weight()) <= a.square_size


# ----------------------------------------------------------------------------- training, merge, layers


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_of_M_is_the_gradient_through_the_dense_spec(kind):
    a = mora(13, 10, 2, kind)
    x = torch.randn(5, 13, dtype=F64)
    a(x).square().sum().backward()
    fast = a.M.grad.clone()
    a.M.grad = None
    F.linear(x, a.effective_weight(), a.base.bias).square().sum().backward()
    torch.testing.assert_close(fast, a.M.grad, rtol=1e-10, atol=1e-10)
    assert a.base.weight.grad is None


def test_dropout_acts_on_the_adapter_input_only():
    base = nn.Linear(12, 9).double()
    a = MoRA(base, lx.config("mora", rank=2, dropout=0.5))
    with torch.no_grad():
        a.M.normal_()
    x = torch.randn(6, 12, dtype=F64)
    a.train()
    torch.manual_seed(5)
    y = a(x)
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(y, base(x) + dropped @ a.delta_weight().T)
    a.eval()
    torch.testing.assert_close(a(x), F.linear(x, a.effective_weight(), base.bias))


@pytest.mark.parametrize("kind", KINDS)
def test_conv1d_uses_the_transposed_weight(kind):
    conv = Conv1D(9, 11).double()  # weight (in=11, out=9)
    nn.init.normal_(conv.bias)
    a = MoRA(conv, lx.config("mora", rank=2, compress=kind))
    with torch.no_grad():
        a.M.normal_()
    x = torch.randn(2, 3, 11, dtype=F64)
    expected = x @ (conv.weight + a.delta_weight().T) + conv.bias
    torch.testing.assert_close(a(x), expected, rtol=1e-12, atol=1e-12)
    merged = a.merged()
    assert isinstance(merged, Conv1D) and merged.weight.shape == (11, 9)
    torch.testing.assert_close(merged(x), expected, rtol=1e-12, atol=1e-12)


@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_merge_equivalence(kind):
    model = lx.adapt_(
        tiny_llama(), lx.config("mora", rank=2, compress=kind), ["q_proj", "v_proj", "down_proj"]
    )
    randomize(model)
    expected = logits(model)
    lx.merge_(model)
    assert not list(lx.adapters(model))
    torch.testing.assert_close(logits(model), expected, rtol=1e-10, atol=1e-10)


SAVES = {
    "llama-rank-pattern": (
        tiny_llama,
        {"targets": ["q_proj", "v_proj", "down_proj"], "rank_pattern": {"down_proj": 1}},
    ),
    "gpt2-conv1d": (tiny_gpt2, {"targets": "all-linear"}),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(SAVES))
def test_native_save_and_load_are_exact(kind, name, tmp_path: Path):
    factory, kwargs = SAVES[name]
    model = lx.adapt_(factory(), lx.config("mora", rank=2, compress=kind), **kwargs)
    randomize(model)
    lx.save_adapter(model, tmp_path)  # PEFT has no MoRA: auto picks loraredux's own format
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (fields["format"], fields["method"], fields["config"]["compress"]) == (
        "loraredux",
        "mora",
        kind,
    )
    loaded = lx.load_adapter(factory(), tmp_path)
    assert all(k.endswith(".M") for k in lx.adapter_state_dict(model))  # cos/sin are rebuilt
    assert_same_adapter(loaded, model)
    assert not torch.allclose(logits(factory()), logits(loaded))


# ----------------------------------------------------------------------------- bad input


def test_a_square_size_above_the_layer_is_refused_and_the_model_is_unchanged():
    model = tiny_llama()
    before = snapshot(model)
    # v_proj is 16 -> 8: rank 4 gives r̂ = ⌊√(24 * 4)⌋ = 9 > 8; rank 3 gives 8.
    with pytest.raises(ValueError) as err:
        lx.adapt_(model, lx.config("mora", rank=4), ["q_proj", "v_proj"])
    message = str(err.value)
    for part in (
        "model.layers.0.self_attn.v_proj",
        "r_hat",
        "= 9",
        "rank 4",
        "min(in, out) = 8",
        "rank <= 3",
    ):
        assert part in message, (part, message)
    assert_unchanged(model, before)
    lx.adapt_(model, lx.config("mora", rank=3), ["v_proj"])  # the suggested rank fits


def test_an_embedding_is_refused_and_the_model_is_unchanged():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(TypeError, match="linear, conv1d"):
        lx.adapt_(model, lx.config("mora", rank=2), ["embed_tokens", "q_proj"])
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"compress": "decoupling"}, "compress must be one of"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"rank": 0}, "rank must be an integer"),
        ({"alpha": 2.0}, "has no field"),
    ],
)
def test_bad_config_values(fields, match):
    with pytest.raises(ValueError, match=match):
        lx.config("mora", **fields)
