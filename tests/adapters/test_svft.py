"""SVFT's own identities (Lingam et al., NeurIPS 2024, arXiv 2405.19597): ΔW = U M V^T in the frozen singular
bases, the four patterns and their parameter counts, rank(ΔW) = rank(M) (full rank at a budget where LoRA has none),
the plain pattern as a shift of the singular values, bad shapes, and an exact native save/load."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraredux as lx
from loraredux.adapters import SVFT, SVFTConfig
from loraredux.adapters.svft import pattern_indices, pattern_size
from tiny_models import assert_same_adapter, assert_unchanged, randomized, snapshot, tiny_llama

PATTERNS = ["plain", "banded", "random", "top_k"]


def svft(base: nn.Module, **fields) -> SVFT:
    return randomized(SVFT(base, lx.config("svft", **fields)))


def dense_M(a: SVFT) -> torch.Tensor:
    """M written out entry by entry (independent of `SVFT.M`)."""
    M = torch.zeros(a.n, a.n, dtype=torch.float64)
    for value, i, j in zip(a.values.tolist(), a.rows.tolist(), a.cols.tolist(), strict=True):
        M[i, j] += value
    return M


@given(n=st.integers(1, 12), data=st.data())
def test_pattern_sizes_are_the_papers_counts(n, data):
    d = data.draw(st.integers(0, n - 1))
    band = [(i, j) for i in range(n) for j in range(n) if abs(i - j) <= d]
    rows, cols = pattern_indices("banded", n, d)
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == band  # the band |i - j| <= d
    assert pattern_size("banded", n, d) == len(band) == n * (2 * d + 1) - d * (d + 1)
    rows, cols = pattern_indices("plain", n, 0)
    assert rows.tolist() == cols.tolist() == list(range(n)) and pattern_size("plain", n, 0) == n
    rows, cols = pattern_indices("random", n, d, seed=7)
    positions = set(zip(rows.tolist(), cols.tolist(), strict=True))
    assert len(positions) == rows.numel() == len(band)  # k distinct positions, the banded budget


def test_random_pattern_is_seeded():
    first, again = (
        pattern_indices("random", 20, 2, seed=1),
        pattern_indices("random", 20, 2, seed=1),
    )
    other = pattern_indices("random", 20, 2, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0] * 20 + first[1], other[0] * 20 + other[1])


def test_top_k_picks_the_largest_alignments_whatever_the_signs():
    torch.manual_seed(0)
    a = SVFT(nn.Linear(9, 9).double(), lx.config("svft", pattern="top_k", off_diag=1))
    k = pattern_size("top_k", 9, 1)
    align = (a.U.T @ a.V).abs()  # |u_i^T v_j|
    chosen = align[a.rows, a.cols]
    rest = align.clone()
    rest[a.rows, a.cols] = -1
    assert a.rows.numel() == k and chosen.min() >= rest.max()
    flip = torch.tensor([1.0, -1.0] * 4 + [-1.0], dtype=torch.float64)  # another valid SVD
    rows, cols = pattern_indices("top_k", 9, 1, U=a.U * flip, V=a.V * flip)
    assert torch.equal(rows, a.rows) and torch.equal(cols, a.cols)


@given(
    n_in=st.integers(1, 9),
    n_out=st.integers(1, 9),
    pattern=st.sampled_from(PATTERNS),
    data=st.data(),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    bias=st.booleans(),
)
def test_update_is_U_M_Vt_and_fast_path_agrees_for_all_shapes(
    n_in, n_out, pattern, data, lead, bias
):
    if pattern == "top_k":
        n_out = n_in
    rank = data.draw(st.none() | st.integers(1, min(n_in, n_out)))
    n = min(n_in, n_out) if rank is None else rank
    d = 0 if pattern == "plain" else data.draw(st.integers(0, n - 1))
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out, bias=bias).double()
    a = svft(base, pattern=pattern, off_diag=d, rank=rank, seed=3)
    U, V = a.U, a.V
    torch.testing.assert_close(U.T @ U, torch.eye(n, dtype=torch.float64))  # orthonormal bases
    torch.testing.assert_close(V.T @ V, torch.eye(n, dtype=torch.float64))
    S = torch.linalg.svdvals(base.weight.detach())
    torch.testing.assert_close(U.T @ base.weight @ V, torch.diag(S[:n]))  # singular vectors of W0
    expected_W = base.weight + U @ dense_M(a) @ V.T
    torch.testing.assert_close(a.effective_weight(), expected_W, rtol=1e-12, atol=1e-12)
    x = torch.randn(*lead, n_in, dtype=torch.float64)
    torch.testing.assert_close(
        a(x), x @ expected_W.T + (base.bias if bias else 0), rtol=1e-10, atol=1e-10
    )
    own = sum(p.numel() for p in a.parameters() if p.requires_grad)
    assert own == a.config.parameter_count(n_in, n_out) == pattern_size(pattern, n, d)


def test_plain_pattern_shifts_the_singular_values():
    """With the full bases and a diagonal M, W' = U (Σ + M) V^T: SVFT^P fine-tunes the singular values."""
    torch.manual_seed(0)
    base = nn.Linear(10, 6).double()
    a = SVFT(base, lx.config("svft"))
    S = torch.linalg.svdvals(base.weight.detach())
    with torch.no_grad():
        a.values.copy_(torch.linspace(0.1, 0.6, 6, dtype=torch.float64))
    shifted = torch.linalg.svdvals(a.effective_weight().detach())
    torch.testing.assert_close(shifted, (S + a.values.detach()).sort(descending=True).values)


@pytest.mark.parametrize("pattern", ["plain", "banded"])
def test_full_rank_update_at_a_budget_where_lora_has_no_rank(pattern):
    """rank(U M V^T) = rank(M): n = min(in, out) from n (2d + 1) - d (d + 1) numbers, where LoRA's rank is at most
    count // (in + out) <= 1."""
    n_in, n_out = 40, 24
    d = 0 if pattern == "plain" else 1
    torch.manual_seed(0)
    a = svft(nn.Linear(n_in, n_out).double(), pattern=pattern, off_diag=d)
    count = a.config.parameter_count(n_in, n_out)
    assert count // lx.config("lora", rank=1).parameter_count(n_in, n_out) <= 1
    assert torch.linalg.matrix_rank(a.delta_weight()) == torch.linalg.matrix_rank(dense_M(a)) == 24


def test_truncated_bases_add_to_the_exact_base_weight():
    torch.manual_seed(0)
    base = nn.Linear(12, 10).double()
    a = svft(base, pattern="banded", off_diag=1, rank=4)
    assert a.U.shape == (10, 4) and a.V.shape == (12, 4)
    delta = a.delta_weight()
    torch.testing.assert_close(a.U @ (a.U.T @ delta @ a.V) @ a.V.T, delta)  # in the top-4 subspaces
    with torch.no_grad():
        a.values.zero_()
    torch.testing.assert_close(a.effective_weight(), base.weight, rtol=0, atol=0)  # W0 kept whole


def test_init_zero_is_identity_and_kaiming_is_the_authors_scale():
    torch.manual_seed(0)
    zero = SVFT(nn.Linear(8, 8).double(), lx.config("svft", pattern="banded", off_diag=2))
    assert torch.count_nonzero(zero.values) == 0 and SVFTConfig.identity_at_init
    big = SVFT(nn.Linear(300, 300), lx.config("svft", pattern="banded", off_diag=4, init="kaiming"))
    k = big.values.numel()
    torch.testing.assert_close(big.values.std().item(), (1 / (2 * k)) ** 0.5, rtol=0.05, atol=0)


def test_conv1d_and_embedding_use_their_own_orientation():
    torch.manual_seed(0)
    conv = Conv1D(5, 7).double()  # weight (in=7, out=5)
    torch.nn.init.normal_(conv.bias)
    a = svft(conv, pattern="random", off_diag=1)
    x = torch.randn(3, 7, dtype=torch.float64)
    delta = a.U @ dense_M(a) @ a.V.T  # (out, in)
    torch.testing.assert_close(a(x), x @ (conv.weight + delta.T) + conv.bias)
    assert isinstance(a.merged(), Conv1D)

    emb = nn.Embedding(11, 6).double()
    e = svft(emb, pattern="banded", off_diag=2)
    ids = torch.tensor([[0, 3, 10], [5, 5, 1]])
    table = emb.weight + (e.U @ dense_M(e) @ e.V.T).T  # (num_embeddings, dim)
    torch.testing.assert_close(e(ids), table[ids], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rank": 9}, r"rank 9 needs rank <= min\(in, out\) = 8"),
        ({"pattern": "banded", "off_diag": 8}, r"off_diag 8 needs off_diag <= n - 1 = 7"),
        (
            {"pattern": "random", "off_diag": 3, "rank": 3},
            r"off_diag 3 needs off_diag <= n - 1 = 2 ",
        ),
        ({"pattern": "top_k"}, r"needs a square layer \(in == out\), got in=16, out=8"),
    ],
)
def test_a_pattern_that_does_not_fit_names_the_layer_and_leaves_the_model_unchanged(
    fields, message
):
    model = tiny_llama()  # q_proj 16 -> 16, v_proj 16 -> 8
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"self_attn\.[qv]_proj: svft cannot adapt.*" + message):
        lx.adapt_(model, lx.config("svft", **fields), ["q_proj", "v_proj"])
    assert_unchanged(model, before)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="plain pattern is the diagonal"):
        lx.config("svft", off_diag=2)
    with pytest.raises(ValueError, match="pattern must be one of"):
        lx.config("svft", pattern="block")
    with pytest.raises(ValueError, match="init must be one of"):
        lx.config("svft", init="ones")


@pytest.mark.parametrize("pattern", ["random", "top_k"])
def test_native_save_and_load_restore_bases_and_pattern_exactly(pattern, tmp_path):
    targets = ["q_proj", "o_proj"]  # square layers (top_k needs them)
    config = lx.config("svft", pattern=pattern, off_diag=2, seed=5)
    model = lx.adapt_(tiny_llama(), config, targets)
    with torch.no_grad():
        for _, a in lx.adapters(model):
            randomized(a, seed=3)
            a.U[:, 1].neg_()  # another valid SVD of the same W0: only the file can restore it
            a.V[:, 1].neg_()
    assert lx.save_adapter(model, tmp_path) == tmp_path  # "auto": SVFT has no PEFT form
    loaded = lx.load_adapter(tiny_llama(), tmp_path)
    assert any(k.endswith(".rows") for k in lx.adapter_state_dict(model))
    assert_same_adapter(loaded, model)
