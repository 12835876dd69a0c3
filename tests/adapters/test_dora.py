"""DoRA's identities (Liu et al., arXiv 2402.09353, Eq. (5) and §4.3) and parity with PEFT's `use_dora=True`.

W' = m ⊙ (W0 + s B A) / ||W0 + s B A||_c with the per-output (row) norm treated as a constant in backward; PEFT's
`peft/tuners/lora/dora.py` computes the same, so layers, gradients and files agree with PEFT in float64.
"""

from __future__ import annotations

import copy
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
from loraredux.adapters import DoRA
from tiny_models import logits, tiny_bert, tiny_gpt2, tiny_llama


def randomized(a: DoRA, seed: int = 0) -> DoRA:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (a.A, a.B):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        a.magnitude.mul_(
            1 + 0.3 * torch.rand(a.magnitude.shape, generator=g, dtype=a.magnitude.dtype)
        )
    return a


def transcription(W0: torch.Tensor, m, A, B, s: float, detach: bool = True) -> torch.Tensor:
    """Eq. (5) written out: m_j (W0 + s B A)_j / ||(W0 + s B A)_j|| for every output row j."""
    V = W0 + s * B @ A
    norms = torch.sqrt((V * V).sum(dim=1, keepdim=True))
    return m[:, None] * V / (norms.detach() if detach else norms)


@given(
    n_in=st.integers(1, 10),
    n_out=st.integers(1, 10),
    data=st.data(),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    bias=st.booleans(),
)
def test_forward_and_effective_weight_equal_equation_5(n_in, n_out, data, lead, bias):
    r = data.draw(st.integers(1, min(n_in, n_out)))
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out, bias=bias).double()
    a = randomized(DoRA(base, lx.config("dora", rank=r, alpha=3)))
    W = transcription(base.weight, a.magnitude, a.A, a.B, 3 / r)
    torch.testing.assert_close(a.effective_weight(), W, rtol=1e-12, atol=1e-12)
    x = torch.randn(*lead, n_in, dtype=torch.float64)
    torch.testing.assert_close(a(x), F.linear(x, W, base.bias), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_magnitude_starts_at_the_norms_of_W0(kind):
    torch.manual_seed(0)
    base = {"linear": nn.Linear(9, 6), "conv1d": Conv1D(6, 9), "embedding": nn.Embedding(9, 6)}[
        kind
    ]
    a = DoRA(base.double(), lx.config("dora", rank=3))
    W0 = a.base_weight()  # (6, 9) in every case
    torch.testing.assert_close(a.magnitude, torch.linalg.vector_norm(W0, dim=1), rtol=1e-12, atol=0)
    torch.testing.assert_close(a.norm(), a.magnitude, rtol=1e-12, atol=0)  # ||W'||_c = m at init
    assert a.magnitude.shape == (6,)


def test_rows_of_W_prime_have_norm_m_after_any_update():
    """Direction and magnitude decouple: whatever A, B are, row j of W' has norm m_j."""
    a = randomized(DoRA(nn.Linear(12, 5).double(), lx.config("dora", rank=4, alpha=8)), seed=3)
    norms = torch.linalg.vector_norm(a.effective_weight(), dim=1)
    torch.testing.assert_close(norms, a.magnitude.detach(), rtol=1e-12, atol=0)


def test_gradients_treat_the_norm_as_a_constant():
    """§4.3: ||W0 + s B A||_c gets no gradient. The negative control (gradient through the norm) differs."""
    torch.manual_seed(0)
    base = nn.Linear(7, 5).double()
    a = randomized(DoRA(base, lx.config("dora", rank=2, alpha=4)))
    x = torch.randn(4, 7, dtype=torch.float64)
    target = torch.randn(4, 5, dtype=torch.float64)

    def grads(fn):
        params = [a.A, a.B, a.magnitude]
        loss = (fn() - target).square().sum()
        return torch.autograd.grad(loss, params)

    ours = grads(lambda: a(x))
    detached = grads(
        lambda: F.linear(x, transcription(base.weight, a.magnitude, a.A, a.B, 2.0), base.bias)
    )
    through = grads(
        lambda: F.linear(
            x, transcription(base.weight, a.magnitude, a.A, a.B, 2.0, detach=False), base.bias
        )
    )
    for g, h in zip(ours, detached, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(
        ours[0], through[0], rtol=1e-4
    )  # A's gradient changes if the norm is not detached


def test_is_not_additive_low_rank():
    a = DoRA(nn.Linear(4, 3), lx.config("dora", rank=1))
    with pytest.raises(NotImplementedError, match="not W0"):
        a.lora_form()


def test_parameter_count_is_lora_plus_one_magnitude_per_output():
    a = DoRA(nn.Linear(11, 6), lx.config("dora", rank=3))
    assert sum(p.numel() for p in a.parameters() if p.requires_grad) == 3 * (11 + 6) + 6


def test_inference_cache_follows_in_place_updates():
    """Eval + no_grad reuses the norm, and any in-place change of A, B or W0 invalidates it."""
    torch.manual_seed(0)
    a = randomized(DoRA(nn.Linear(6, 4).double(), lx.config("dora", rank=2))).eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        first = a(x)
        assert a._cache is not None
        cached = a._cache[1]
        assert a(x).equal(first) and a._cache[1] is cached  # reused, not recomputed
        for p in (a.A, a.B, a.base.weight):
            p.add_(0.1)
            fresh = F.linear(
                x, transcription(a.base.weight, a.magnitude, a.A, a.B, a.scale), a.base.bias
            )
            torch.testing.assert_close(a(x), fresh, rtol=1e-12, atol=1e-12)
    a.train()
    assert a._cache is None
    a(x)
    assert a._cache is None  # nothing is cached in training


# ----------------------------------------------------------------------------------------------- PEFT


def _peft_layer(base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> nn.Module:
    wrapped = nn.Sequential()
    wrapped.add_module("layer", base)
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=["layer"], use_dora=True
    )
    return peft.get_peft_model(wrapped, config)


def _copy_into_peft(a: DoRA, peft_model: nn.Module) -> None:
    layer = peft_model.base_model.model.layer
    with torch.no_grad():
        if a.view.kind == "embedding":
            layer.lora_embedding_A["default"].copy_(a.A)
            layer.lora_embedding_B["default"].copy_(a.B)
        else:
            layer.lora_A["default"].weight.copy_(a.A)
            layer.lora_B["default"].weight.copy_(a.B)
        layer.lora_magnitude_vector["default"].weight.copy_(a.magnitude)


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_layer_output_and_gradients_equal_peft(kind):
    torch.manual_seed(0)
    make = {
        "linear": lambda: nn.Linear(9, 6),
        "conv1d": lambda: Conv1D(6, 9),
        "embedding": lambda: nn.Embedding(9, 6),
    }
    base = make[kind]().double()
    ours = randomized(DoRA(copy.deepcopy(base), lx.config("dora", rank=3, alpha=5)))
    theirs = _peft_layer(copy.deepcopy(base), 3, 5)
    _copy_into_peft(ours, theirs)
    x = (
        torch.randint(0, 9, (2, 4))
        if kind == "embedding"
        else torch.randn(2, 4, 9, dtype=torch.float64)
    )
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-10, atol=1e-10)
    w = torch.randn(y_ours.shape, dtype=torch.float64)
    (y_ours * w).sum().backward()
    (y_theirs * w).sum().backward()
    layer = theirs.base_model.model.layer
    if kind == "embedding":
        pairs = [
            (ours.A, layer.lora_embedding_A["default"]),
            (ours.B, layer.lora_embedding_B["default"]),
        ]
    else:
        pairs = [(ours.A, layer.lora_A["default"].weight), (ours.B, layer.lora_B["default"].weight)]
    pairs.append((ours.magnitude, layer.lora_magnitude_vector["default"].weight))
    for mine, peft_param in pairs:
        torch.testing.assert_close(mine.grad, peft_param.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parity
def test_training_with_dropout_equals_peft():
    """With dropout active, PEFT feeds the dropped input to the magnitude correction too; so do we (same mask)."""
    torch.manual_seed(0)
    base = nn.Linear(9, 6).double()
    ours = randomized(DoRA(copy.deepcopy(base), lx.config("dora", rank=3, dropout=0.4))).train()
    theirs = _peft_layer(copy.deepcopy(base), 3, 8, dropout=0.4).train()
    _copy_into_peft(ours, theirs)
    x = torch.randn(5, 9, dtype=torch.float64)
    torch.manual_seed(7)
    y_ours = ours(x)
    torch.manual_seed(7)
    y_theirs = theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-10, atol=1e-10)
    torch.manual_seed(8)
    assert not torch.allclose(ours(x), y_ours)  # the dropout mask matters


@torch.no_grad()
def _randomize(params) -> None:
    g = torch.Generator().manual_seed(2)
    for p in params:
        p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


FILE_CASES = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"], {"down_proj": 6}, None),
    "llama-embedding": (tiny_llama, ["embed_tokens", "o_proj"], {}, None),
    "gpt2-conv1d": (tiny_gpt2, ["c_attn", "c_proj"], {}, None),
    "bert-classifier": (tiny_bert, ["query", "value"], {}, ["classifier"]),
}


@pytest.mark.parity
@pytest.mark.parametrize("name", list(FILE_CASES))
def test_files_both_ways_with_peft(name: str, tmp_path: Path) -> None:
    make, targets, rank_pattern, saved = FILE_CASES[name]
    # loraredux -> PEFT
    model = lx.adapt_(
        make(),
        lx.config("dora", rank=4, alpha=8),
        targets,
        rank_pattern=rank_pattern or None,
        modules_to_save=saved,
    )
    _randomize(lx.trainable_parameters(model).values())
    expected = logits(model)
    with lx.disabled(model):
        assert not torch.allclose(logits(model), expected)
    lx.save_adapter(model, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-10, atol=1e-10)

    # PEFT -> loraredux
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(targets),
        use_dora=True,
        rank_pattern=dict(rank_pattern),
        modules_to_save=list(saved) if saved else None,
    )
    peft_model = peft.get_peft_model(make(), config)
    _randomize([p for p in peft_model.parameters() if p.requires_grad])
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "theirs")
    ours = lx.load_adapter(make(), tmp_path / "theirs")
    assert {type(a) for _, a in lx.adapters(ours)} == {DoRA}
    torch.testing.assert_close(logits(ours), logits(peft_model), rtol=1e-10, atol=1e-10)


@pytest.mark.parity
def test_plain_lora_and_dora_files_are_told_apart(tmp_path: Path) -> None:
    for method in ("lora", "dora"):
        model = lx.adapt_(tiny_llama(), lx.config(method, rank=2), ["q_proj"])
        lx.save_adapter(model, tmp_path / method)
        loaded = lx.load_adapter(tiny_llama(), tmp_path / method)
        assert {a.config.method for _, a in lx.adapters(loaded)} == {method}
