"""AdaLoRA's identities (Zhang et al., arXiv 2303.10512): the SVD form, the orthogonality penalty, the importance
EMAs, the cubic budget schedule and the pruning; the allocator against PEFT's RankAllocator; fit, resume and files."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraredux as lx
from loraredux.adapters.adalora import AdaLoRA, RankAllocator, allocator
from loraredux.train import TrainConfig, epoch_batches, fit
from tiny_models import assert_unchanged, logits, snapshot, tiny_gpt2, tiny_llama

FACTORS = {"A": "lora_A", "E": "lora_E", "B": "lora_B"}


def randomized(a: AdaLoRA, seed: int = 0, scale: float = 1.0) -> AdaLoRA:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in FACTORS:
            p = getattr(a, name)
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return a


def svd_form(W0: torch.Tensor, a: AdaLoRA, alpha: float, r: int) -> torch.Tensor:
    """W0 + alpha / (r + 1e-5) * sum_i λ_i p_i q_i^T, one rank-one term per triplet (P = B, Q = A)."""
    W = W0.clone()
    for i in range(r):
        W = W + alpha / (r + 1e-5) * a.E[i, 0] * torch.outer(a.B[:, i], a.A[i, :])
    return W


class Stack(nn.Module):
    """Three linear layers of different shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 7)
        self.c = nn.Linear(7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def stack(**cfg) -> nn.Module:
    torch.manual_seed(0)
    model = Stack().double()
    return lx.adapt_(model, lx.config("adalora", **cfg), ["a", "b", "c"])


# ----------------------------------------------------------------------------------------------- the layer


@given(
    n_in=st.integers(1, 10),
    n_out=st.integers(1, 10),
    data=st.data(),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    bias=st.booleans(),
)
def test_the_layer_is_the_svd_form_for_all_shapes(n_in, n_out, data, lead, bias):
    r = data.draw(st.integers(1, min(n_in, n_out)))
    pruned = data.draw(st.lists(st.booleans(), min_size=r, max_size=r))
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out, bias=bias).double()
    a = randomized(AdaLoRA(base, lx.config("adalora", init_r=r, target_r=1, alpha=3.0)))
    with torch.no_grad():
        a.E[torch.tensor(pruned)] = 0.0
    W = svd_form(base.weight, a, 3.0, r)
    torch.testing.assert_close(a.effective_weight(), W, rtol=1e-12, atol=1e-12)
    x = torch.randn(*lead, n_in, dtype=torch.float64)
    expected = x @ W.T + (base.bias if bias else 0)
    torch.testing.assert_close(a(x), expected, rtol=1e-10, atol=1e-10)
    # rank(ΔW) <= number of nonzero singular values
    assert torch.linalg.matrix_rank(a.delta_weight()) <= r - sum(pruned)


def test_conv1d_base_uses_the_transposed_weight():
    conv = Conv1D(5, 7).double()  # in 7, out 5, weight (7, 5)
    nn.init.normal_(conv.bias)
    a = randomized(AdaLoRA(conv, lx.config("adalora", init_r=3, target_r=1)))
    x = torch.randn(2, 4, 7, dtype=torch.float64)
    W = svd_form(conv.weight.T, a, 8.0, 3)
    torch.testing.assert_close(a(x), x @ W.T + conv.bias, rtol=1e-10, atol=1e-10)
    assert isinstance(a.merged(), Conv1D)


def test_identity_at_init_with_the_authors_initialisation():
    torch.manual_seed(0)
    base = nn.Linear(300, 200).double()
    a = AdaLoRA(base, lx.config("adalora", init_r=40))
    assert torch.count_nonzero(a.E) == 0  # Λ = 0: W' = W0
    torch.testing.assert_close(a.effective_weight(), base.weight, rtol=0, atol=0)
    for p in (a.A, a.B):  # N(0, 0.02^2)
        torch.testing.assert_close(p.std().item(), 0.02, rtol=0.03, atol=0)
        assert abs(p.mean().item()) < 1e-3
    assert a.scale == 8.0 / (40 + 1e-5)  # lora_alpha / (ranknum + 1e-5)


def test_dropout_acts_on_the_adapter_input_only():
    base = nn.Linear(10, 4).double()
    a = randomized(AdaLoRA(base, lx.config("adalora", init_r=3, dropout=0.5, target_r=1)))
    x = torch.randn(8, 10, dtype=torch.float64)
    torch.manual_seed(5)
    y = a(x)
    torch.manual_seed(5)
    h = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(y, base(x) + a.scale * ((h @ a.A.T) * a.E.T) @ a.B.T)


def test_parameter_count_is_r_in_plus_out_plus_r_as_peft_counts_it():
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "v_proj", "down_proj"]
    # float32: in a float64 model PEFT's device/dtype move turns its ranknum into a trainable parameter.
    ref = peft.get_peft_model(
        tiny_llama(dtype=torch.float32),
        peft.AdaLoraConfig(init_r=5, target_modules=targets, total_step=10),
    )
    model = lx.adapt_(tiny_llama(), lx.config("adalora", init_r=5), targets)
    ours = sum(p.numel() for p in lx.trainable_parameters(model).values())
    formula = sum(
        a.config.parameter_count(a.in_features, a.out_features) for _, a in lx.adapters(model)
    )
    assert ours == formula == ref.get_nb_trainable_parameters()[0]
    assert formula == sum(5 * (a.in_features + a.out_features) + 5 for _, a in lx.adapters(model))


@pytest.mark.parity
def test_layer_output_equals_peft_svdlinear():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 9)).double()
    ref = peft.inject_adapter_in_model(
        peft.AdaLoraConfig(init_r=4, lora_alpha=6, target_modules=["0"], total_step=10),
        copy.deepcopy(base),
    )
    ours = randomized(AdaLoRA(base[0], lx.config("adalora", init_r=4, alpha=6.0, target_r=2)))
    with torch.no_grad():
        for name, peft_name in FACTORS.items():
            getattr(ref[0], peft_name)["default"].copy_(getattr(ours, name))
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------- the penalty


def test_penalty_is_peft_average_of_frobenius_norms():
    model = stack(init_r=3, target_r=1, orth_reg_weight=0.7)
    layers = [a for _, a in lx.adapters(model)]
    for i, a in enumerate(layers):
        randomized(a, seed=i)
    eye = torch.eye(3, dtype=torch.float64)
    norms = [
        torch.linalg.norm(a.A @ a.A.T - eye) + torch.linalg.norm(a.B.T @ a.B - eye) for a in layers
    ]
    expected = 0.7 * sum(norms) / (2 * len(layers))  # mean over the 6 matrices, times the weight
    torch.testing.assert_close(lx.penalty(model), expected, rtol=1e-12, atol=0)
    # each layer's own term: w * (its two norms) / (2 n)
    torch.testing.assert_close(layers[1].penalty(), 0.7 * norms[1] / 6, rtol=1e-12, atol=0)


def test_penalty_vanishes_for_orthonormal_P_and_Q_and_without_weight():
    model = stack(init_r=3, target_r=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, a in lx.adapters(model):
            a.A.copy_(
                torch.linalg.qr(torch.randn(a.in_features, 3, generator=g, dtype=torch.float64))[
                    0
                ].T
            )
            a.B.copy_(
                torch.linalg.qr(torch.randn(a.out_features, 3, generator=g, dtype=torch.float64))[0]
            )
    assert float(lx.penalty(model).detach()) < 1e-14
    with torch.no_grad():
        model.a.A[0] *= 2  # no longer orthonormal: ||A A^T - I||_F = 3
    torch.testing.assert_close(float(lx.penalty(model).detach()), 0.5 * 3.0 / 6, rtol=1e-12, atol=0)
    assert lx.penalty(stack(init_r=3, target_r=1, orth_reg_weight=0.0)) is None


# ----------------------------------------------------------------------------------------------- the allocator


def test_one_allocator_per_adapt_call_with_no_state_of_its_own():
    model = stack(init_r=3, target_r=2, total_step=10)
    alloc = allocator(model)
    assert [m for m in model.modules() if isinstance(m, RankAllocator)] == [alloc]
    assert all(a.allocator is alloc for _, a in lx.adapters(model))
    assert list(alloc.parameters()) == [] and list(alloc.buffers()) == []
    assert list(alloc.children()) == []  # the layers are a plain list, not submodules
    assert alloc.names == ["a", "b", "c"] and (alloc.init_bgt, alloc.target_bgt) == (9, 6)
    assert not any(k.startswith("allocator") or ".allocator." in k for k in model.state_dict())
    with pytest.raises(ValueError, match="0 AdaLoRA rank allocators"):
        allocator(Stack())


def test_two_adapt_calls_make_two_groups_and_allocator_refuses_to_choose():
    torch.manual_seed(0)
    model = Stack().double()
    lx.adapt_(model, lx.config("adalora", init_r=2, target_r=1), ["a"])
    lx.adapt_(model, lx.config("adalora", init_r=2, target_r=1), ["b", "c"])
    assert model.a.allocator is not model.b.allocator is model.c.allocator
    with pytest.raises(ValueError, match="2 AdaLoRA rank allocators"):
        allocator(model)


def test_budget_schedule_is_the_cubic_of_the_paper():
    alloc = allocator(stack(init_r=4, target_r=2, tinit=2, tfinal=3, total_step=12, deltaT=2))
    b0, bT, ti, tf, T = 12, 6, 2, 3, 12
    for t in range(1, 16):
        budget, mask = alloc.budget_schedule(t)
        if t <= ti:
            assert (budget, mask) == (b0, False)
        elif t > T - tf:
            assert (budget, mask) == (bT, True)
        else:
            assert budget == math.floor(bT + (b0 - bT) * (1 - (t - ti) / (T - ti - tf)) ** 3)
            assert mask == (t % 2 == 0)
    assert alloc.budget_schedule(T - tf)[0] == bT  # the budget reaches the target


def constant_gradients(model: nn.Module, c: dict[str, torch.Tensor]) -> None:
    """Set every weight of triplet i of layer `path` to 1 and its gradient to c[path][i]: then I(w) = c_i on
    row i of A, column i of B and λ_i (λ_i once it is pruned: 0)."""
    for path, a in lx.adapters(model):
        ci = c[path].to(a.A.dtype)
        with torch.no_grad():
            a.A.fill_(1.0)
            a.B.fill_(1.0)
            a.E.masked_fill_(a.mask.view(-1, 1), 1.0)  # pruned λ stay 0, as after masking
        a.A.grad = ci.view(-1, 1).expand_as(a.A).clone()
        a.B.grad = ci.view(1, -1).expand_as(a.B).clone()
        a.E.grad = ci.view(-1, 1).clone()


def test_budget_reaches_the_target_and_keeps_the_most_important_triplets():
    T, ti, tf = 12, 2, 3
    model = stack(init_r=4, target_r=2, tinit=ti, tfinal=tf, total_step=T, beta1=0.8, beta2=0.7)
    alloc = allocator(model)
    # Distinct sensitivities, uneven across layers: the top 6 of 12 are a:3, b:2, c:1.
    c = {
        "a": torch.tensor([9.0, 8.5, 8.0, 1.0]),
        "b": torch.tensor([7.5, 0.5, 7.0, 2.0]),
        "c": torch.tensor([3.0, 6.5, 1.5, 2.5]),
    }
    everything = torch.cat(list(c.values()))
    for t in range(1, T + 1):
        constant_gradients(model, c)
        alloc.update_and_allocate(t)
        budget, mask_now = alloc.budget_schedule(t)
        nonzero = sum(int(torch.count_nonzero(a.E)) for _, a in lx.adapters(model))
        if mask_now:
            assert nonzero == budget, t  # the budget is exactly the number of unmasked λ
            threshold = everything.sort(descending=True).values[budget - 1]
            for path, a in lx.adapters(
                model
            ):  # ...and they are the `budget` most sensitive triplets
                assert a.mask.tolist() == (c[path] >= threshold).tolist(), (t, path)
        if t == 2:  # warmup: Ī and Ū follow their recursions entry by entry
            ipt = c["a"].double().view(-1, 1)
            avg1 = 0.2 * ipt
            unc1 = 0.3 * (ipt - avg1).abs()
            avg2 = 0.8 * avg1 + 0.2 * ipt
            unc2 = 0.7 * unc1 + 0.3 * (ipt - avg2).abs()
            torch.testing.assert_close(model.a.exp_avg_ipt_E, avg2, rtol=1e-14, atol=0)
            torch.testing.assert_close(model.a.exp_avg_unc_E, unc2, rtol=1e-14, atol=0)
            assert all(a.rank == 4 for _, a in lx.adapters(model))
    assert alloc.ranks() == {"a": 3, "b": 2, "c": 1}
    assert sum(alloc.ranks().values()) == 2 * 3  # target_r * layers
    assert all(
        float(a.exp_avg_ipt_A.abs().max()) == 0 for _, a in lx.adapters(model)
    )  # reset at T - tf


def test_final_phase_keeps_the_final_pattern():
    model = stack(init_r=3, target_r=1, tinit=0, tfinal=2, total_step=5)
    alloc = allocator(model)
    c = {p: torch.tensor([3.0, 1.0, 2.0]) * (k + 1) for k, p in enumerate(["a", "b", "c"])}
    for t in range(1, 4):
        constant_gradients(model, c)
        alloc.update_and_allocate(t)
    final = {p: a.mask.clone() for p, a in lx.adapters(model)}
    with torch.no_grad():
        for _, a in lx.adapters(model):
            a.E.fill_(5.0)  # training moved every λ, the dropped ones too
    alloc.update_and_allocate(4)  # no gradient needed after T - t_final
    for p, a in lx.adapters(model):
        assert torch.equal(a.mask, final[p])
        assert a.E.view(-1).tolist() == [5.0 if m else 0.0 for m in final[p].tolist()]


def test_missing_total_step_or_gradient_is_a_clear_error():
    model = stack(init_r=2, target_r=1)
    with pytest.raises(ValueError, match="total_step is None"):
        allocator(model).update_and_allocate(1)
    with pytest.raises(ValueError, match="target_r=3 exceeds init_r=2"):
        allocator(stack(init_r=2, target_r=3, total_step=5)).update_and_allocate(1)
    model = stack(init_r=2, target_r=1, total_step=5)
    with pytest.raises(ValueError, match=r"no gradient for \['a.A', 'a.E', 'a.B'"):
        allocator(model).update_and_allocate(1)


@pytest.mark.parity
def test_allocator_and_penalty_match_peft_step_by_step():
    """Identical weights and gradients in both libraries: the same E, masks and EMAs after every step."""
    peft = pytest.importorskip("peft")
    kw = {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 3, "total_step": 12, "deltaT": 2}
    targets = ["q_proj", "v_proj"]
    # CAUSAL_LM: only a task-specific PeftModel runs AdaLoraModel.forward, which adds the regulariser.
    ref = peft.get_peft_model(
        tiny_llama(), peft.AdaLoraConfig(target_modules=targets, task_type="CAUSAL_LM", **kw)
    )
    ours = lx.adapt_(tiny_llama(), lx.config("adalora", **kw), targets)
    pairs = {path: (a, ref.base_model.model.get_submodule(path)) for path, a in lx.adapters(ours)}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a, m in pairs.values():
            for name, peft_name in FACTORS.items():
                getattr(a, name).copy_(0.3 * torch.randn(getattr(a, name).shape, generator=g))
                getattr(m, peft_name)["default"].copy_(getattr(a, name))
    ids = torch.randint(0, 64, (2, 7), generator=g)
    peft_params = [p for n, p in ref.named_parameters() if "lora_" in n]  # not PEFT's ranknum
    sgd_ref = torch.optim.SGD(peft_params, lr=0.05)
    sgd_ours = torch.optim.SGD(list(lx.trainable_parameters(ours).values()), lr=0.05)
    alloc, ipt = allocator(ours), ref.base_model.rankallocator
    masked_unevenly = False
    for step in range(1, 13):
        sgd_ref.zero_grad()
        sgd_ours.zero_grad()
        ref(input_ids=ids, labels=ids).loss.backward()
        (ours(input_ids=ids, labels=ids).loss + lx.penalty(ours)).backward()
        with torch.no_grad():
            for a, m in pairs.values():
                for name, peft_name in FACTORS.items():
                    ours_grad, ref_grad = (
                        getattr(a, name).grad,
                        getattr(m, peft_name)["default"].grad,
                    )
                    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-9, atol=1e-11)
                    ours_grad.copy_(ref_grad)  # identical gradients from here on
        sgd_ref.step()
        sgd_ours.step()
        ref.base_model.update_and_allocate(step)
        alloc.update_and_allocate(step)
        pattern = ref.peft_config["default"].rank_pattern
        for path, (a, m) in pairs.items():
            for name, peft_name in FACTORS.items():
                assert torch.equal(getattr(a, name), getattr(m, peft_name)["default"]), (step, path)
                key = f"base_model.model.{path}.{peft_name}.default"
                if key in ipt.exp_avg_ipt:
                    assert torch.equal(getattr(a, f"exp_avg_ipt_{name}"), ipt.exp_avg_ipt[key])
                    assert torch.equal(getattr(a, f"exp_avg_unc_{name}"), ipt.exp_avg_unc[key])
            expected = pattern[f"{path}.lora_E.default"] if pattern else [True] * 4
            assert a.mask.tolist() == expected, (step, path)
        masked_unevenly |= len(set(alloc.ranks().values())) > 1
    assert sum(alloc.ranks().values()) == 2 * 4
    assert masked_unevenly  # the budget moved between layers, so the test compared real choices


# ----------------------------------------------------------------------------------------------- training


def regression_batches(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    y = torch.randn(64, 5, generator=g, dtype=torch.float64)
    return epoch_batches(list(range(64)), 8, lambda i: (x[i], y[i]), seed=seed)


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def test_fit_steps_the_allocator_to_the_target_without_a_manual_call():
    model = stack(init_r=3, target_r=1, tinit=2, tfinal=2, total_step=10)
    with torch.no_grad():
        for i, (_, a) in enumerate(lx.adapters(model)):
            a.E.copy_(torch.full_like(a.E, 0.1 * (i + 1)))
    fit(model, regression_batches(), mse, TrainConfig(steps=10, lr=1e-2), progress=False)
    alloc = allocator(model)
    assert sum(alloc.ranks().values()) == 3  # target_r * layers, from 9
    for _, a in lx.adapters(model):
        assert torch.count_nonzero(a.E[~a.mask]) == 0  # dropped λ are 0 after the last step


def test_resume_with_the_allocator_is_bitwise_identical(tmp_path: Path):
    def make() -> nn.Module:
        return stack(init_r=3, target_r=1, tinit=1, tfinal=3, total_step=12, deltaT=2)

    cfg = TrainConfig(steps=12, lr=2e-2, checkpoint_every=4, seed=3)
    batches = regression_batches()
    model = make()
    full = fit(model, batches, mse, cfg, checkpoint_dir=tmp_path / "a", progress=False)

    def crashing(i: int):
        if i == 6:  # during step 7: the last checkpoint is step 4, mid-way through the budget phase
            raise RuntimeError("killed")
        return batches(i)

    with pytest.raises(RuntimeError, match="killed"):
        fit(make(), crashing, mse, cfg, checkpoint_dir=tmp_path / "b", progress=False)
    saved = load_file(tmp_path / "b" / "checkpoint" / "tensors.safetensors")
    assert (
        float(saved["model.b.exp_avg_ipt_A"].abs().max()) > 0
    )  # the EMAs were live: restoring matters
    assert not bool(saved["model.a.mask"].all()) or not bool(saved["model.c.mask"].all())
    again = make()
    resumed = fit(
        again, batches, mse, cfg, checkpoint_dir=tmp_path / "b", resume=True, progress=False
    )
    assert (full.losses, full.lrs) == (resumed.losses, resumed.lrs)
    ours, theirs = lx.adapter_state_dict(model), lx.adapter_state_dict(again)
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key


# ----------------------------------------------------------------------------------------------- files


@torch.no_grad()
def prune(model: nn.Module, patterns: dict[str, list[bool]]) -> None:
    for path, a in lx.adapters(model):
        if path in patterns:
            a.mask.copy_(torch.tensor(patterns[path]))
            a.apply_mask()


FILE_CASES = {
    "llama": (tiny_llama, ["q_proj", "v_proj"]),
    "gpt2-conv1d": (tiny_gpt2, ["c_attn", "c_fc"]),
}


@pytest.mark.parity
@pytest.mark.parametrize("pruned", [False, True])
@pytest.mark.parametrize("name", list(FILE_CASES))
def test_loraredux_adapter_loads_in_peft(name: str, pruned: bool, tmp_path: Path):
    peft = pytest.importorskip("peft")
    make, targets = FILE_CASES[name]
    model = lx.adapt_(make(), lx.config("adalora", init_r=4, target_r=2, total_step=20), targets)
    paths = [p for p, _ in lx.adapters(model)]
    for i, (_, a) in enumerate(lx.adapters(model)):
        randomized(a, seed=i, scale=0.3)
    if pruned:
        prune(model, {paths[0]: [True, False, True, False], paths[1]: [False] * 4})
    expected = logits(model)

    lx.save_adapter(model, tmp_path)  # auto: AdaLoRA has a PEFT form
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and (config["init_r"], config["target_r"]) == (4, 2)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    if pruned:
        assert config["rank_pattern"] == {
            f"{paths[0]}.lora_E": [True, False, True, False],
            f"{paths[1]}.lora_E": [False] * 4,
        }
        assert (
            tensors[f"base_model.model.{paths[0]}.lora_A"].shape[0] == 2
        )  # resized as PEFT saves it
        assert tensors[f"base_model.model.{paths[1]}.lora_B"].shape[1] == 0
    else:
        assert config["rank_pattern"] is None
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-10, atol=1e-10)

    back = lx.load_adapter(make(), tmp_path)  # and back: the same masks and outputs
    torch.testing.assert_close(logits(back), expected, rtol=1e-10, atol=1e-10)
    assert [a.mask.tolist() for _, a in lx.adapters(back)] == [
        a.mask.tolist() for _, a in lx.adapters(model)
    ]


@pytest.mark.parity
@pytest.mark.parametrize("name", list(FILE_CASES))
def test_peft_adapter_with_pruned_ranks_loads_in_loraredux(name: str, tmp_path: Path):
    peft = pytest.importorskip("peft")
    make, targets = FILE_CASES[name]
    config = peft.AdaLoraConfig(
        init_r=4, target_r=2, tinit=1, tfinal=1, total_step=6, target_modules=targets
    )
    ref = peft.get_peft_model(make(), config)
    params = [p for n, p in ref.named_parameters() if "lora_" in n]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    sgd = torch.optim.SGD(params, lr=0.05)
    ids = torch.randint(0, 64, (2, 7), generator=g)
    for step in range(1, 7):  # PEFT's own loop: masks, then the final pattern
        sgd.zero_grad()
        ref(input_ids=ids, labels=ids).loss.backward()
        sgd.step()
        ref.base_model.update_and_allocate(step)
    pattern = {
        k.removesuffix(".default"): v for k, v in ref.peft_config["default"].rank_pattern.items()
    }
    assert sum(map(sum, pattern.values())) == 2 * len(pattern)
    ref.eval()
    expected = logits(ref)
    ref.save_pretrained(tmp_path)

    model = lx.load_adapter(make(), tmp_path)
    torch.testing.assert_close(logits(model), expected, rtol=1e-10, atol=1e-10)
    assert {f"{p}.lora_E": a.mask.tolist() for p, a in lx.adapters(model)} == pattern
    for _, a in lx.adapters(model):  # dropped triplets are absent: all zero
        assert torch.count_nonzero(a.A[~a.mask]) + torch.count_nonzero(a.B[:, ~a.mask]) == 0


def test_native_file_holds_the_allocator_state(tmp_path: Path):
    model = stack(init_r=3, target_r=1, total_step=6)
    for i, (_, a) in enumerate(lx.adapters(model)):
        randomized(a, seed=i)
        with torch.no_grad():
            a.exp_avg_ipt_B.fill_(0.1 * (i + 1))
    prune(model, {"b": [False, True, True]})
    lx.save_adapter(model, tmp_path, format="native")
    torch.manual_seed(0)
    back = lx.load_adapter(Stack().double(), tmp_path)
    ours, theirs = lx.adapter_state_dict(model), lx.adapter_state_dict(back)
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert allocator(back).ranks() == {"a": 3, "b": 2, "c": 3}


def test_peft_format_needs_total_step():
    model = stack(init_r=2, target_r=1)
    with pytest.raises(ValueError, match="total_step"):
        lx.save_adapter(model, "/nonexistent/never-written", format="peft")


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"init_r": 0}, "init_r must be an integer >= 1"),
        ({"beta1": 1.0}, r"beta1 must be in \(0, 1\)"),
        ({"beta2": 0.0}, r"beta2 must be in \(0, 1\)"),
        ({"deltaT": 0}, "deltaT must be an integer >= 1"),
        ({"orth_reg_weight": -0.1}, "orth_reg_weight must be >= 0"),
        ({"total_step": 10, "tinit": 5, "tfinal": 5}, "no budget phase"),
        ({"total_step": 2.5}, "total_step must be an integer"),
        ({"alpha": 0.0}, "alpha must be a finite number > 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_config_values_raise(fields, message):
    with pytest.raises(ValueError, match=message):
        lx.config("adalora", **fields)


def test_a_layer_too_small_for_init_r_is_refused_and_the_model_is_unchanged():
    torch.manual_seed(0)
    model = Stack().double()
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"c: adalora cannot adapt .*init_r 6 is above min\(in, out\) = 5"
    ):
        lx.adapt_(model, lx.config("adalora", init_r=6, target_r=1), ["a", "b", "c"])
    assert_unchanged(model, before)


def test_per_layer_rank_or_alpha_patterns_are_refused():
    cfg = lx.config("adalora", init_r=2, target_r=1)
    with pytest.raises(ValueError, match="no per-layer rank"):
        lx.adapt_(Stack(), cfg, ["a", "b"], rank_pattern={"a": 1})
    with pytest.raises(ValueError, match="one alpha for all layers"):
        lx.adapt_(Stack(), cfg, ["a", "b"], alpha_pattern={"a": 3.0})
