"""EVA (Paischer et al., arXiv 2410.07170) and CorDA (Yang et al., arXiv 2406.05223): the defining equations against
independent transcriptions, the rank redistribution against hand-computed examples, and parity with PEFT."""

import copy
import dataclasses
import math
import sys
import types

import numpy as np
import pytest
import torch

import loraredux as lx
from loraredux.init import LayerData
from loraredux.init.activation import (
    corda,
    eva,
    eva_allocate,
    eva_alpha_pattern,
    explained_variance_ratio,
)
from tiny_models import logits, tiny_gpt2, tiny_llama, token_ids

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def stats_of(X: torch.Tensor) -> LayerData:
    """LayerData of the input rows X (T, in), as `lx.init.gather` sums them."""
    X = X.double()
    return LayerData(second_moment=X.T @ X, input_sum=X.sum(0), rows=X.shape[0])


def stats_with(C: torch.Tensor, mu: torch.Tensor, rows: int = 100) -> LayerData:
    """LayerData whose centered covariance is exactly C and whose mean is mu."""
    return LayerData(second_moment=rows * (C + torch.outer(mu, mu)), input_sum=rows * mu, rows=rows)


def rotated(spectrum: list[float], seed: int) -> torch.Tensor:
    """Q diag(spectrum) Q^T for a random orthogonal Q (so no eigensolver sees a diagonal matrix)."""
    n = len(spectrum)
    Q, _ = torch.linalg.qr(
        torch.randn(n, n, generator=torch.Generator().manual_seed(seed)).double()
    )
    return Q @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ Q.T


def anisotropic_rows(rows: int, n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """(rows, n) inputs with a decaying spectrum, a random rotation and a mean of size `shift`."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    scales = torch.logspace(0.5, -1, n, dtype=torch.float64)
    Z = torch.randn(rows, n, generator=g, dtype=torch.float64) * scales
    return Z @ Q.T + shift * torch.randn(n, generator=g, dtype=torch.float64)


def projector(rows: torch.Tensor) -> torch.Tensor:
    """The orthogonal projector onto the row space of `rows` (k, n)."""
    Q, _ = torch.linalg.qr(rows.double().T)
    return Q @ Q.T


def sign_match(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(r,) per-component signs that align our columns of B with the reference's."""
    signs = torch.sign((ours * ref).sum(0))
    assert (signs != 0).all()
    return signs


# ---------------------------------------------------------------------------------------------- EVA


def test_eva_rows_are_the_top_principal_directions_of_the_centered_inputs():
    X = anisotropic_rows(200, 12, seed=0, shift=3.0)  # a large mean: centering matters
    W0 = torch.randn(7, 12, dtype=torch.float64)
    f = eva(W0, 5, 0.5, data=stats_of(X))
    # independent route: the right singular vectors of the centered data matrix (numpy's SVD, not eigh)
    _, _, Vt = np.linalg.svd((X - X.mean(0)).numpy(), full_matrices=False)
    top = torch.from_numpy(Vt[:5])
    assert f.A.shape == (5, 12) and f.B.shape == (7, 5) and f.base is None
    torch.testing.assert_close(f.A @ f.A.T, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(projector(f.A), projector(top), rtol=0, atol=1e-10)
    assert torch.count_nonzero(f.B) == 0
    # each row is the singular vector itself (sign fixed: its largest-magnitude entry is positive)
    signs = torch.sign((f.A * top).sum(1))
    torch.testing.assert_close(f.A, signs[:, None] * top, rtol=0, atol=1e-10)
    assert (f.A[torch.arange(5), f.A.abs().argmax(1)] > 0).all()
    # negative control: the uncentered second moment has other top directions here
    _, _, Vt_raw = np.linalg.svd(X.numpy(), full_matrices=False)
    assert (projector(f.A) - projector(torch.from_numpy(Vt_raw[:5]))).norm() > 0.1


def test_eva_keeps_the_dtype_and_the_model_function():
    X = anisotropic_rows(50, 6, seed=1)
    f = eva(torch.randn(4, 6, dtype=torch.float32), 3, 1.0, data=stats_of(X))
    assert f.A.dtype == f.B.dtype == torch.float32
    spec = lx.init.get("eva")
    assert spec.identity and not spec.moves_base and spec.needs == {"inputs"}
    assert spec.allocate is eva_allocate
    assert dict(spec.options) == {"rho": 2.0, "adjust_scaling_factors": True}


def test_explained_variance_ratio_is_eigenvalue_over_total_variance():
    C = rotated([6.0, 3.0, 1.0], seed=2)
    ratios = explained_variance_ratio(
        torch.zeros(2, 3, dtype=torch.float64), stats_with(C, torch.ones(3))
    )
    torch.testing.assert_close(ratios, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64))


@pytest.mark.parametrize(("rho", "expected"), [(1.0, (2, 2)), (1.5, (3, 1)), (2.0, (4, 0))])
def test_rho_caps_how_far_one_layer_can_grow(rho, expected):
    # a: ratios 5/15, 4/15, 3/15, 2/15, 1/15; b: ten components of 1/10. r = 2, budget 4, cap round(2 rho).
    # rho = 1: a keeps 2 (1/3, 4/15) and b 2; rho = 1.5: a 3 (1/3, 4/15, 1/5), b 1 (1/10);
    # rho = 2: a 4 (2/15 = 0.133 > 0.1 too), b none (left unadapted).
    weights = {
        "a": torch.zeros(3, 5, dtype=torch.float64),
        "b": torch.zeros(3, 10, dtype=torch.float64),
    }
    data = {
        "a": stats_with(rotated([5, 4, 3, 2, 1], seed=3), torch.randn(5, dtype=torch.float64)),
        "b": stats_with(rotated([1.0] * 10, seed=4), torch.zeros(10, dtype=torch.float64)),
    }
    ranks = eva_allocate(weights, data, 2, rho=rho)
    assert (ranks["a"], ranks["b"]) == expected


def test_budget_is_layers_times_rank_and_a_flat_layer_can_end_at_zero():
    # ratios: a .7 .15 .1 .05 | b .4 .3 .2 .05 .05 | c twelve of 1/12 = .083. r = 2, L = 3, budget 6, cap 4:
    # sorted .7a .4b .3b .2b .15a .1a | .083c ... -> a 3, b 3, c 0.
    weights = {
        "a": torch.zeros(2, 4, dtype=torch.float64),
        "b": torch.zeros(2, 5, dtype=torch.float64),
        "c": torch.zeros(2, 12, dtype=torch.float64),
    }
    data = {
        "a": stats_with(rotated([14, 3, 2, 1], seed=5), torch.zeros(4, dtype=torch.float64)),
        "b": stats_with(rotated([8, 6, 4, 1, 1], seed=6), torch.zeros(5, dtype=torch.float64)),
        "c": stats_with(rotated([1.0] * 12, seed=7), torch.zeros(12, dtype=torch.float64)),
    }
    assert eva_allocate(weights, data, 2, rho=2.0) == {"a": 3, "b": 3, "c": 0}
    assert eva_allocate(weights, data, 2, rho=1.0) == {"a": 2, "b": 2, "c": 2}


def test_ties_between_layers_with_the_same_input_go_to_the_first():
    # q and k see the same input (.4 .3 .2 .1 each), o: .7 .15 .1 .05. r = 2, budget 6, cap 4:
    # .7o .4q .4k .3q .3k, then the tie .2q = .2k is cut: q (first) gets it -> q 3, k 2, o 1.
    shared = stats_with(rotated([4, 3, 2, 1], seed=8), torch.randn(4, dtype=torch.float64))
    weights = {p: torch.zeros(3, 4, dtype=torch.float64) for p in ("q", "k", "o")}
    data = {
        "q": shared,
        "k": shared,
        "o": stats_with(rotated([14, 3, 2, 1], seed=9), torch.zeros(4)),
    }
    assert eva_allocate(weights, data, 2, rho=2.0) == {"q": 3, "k": 2, "o": 1}


def test_alpha_pattern_keeps_the_scale_of_redistributed_layers():
    ranks = {"a": 3, "b": 1, "c": 0, "d": 2}
    pattern = eva_alpha_pattern(ranks, 2, 16.0)
    assert pattern == {"a": 24.0, "b": 8.0}
    assert all(
        pattern[p] / ranks[p] == 16.0 / 2 for p in pattern
    )  # s_l = alpha_l / r_l = alpha / r
    assert eva_alpha_pattern(ranks, 2, 16.0, adjust_scaling_factors=False) == {}


def test_eva_errors_are_clear():
    W0 = torch.zeros(3, 4, dtype=torch.float64)
    data = stats_of(anisotropic_rows(20, 4, seed=10))
    with pytest.raises(ValueError, match="input statistics"):
        eva(W0, 2, 1.0)
    with pytest.raises(ValueError, match="input statistics"):
        eva(W0, 2, 1.0, data=LayerData(grad=torch.zeros(3, 4)))
    with pytest.raises(ValueError, match="needs calibration data"):
        lx.init.get("eva")(W0, 2, 1.0)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 4\]"):
        eva(W0, 5, 1.0, data=data)
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        eva(torch.zeros(3, 5), 2, 1.0, data=data)
    with pytest.raises(ValueError, match="no variance"):
        eva(W0, 2, 1.0, data=stats_of(torch.ones(6, 4)))
    for rho in (0.5, float("inf"), "2"):
        with pytest.raises(ValueError, match="rho must be a finite number >= 1"):
            eva_allocate({"a": W0}, {"a": data}, 2, rho=rho)
    with pytest.raises(ValueError, match=r"no calibration data for layer\(s\) \['b'\]"):
        eva_allocate({"a": W0, "b": W0}, {"a": data}, 2)
    with pytest.raises(ValueError, match=r"^b: init 'eva': the layer's inputs have no variance"):
        eva_allocate({"a": W0, "b": W0}, {"a": data, "b": stats_of(torch.ones(6, 4))}, 2)
    with pytest.raises(ValueError, match="has no option"):
        lx.init.get("eva")(W0, 2, 1.0, data=data, whiten=True)


# -------------------------------------------------------------------------------------------- CorDA


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
@pytest.mark.parametrize(("out_features", "in_features"), [(6, 9), (9, 6)])
def test_corda_matches_its_definition_and_reconstructs_W0(mode, out_features, in_features):
    torch.manual_seed(0)
    W0 = torch.randn(out_features, in_features, dtype=torch.float64)
    X = anisotropic_rows(40, in_features, seed=11, shift=0.5)
    scale, r = 0.75, 3
    f = corda(W0, r, scale, data=stats_of(X), mode=mode)
    # independent transcription in numpy: C = X^T X / T (uncentered), damped by 0.01 mean(diag C) I
    x = X.numpy()
    C = x.T @ x / x.shape[0]
    C = C + 0.01 * np.mean(np.diag(C)) * np.eye(in_features)
    U, S, Vt = np.linalg.svd(W0.numpy() @ C, full_matrices=False)
    pick = slice(0, r) if mode == "ipm" else slice(len(S) - r, len(S))
    root = np.sqrt(S[pick] / scale)
    A_ref = torch.from_numpy(root[:, None] * np.linalg.solve(C, Vt[pick].T).T)  # C symmetric
    B_ref = torch.from_numpy(U[:, pick] * root[None, :])
    signs = sign_match(f.B, B_ref)
    torch.testing.assert_close(f.A * signs[:, None], A_ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(f.B * signs, B_ref, rtol=1e-9, atol=1e-11)
    # the identity the init promises: W0 == base + s B A
    torch.testing.assert_close(
        f.base + scale * f.B @ f.A, W0, rtol=0, atol=1e-12 * W0.norm().item()
    )


def test_kpm_adapts_the_minor_components_and_ipm_the_major_ones():
    torch.manual_seed(1)
    W0 = torch.randn(8, 10, dtype=torch.float64)
    X = anisotropic_rows(60, 10, seed=12)
    data, r, s = stats_of(X), 3, 2.0
    C = data.covariance() + 0.01 * torch.diagonal(data.covariance()).mean() * torch.eye(
        10, dtype=torch.float64
    )
    S = torch.linalg.svdvals(W0 @ C)  # (8,) descending
    for mode, adapted, kept in (("ipm", S[:r], S[r:]), ("kpm", S[-r:], S[:-r])):
        f = corda(W0, r, s, data=data, mode=mode)
        # seen through C, the adapter is exactly the chosen r components of W0 C and the base is the rest
        torch.testing.assert_close(
            torch.linalg.svdvals(s * f.B @ f.A @ C)[:r], adapted, rtol=1e-10, atol=0
        )
        torch.testing.assert_close(
            torch.linalg.svdvals(f.base @ C)[: len(kept)], kept, rtol=1e-10, atol=0
        )
    kpm = corda(W0, r, s, data=data, mode="kpm")
    ipm = corda(W0, r, s, data=data, mode="ipm")
    # the two adapters' C-oriented row spaces are orthogonal (different right singular vectors of W0 C)
    assert (projector(kpm.A @ C) @ projector(ipm.A @ C)).norm() < 1e-9


def test_corda_registration_and_dtype():
    spec = lx.init.get("corda")
    assert spec.moves_base and spec.exact and spec.identity and spec.needs == {"inputs"}
    assert dict(spec.options) == {"mode": "ipm", "damping": 0.01}
    X = anisotropic_rows(30, 5, seed=13)
    f = corda(torch.randn(4, 5), 2, 1.0, data=stats_of(X))
    assert f.A.dtype == f.B.dtype == f.base.dtype == torch.float32


def test_corda_errors_are_clear():
    W0 = torch.randn(4, 5, dtype=torch.float64)
    data = stats_of(anisotropic_rows(30, 5, seed=14))
    with pytest.raises(ValueError, match=r"mode must be 'ipm'.*or 'kpm'.*got 'top'"):
        corda(W0, 2, 1.0, data=data, mode="top")
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 4\]"):
        corda(W0, 5, 1.0, data=data)
    with pytest.raises(ValueError, match="damping must be a finite number > 0"):
        corda(W0, 2, 1.0, data=data, damping=0.0)
    with pytest.raises(ValueError, match="input statistics"):
        corda(W0, 2, 1.0)
    with pytest.raises(ValueError, match="inputs are all zero"):
        corda(W0, 2, 1.0, data=stats_of(torch.zeros(3, 5)))


# --------------------------------------------------------------------------------- through lx.adapt_


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize(("init", "options"), [("eva", {"rho": 2.0}), ("corda", {"mode": "kpm"})])
def test_adapt_keeps_the_function_and_uses_the_allocated_ranks(make, init, options):
    model = make()
    before = logits(model)
    batch = {"input_ids": token_ids()}
    config = lx.config("lora", rank=4, alpha=8, init=init, init_options=options)
    lx.adapt_(model, config, targets="all-linear", calibration=[batch])
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-10)
    ranks = {p: a.A.shape[0] for p, a in lx.adapters(model)}
    if init == "corda":
        assert set(ranks.values()) == {4}
        return
    lx.unadapt_(model)
    modules = {p: model.get_submodule(p) for p in ranks}
    data = lx.init.gather(model, modules, {"inputs"}, [batch], progress=False)
    weights = {p: lx.bases.view_of(m).weight().detach() for p, m in modules.items()}
    assert ranks == eva_allocate(weights, data, 4, rho=2.0)
    assert sum(ranks.values()) == 4 * len(ranks) and len(set(ranks.values())) > 1


# ------------------------------------------------------------------------------------- PEFT parity


def peft_corda():
    """PEFT's CorDA preprocessing. peft 0.21's corda.py imports `attr` (the attrs package) for one plain
    dataclass; where attrs is absent, the standard library's dataclass stands in for it (same fields)."""
    try:
        import attr  # noqa: F401
    except ModuleNotFoundError:
        sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)
    from peft.tuners.lora.corda import preprocess_corda

    return preprocess_corda


@pytest.mark.parity
def test_eva_parity_with_peft_incremental_pca():
    """PEFT's EVA (`get_eva_state_dict`) on the same model and batch: same ranks, same subspaces.

    PEFT runs an incremental PCA (float32, `svd_lowrank` with q = 2 round(rho r)) over the batches until the
    components stop moving (cosine >= tau). With one batch it fits that batch at least twice; a repeated batch
    leaves the top components of an exact PCA unchanged, and with q >= in features the randomized SVD is exact,
    so with r = 8, rho = 2 on this model (in = 16 or 32) PEFT computes the exact PCA, in float32. The residual gap
    is float32 rounding (~1e-6). With several distinct batches and k = round(rho r) < in, each step truncates to
    k components, so PEFT's result is an approximation of the PCA over all rows, which we compute exactly.
    """
    from peft import LoraConfig
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import get_eva_state_dict

    model = tiny_llama()
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding: both libraries leave these rows out
    batch = {"input_ids": ids, "attention_mask": mask}
    config = LoraConfig(
        r=8, target_modules=LLAMA_LINEAR, init_lora_weights="eva", eva_config=EvaConfig(rho=2.0)
    )
    reference = get_eva_state_dict(copy.deepcopy(model), [batch], config, show_progress_bar=False)

    modules = {p: m for p, m in model.named_modules() if p.split(".")[-1] in LLAMA_LINEAR}
    data = lx.init.gather(model, modules, {"inputs"}, [batch], progress=False)
    weights = {p: m.weight.detach() for p, m in modules.items()}
    ranks = eva_allocate(weights, data, 8, rho=2.0)
    assert ranks == {p: reference[p].shape[0] for p in modules}
    assert (
        sum(ranks.values()) == 8 * len(modules) and len(set(ranks.values())) > 1
    )  # redistribution happened
    for path, W0 in weights.items():
        A = eva(W0, ranks[path], 1.0, data=data[path]).A
        ref = reference[path].double()
        assert (projector(A) - projector(ref)).norm() < 2e-5, path
        torch.testing.assert_close(A, ref, rtol=0, atol=2e-5)  # the same sign convention


@pytest.mark.parity
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_parity_with_peft(mode):
    """PEFT's `preprocess_corda` + `init_lora_weights="corda"` on the same float32 model and sequence.

    PEFT (and the authors' code) divide each forward's inputs by the absolute value of their largest entry m
    and sum X^T X over its T tokens; we use E[x x^T] = X^T X / T. For one sequence the two covariances differ
    by the factor k = m^2 / T, which leaves U, S-order, the product s B A and the base unchanged and moves
    the gauge: ours A = A_peft / sqrt(k), B = B_peft sqrt(k). Everything is compared exactly through that.
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig

    preprocess_corda = peft_corda()
    model = tiny_llama(dtype=torch.float32)
    ours = copy.deepcopy(model)
    ids = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(3))
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=LLAMA_LINEAR,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=mode),
    )
    preprocess_corda(model, config, run_model=lambda: model(input_ids=ids))
    peft_model = get_peft_model(model, config)

    modules = {p: m for p, m in ours.named_modules() if p.split(".")[-1] in LLAMA_LINEAR}
    peaks: dict[str, float] = {}  # PEFT's normaliser: |max(x)| over the sequence's inputs

    def peak(path: str):
        def record(_: torch.nn.Module, args: tuple) -> None:
            peaks[path] = args[0].max().abs().item()

        return record

    hooks = [m.register_forward_pre_hook(peak(p)) for p, m in modules.items()]
    data = lx.init.gather(ours, modules, {"inputs"}, [{"input_ids": ids}], progress=False)
    for h in hooks:
        h.remove()
    for path, module in modules.items():
        f = corda(module.weight.detach(), 4, 8 / 4, data=data[path], mode=mode)
        layer = peft_model.base_model.model.get_submodule(path)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        root_k = math.sqrt(peaks[path] ** 2 / data[path].rows)
        signs = sign_match(f.B, B)
        rel = 1e-3 if "o_proj" in path else 2e-4  # o_proj's inputs are the worst conditioned
        torch.testing.assert_close(
            f.A * signs[:, None] * root_k, A, rtol=rel, atol=rel * A.abs().max().item()
        )
        torch.testing.assert_close(
            f.B * signs / root_k, B, rtol=rel, atol=rel * B.abs().max().item()
        )
        torch.testing.assert_close(f.base, layer.base_layer.weight, rtol=1e-4, atol=1e-5)
