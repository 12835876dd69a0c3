"""LoKr's own identities (Yeh et al., arXiv 2309.14859, LoKr) and parity with PEFT's LoKr.

The definition transcribed here independently of the layer: dW[i1 out2 + i2, j1 in2 + j2] = s W1[i1, j1] W2[i2, j2]
with s = alpha / r, and PEFT's rule for the shapes (`peft/tuners/lokr/layer.py`).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from peft.tuners.lokr import layer as peft_lokr
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraredux as lx
from loraredux.adapters import LoKr, LoKrConfig
from loraredux.adapters.lokr import factorization, kron_apply, kron_lookup
from tiny_models import (
    assert_unchanged,
    logits,
    randomize,
    randomized,
    snapshot,
    tiny_gpt2,
    tiny_llama,
)


def kron_by_index(W1: torch.Tensor, W2: torch.Tensor) -> torch.Tensor:
    """W1 ⊗ W2 entry by entry."""
    (o1, i1), (o2, i2) = W1.shape, W2.shape
    K = torch.empty(o1 * o2, i1 * i2, dtype=W1.dtype)
    for a in range(o1):
        for b in range(i1):
            K[a * o2 : (a + 1) * o2, b * i2 : (b + 1) * i2] = W1[a, b] * W2
    return K


def factors(a: LoKr) -> tuple[torch.Tensor, torch.Tensor]:
    t = a.peft_tensors()
    W1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    W2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    return W1, W2


def definition(a: LoKr) -> torch.Tensor:
    W1, W2 = factors(a)
    return a.config.alpha / a.config.rank * kron_by_index(W1, W2)


# ------------------------------------------------------------------------------------------- shapes


@pytest.mark.parity
def test_factorization_is_peft_rule():
    for n in range(1, 400):
        assert factorization(n) == peft_lokr.factorization(n, -1), n
        m = factorization(n)[0]
        assert n % m == 0 and m <= math.isqrt(n) and m * m <= n
        for f in (f for f in range(1, n + 1) if n % f == 0):
            assert factorization(n, f) == peft_lokr.factorization(n, f) == (f, n // f)


def test_factorization_refuses_a_factor_that_does_not_divide():
    with pytest.raises(ValueError, match="decompose_factor 5 does not divide the size 12"):
        factorization(12, 5)


LAYOUTS = [
    # (in, out, r, decompose_both, decompose_factor)
    (16, 16, 1, False, -1),
    (16, 16, 2, False, -1),  # r = max(4, 4) / 2: W2 is full
    (32, 16, 3, True, -1),
    (32, 16, 1, True, -1),  # W1 (4 x 4) decomposed too
    (12, 18, 2, True, 3),
    (64, 8, 4, False, 8),
    (13, 7, 2, False, -1),  # primes: (1, 13) and (1, 7)
    (24, 40, 8, True, 2),
    (30, 45, 1, True, 5),
]


@pytest.mark.parity
@pytest.mark.parametrize(("n_in", "n_out", "rank", "both", "factor"), LAYOUTS)
def test_factor_shapes_and_names_are_peft(n_in, n_out, rank, both, factor):
    """Which factors are full or decomposed, and their shapes, as PEFT's rule makes them."""
    config = peft.LoKrConfig(r=rank, decompose_both=both, decompose_factor=factor)
    ref = peft_lokr.Linear(nn.Linear(n_in, n_out), "default", config=config, r=rank, alpha=8)
    expected = {
        name: tuple(getattr(ref, name)["default"].shape)
        for name in ref.adapter_layer_names
        if "default" in getattr(ref, name)
    }
    cfg = lx.config("lokr", rank=rank, decompose_both=both, decompose_factor=factor)
    ours = LoKr(nn.Linear(n_in, n_out), cfg)
    assert {k: tuple(v.shape) for k, v in ours.peft_tensors().items()} == expected
    own = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert own == cfg.parameter_count(n_in, n_out) == sum(math.prod(s) for s in expected.values())


# ------------------------------------------------------------------------------------------- the equation


def test_effective_weight_is_the_kronecker_product_scaled_by_alpha_over_r():
    base = nn.Linear(12, 10).double()  # in (3, 4), out (2, 5)
    a = randomized(LoKr(base, lx.config("lokr", rank=2, alpha=5)))
    assert set(a.peft_tensors()) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}
    assert a.scale == 2.5
    torch.testing.assert_close(a.delta_weight(), definition(a), rtol=1e-12, atol=1e-12)


@given(
    o1=st.integers(1, 5),
    i1=st.integers(1, 5),
    o2=st.integers(1, 5),
    i2=st.integers(1, 5),
    rows=st.integers(0, 6),
)
def test_vec_trick_equals_the_dense_product_for_all_shapes(o1, i1, o2, i2, rows):
    g = torch.Generator().manual_seed(o1 + 10 * i1 + 100 * o2 + 1000 * i2 + 10000 * rows)
    W1 = torch.randn(o1, i1, generator=g, dtype=torch.float64)
    W2 = torch.randn(o2, i2, generator=g, dtype=torch.float64)
    x = torch.randn(rows, i1 * i2, generator=g, dtype=torch.float64)
    K = kron_by_index(W1, W2)
    torch.testing.assert_close(kron_apply(W1, W2, x), x @ K.T, rtol=1e-12, atol=1e-12)
    ids = torch.randint(0, i1 * i2, (rows,), generator=g)
    torch.testing.assert_close(kron_lookup(W1, W2, ids), K.T[ids], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("W1_shape", "W2_shape", "path"),
    [((2, 6), (6, 2), "left"), ((6, 2), (2, 6), "right"), ((1, 1), (3, 4), "dense")],
)
def test_each_order_of_the_vec_trick_is_taken_where_cheapest(W1_shape, W2_shape, path, monkeypatch):
    """Left: (W1 X) W2^T; right: W1 (X W2^T); dense: x (W1 ⊗ W2)^T, for a degenerate 1 x 1 W1."""
    real_kron, calls = torch.kron, []
    monkeypatch.setattr(torch, "kron", lambda *a: calls.append(a) or real_kron(*a))
    W1 = torch.randn(*W1_shape, dtype=torch.float64)
    W2 = torch.randn(*W2_shape, dtype=torch.float64)
    x = torch.randn(10, W1_shape[1] * W2_shape[1], dtype=torch.float64)
    (o1, i1), (o2, i2) = W1_shape, W2_shape
    left, right = o1 * i2 * (i1 + o2), i1 * o2 * (i2 + o1)
    dense_wins = o1 * o2 * i1 * i2 * 11 < 10 * min(left, right)
    assert path == ("dense" if dense_wins else "left" if left <= right else "right")
    torch.testing.assert_close(kron_apply(W1, W2, x), x @ kron_by_index(W1, W2).T)
    assert bool(calls) == (path == "dense")  # only the dense path builds W1 ⊗ W2


@given(
    n_in=st.sampled_from([1, 4, 6, 7, 12]),
    n_out=st.sampled_from([1, 3, 8, 9, 10]),
    rank=st.integers(1, 4),
    both=st.booleans(),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    bias=st.booleans(),
)
def test_forward_equals_the_definition_for_all_shapes(n_in, n_out, rank, both, lead, bias):
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out, bias=bias).double()
    a = randomized(LoKr(base, lx.config("lokr", rank=rank, alpha=3, decompose_both=both)))
    x = torch.randn(*lead, n_in, dtype=torch.float64)
    expected = x @ (base.weight + definition(a)).T + (base.bias if bias else 0)
    torch.testing.assert_close(a(x), expected, rtol=1e-10, atol=1e-10)


def test_gradients_are_those_of_the_definition():
    base = nn.Linear(12, 8).double()
    a = randomized(LoKr(base, lx.config("lokr", rank=1, alpha=5, decompose_both=True)))
    params = list(a.peft_tensors().values())
    assert len(params) == 4
    x = torch.randn(4, 12, dtype=torch.float64)
    fast = torch.autograd.grad(a(x).square().sum(), params)
    slow = torch.autograd.grad(
        F.linear(x, base.weight + definition(a), base.bias).square().sum(), params
    )
    for g_fast, g_slow in zip(fast, slow, strict=True):
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------- rank


@pytest.mark.parametrize(("n", "rank"), [(64, 1), (64, 2), (36, 2), (100, 3)])
def test_rank_is_the_product_of_the_factor_ranks_and_exceeds_r(n, rank):
    """rank(W1 ⊗ W2) = rank(W1) rank(W2): a full W1 (√n x √n) times a rank-r W2 gives √n r > r."""
    a = randomized(LoKr(nn.Linear(n, n).double(), lx.config("lokr", rank=rank)))
    assert set(a.peft_tensors()) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}
    W1, W2 = factors(a)
    r1, r2 = (torch.linalg.matrix_rank(W).item() for W in (W1, W2))
    assert (r1, r2) == (math.isqrt(n), rank)
    assert torch.linalg.matrix_rank(a.delta_weight()).item() == r1 * r2 > rank


def test_rank_within_loras_parameter_budget_exceeds_loras_rank():
    """64 x 64: LoRA r = 4 trains 512 numbers for rank 4; LoKr at r = 4 (two full 8 x 8 factors) trains 128 for
    rank 64, and at r = 2 (W2 = W2a W2b) 96 for rank 16."""
    n = 64
    assert lx.config("lora", rank=4).parameter_count(n, n) == 512
    for rank, count, expected_rank in ((4, 128, 64), (2, 96, 16)):
        a = randomized(LoKr(nn.Linear(n, n).double(), lx.config("lokr", rank=rank)))
        assert a.config.parameter_count(n, n) == count <= 512
        assert torch.linalg.matrix_rank(a.delta_weight()).item() == expected_rank > 4


# ------------------------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("both", [False, True])
def test_peft_initialisation_zero_w1_and_kaiming_w2(both):
    torch.manual_seed(0)
    a = LoKr(nn.Linear(400, 300), lx.config("lokr", rank=2, decompose_both=both))
    t = a.peft_tensors()
    zero = "lokr_w1_a" if both else "lokr_w1"
    assert torch.count_nonzero(t[zero]) == 0
    for name in ("lokr_w1_b", "lokr_w2_a", "lokr_w2_b") if both else ("lokr_w2_a", "lokr_w2_b"):
        bound = 1 / math.sqrt(
            t[name].shape[1]
        )  # kaiming_uniform, a = sqrt(5): U(-1/sqrt(fan_in), ...)
        assert 0.8 * bound < t[name].abs().max() <= bound
    assert torch.count_nonzero(a.delta_weight()) == 0


def test_lycoris_initialisation_zero_w2():
    torch.manual_seed(0)
    a = LoKr(nn.Linear(400, 300), lx.config("lokr", rank=2, init_weights="lycoris"))
    t = a.peft_tensors()
    assert torch.count_nonzero(t["lokr_w2_b"]) == 0
    assert t["lokr_w1"].std() > 0 and t["lokr_w2_a"].std() > 0
    assert torch.count_nonzero(a.delta_weight()) == 0


@pytest.mark.parametrize("value", [False, "gaussian", 1])
def test_init_weights_other_than_true_or_lycoris_is_refused(value):
    with pytest.raises(ValueError, match="lokr: init_weights must be True or 'lycoris'"):
        lx.config("lokr", init_weights=value)


# ------------------------------------------------------------------------------------------- bad shapes


@pytest.mark.parametrize("factor", [0, -2, 1.5, True])
def test_decompose_factor_must_be_minus_one_or_positive(factor):
    with pytest.raises(ValueError, match="lokr: decompose_factor must be -1 or an integer >= 1"):
        lx.config("lokr", decompose_factor=factor)


def test_a_factor_that_does_not_divide_a_layer_is_refused_and_the_model_left_unchanged():
    """tiny_llama: q_proj 16 -> 16, down_proj 32 -> 16, k_proj 16 -> 8: 3 divides none of them."""
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        lx.adapt_(model, lx.config("lokr", decompose_factor=3), ["q_proj", "down_proj"])
    message = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in message
    assert "decompose_factor 3 must divide both in and out" in message
    assert "in=16, out=16" in message
    assert_unchanged(model, before)
    # 16 divides q_proj (16 x 16) but not k_proj's out = 8: q_proj would build, yet nothing changes.
    with pytest.raises(ValueError, match=r"k_proj.*does not divide out=8"):
        lx.adapt_(model, lx.config("lokr", decompose_factor=16), ["q_proj", "k_proj"])
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------- dropouts


def peft_layer(n_in: int, n_out: int, **fields) -> tuple[nn.Module, LoKr]:
    """PEFT's LoKr layer and ours on the same base weights, with the same random factors."""
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out).double()
    ref = peft.inject_adapter_in_model(
        peft.LoKrConfig(target_modules=["0"], **fields), nn.Sequential(copy.deepcopy(base))
    )
    ours = randomized(LoKr(base, LoKrConfig.from_peft_fields(fields)))
    with torch.no_grad():
        for name, value in ours.peft_tensors().items():
            getattr(ref[0], name)["default"].copy_(value)
    return ref, ours


@pytest.mark.parity
@pytest.mark.parametrize(
    "fields",
    [
        {"r": 2, "alpha": 3},
        {"r": 1, "alpha": 8, "decompose_both": True},
        {"r": 8, "alpha": 4, "decompose_factor": 2},
        {"r": 3, "alpha": 5, "init_weights": "lycoris"},
    ],
)
def test_layer_parity_with_peft(fields):
    ref, ours = peft_layer(24, 18, **fields)
    ref.eval()
    ours.eval()
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.delta_weight(), ref[0].get_delta_weight("default"))
    assert ours.scale == ref[0].scaling["default"]


@pytest.mark.parity
@pytest.mark.parametrize(
    ("rank_dropout", "module_dropout", "scale"),
    [(0.3, 0.0, False), (0.0, 0.5, False), (0.4, 0.5, False), (0.5, 0.2, True)],
)
def test_training_dropouts_draw_as_peft(rank_dropout, module_dropout, scale):
    """Under one seed PEFT and loraredux skip the same passes and drop the same rows. With rank_dropout_scale
    PEFT builds the 1 / (fraction kept) scale in float32, hence the looser tolerance there."""
    fields = {"rank_dropout": rank_dropout, "module_dropout": module_dropout}
    ref, ours = peft_layer(12, 16, r=2, alpha=4, rank_dropout_scale=scale, **fields)
    ref.train()
    ours.train()
    x = torch.randn(4, 12, dtype=torch.float64)
    outcomes = set()
    tol = 1e-6 if scale else 1e-12
    for seed in range(12):
        torch.manual_seed(seed)
        expected = ref(x)
        torch.manual_seed(seed)
        torch.testing.assert_close(ours(x), expected, rtol=tol, atol=tol)
        outcomes.add(torch.equal(expected, ours.base(x)))
    assert outcomes == ({False, True} if module_dropout else {False})


def test_rank_dropout_zeroes_output_rows_and_rescales_only_on_request():
    for scale in (False, True):
        cfg = lx.config("lokr", rank=2, rank_dropout=0.5, rank_dropout_scale=scale)
        a = randomized(LoKr(nn.Linear(6, 40).double(), cfg))
        a.train()
        x = torch.randn(3, 6, dtype=torch.float64)
        torch.manual_seed(1)
        y = a(x)
        torch.manual_seed(1)
        torch.rand(1)  # the module-dropout coin comes first
        keep = (torch.rand(40) > 0.5).double()
        assert 0 < keep.sum() < 40
        keep = keep / keep.mean() if scale else keep
        expected = a.base(x) + (x @ definition(a).T) * keep
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------- base kinds


def test_conv1d_uses_the_transposed_weight():
    conv = Conv1D(6, 8).double()  # weight (in=8, out=6)
    torch.nn.init.normal_(conv.bias)
    a = randomized(LoKr(conv, lx.config("lokr", rank=1)))
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(a(x), x @ (conv.weight + definition(a).T) + conv.bias)
    merged = a.merged()
    assert isinstance(merged, Conv1D) and merged.weight.shape == (8, 6)


def test_embedding_looks_up_the_adapted_table():
    emb = nn.Embedding(20, 6, padding_idx=0).double()  # in = 20: (4, 5); out = 6: (2, 3)
    a = randomized(LoKr(emb, lx.config("lokr", rank=1, alpha=4)))
    ids = torch.tensor([[0, 3, 19], [5, 5, 1]])
    table = emb.weight + definition(a).T  # (num_embeddings, dim)
    torch.testing.assert_close(a(ids), table[ids], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------- files


TARGETS = ["q_proj", "v_proj", "down_proj"]
# r = 1 decomposes W2 everywhere; r = 6 makes down_proj's W2 (4 x 8) a full matrix.
RANKS = {"layers.0.self_attn.q_proj": 2, "down_proj": 6}
ALPHAS = {"v_proj": 3.0, "layers.1.mlp.down_proj": 5.0}
FILE_CASES = {
    "default": {},
    "decompose-both": {"decompose_both": True, "rank_dropout": 0.2, "module_dropout": 0.1},
    "factor-4": {"decompose_factor": 4, "rank_dropout_scale": True},
}


@pytest.mark.parity
@pytest.mark.parametrize("case", list(FILE_CASES))
def test_loraredux_file_loads_in_peft(case: str, tmp_path: Path):
    fields = FILE_CASES[case]
    model = lx.adapt_(
        tiny_llama(),
        lx.config("lokr", rank=1, alpha=2, **fields),
        TARGETS,
        rank_pattern=RANKS,
        alpha_pattern=ALPHAS,
    )
    randomize(list(lx.trainable_parameters(model).values()))
    expected = logits(model)
    assert not torch.allclose(logits(tiny_llama()), expected)
    lx.save_adapter(model, tmp_path)  # auto: PEFT's format, every layer is an nn.Linear
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOKR" and "fan_in_fan_out" not in config
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-10, atol=1e-10)
    for key, value in fields.items():
        assert getattr(loaded.peft_config["default"], key) == value


@pytest.mark.parity
@pytest.mark.parametrize("case", list(FILE_CASES))
def test_peft_file_loads_in_loraredux(case: str, tmp_path: Path):
    fields = FILE_CASES[case]
    peft_model = peft.get_peft_model(
        tiny_llama(),
        peft.LoKrConfig(
            r=1, alpha=2, target_modules=TARGETS, rank_pattern=RANKS, alpha_pattern=ALPHAS, **fields
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
        if isinstance(m, peft_lokr.LoKrLayer)
    }
    ours = {p: (a.config.rank, a.config.alpha) for p, a in lx.adapters(model)}
    assert ours == peft_layers and len(ours) == 6
    for _, a in lx.adapters(model):
        assert all(getattr(a.config, k) == v for k, v in fields.items())


@pytest.mark.parametrize(
    ("factory", "targets"), [(tiny_gpt2, ["c_attn"]), (tiny_llama, ["embed_tokens"])]
)
def test_conv1d_and_embedding_adapters_save_natively(factory, targets, tmp_path: Path):
    """PEFT's LoKr adapts neither GPT-2's Conv1D nor an embedding: its format is refused, ours round-trips."""
    model = lx.adapt_(factory(), lx.config("lokr", rank=2), targets)
    randomize(list(lx.trainable_parameters(model).values()))
    kind = "conv1d" if factory is tiny_gpt2 else "embedding"
    with pytest.raises(ValueError, match=f"lokr on {kind} layers.*no PEFT form"):
        lx.save_adapter(model, tmp_path / "peft", format="peft")
    lx.save_adapter(model, tmp_path / "auto")
    assert (
        json.loads((tmp_path / "auto" / "adapter_config.json").read_text())["format"] == "loraredux"
    )
    loaded = lx.load_adapter(factory(), tmp_path / "auto")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
