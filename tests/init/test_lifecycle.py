"""Every registered initialiser through the model verbs and the files, on a tiny Llama (float64).

For each init: W' = W0 at init where it promises it; `lx.disabled` computes the original model and `lx.unadapt_`
restores the original weights even when the init moved the base; files written in PEFT's format (a moved base
converted to a plain rank-2r LoRA on the original base) load in PEFT with identical logits; loraredux's own files
and `load_adapter_state_dict` (resume) restore the same model; a failure leaves the model untouched.
"""

from __future__ import annotations

import copy

import pytest
import torch

import loraredux as lx
from tiny_models import assert_unchanged, logits, randomize, snapshot, tiny_llama, token_ids

INITS = lx.init.available()
TARGETS = "all-linear"


def calibration() -> list[dict[str, torch.Tensor]]:
    ids = token_ids()
    return [{"input_ids": ids, "labels": ids}, {"input_ids": ids.flip(1), "labels": ids.flip(1)}]


# Methods whose low-rank pair takes a named init (LoRA's own pair; DoRA's direction; AdaLoRA's P Λ Q; PoLAR's X Θ Y^T).
METHODS = ["lora", "dora", "adalora", "polar"]
CASES = [
    (m, n)
    for m in METHODS
    for n in INITS
    if not (
        m == "adalora" and lx.init.get(n).allocate is not None
    )  # AdaLoRA allocates its own ranks
]


def method_config(method: str, name: str) -> lx.AdapterConfig:
    if method == "adalora":
        return lx.config(method, init_r=2, target_r=1, alpha=3.0, init=name)
    return lx.config(method, rank=2, alpha=3.0, init=name)


def adapt(model: torch.nn.Module, name: str, method: str = "lora", **kwargs):
    spec = lx.init.get(name)
    data = {"calibration": calibration()} if spec.needs else {}
    return lx.adapt_(model, method_config(method, name), targets=TARGETS, **data, **kwargs)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("method", "name"), CASES)
def test_identity_disabled_and_unadapt(method: str, name: str) -> None:
    spec = lx.init.get(name)
    model = tiny_llama()
    before, original = logits(model), weights(model)
    torch.manual_seed(0)
    adapt(model, name, method)
    if spec.identity:
        torch.testing.assert_close(logits(model), before, rtol=1e-10, atol=1e-10)
    moved = [a for _, a in lx.adapters(model) if getattr(a, "_moved", False)]
    assert bool(moved) == spec.moves_base
    randomize(model)  # trained adapters: disabled / unadapt must not depend on A, B
    with lx.disabled(model):
        torch.testing.assert_close(logits(model), before, rtol=1e-10, atol=1e-10)
    lx.unadapt_(model)
    after = model.state_dict()
    assert list(after) == list(original)
    for key, value in original.items():
        torch.testing.assert_close(after[key], value, rtol=1e-12, atol=1e-12, msg=key)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", [n for n in INITS if lx.init.get(n).moves_base])
def test_moved_base_is_the_residual(name: str) -> None:
    """The base layer holds W0 - s B0 A0 (exact inits): the init's return value, applied once."""
    spec = lx.init.get(name)
    model = tiny_llama()
    original = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")
    }
    adapt(model, name)
    for path, a in lx.adapters(model):
        W0 = original[path]
        torch.testing.assert_close(a.A0, a.A.detach(), rtol=0, atol=0)
        if spec.exact:
            rebuilt = a.base.weight + a.scale * a.B0 @ a.A0
            torch.testing.assert_close(rebuilt, W0, rtol=1e-12, atol=1e-12)
        assert a.base.weight is not None and not a.base.weight.requires_grad


@pytest.mark.parity
@pytest.mark.parametrize("name", INITS)
def test_peft_format_loads_in_peft_on_the_original_model(name: str, tmp_path) -> None:
    from peft import PeftModel

    spec = lx.init.get(name)
    model = tiny_llama()
    torch.manual_seed(0)
    adapt(model, name)
    randomize(model)
    if spec.moves_base and not spec.exact:
        with pytest.raises(ValueError, match="convert_to_lora=False"):
            lx.save_adapter(model, tmp_path, format="peft")
        return
    lx.save_adapter(model, tmp_path, format="peft")
    config = lx.io.read_adapter_config(tmp_path)
    ranks = {a.config.rank for _, a in lx.adapters(model)}
    assert config["r"] in ({2 * r for r in ranks} if spec.moves_base else ranks)
    assert config["init_lora_weights"] == ("gaussian" if name == "gaussian" else True)
    theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(theirs), logits(model), rtol=1e-9, atol=1e-9)
    # and back: our loader reads the converted file on the original model
    ours = lx.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(ours), logits(model), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("method", "name"), CASES)
def test_native_files_and_resume_restore_the_model(method: str, name: str, tmp_path) -> None:
    model = tiny_llama()
    torch.manual_seed(0)
    adapt(model, name, method)
    randomize(model)
    expected = logits(model)
    lx.save_adapter(model, tmp_path, format="native")
    loaded = lx.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-10, atol=1e-10)
    with lx.disabled(
        loaded
    ):  # a loaded adapter knows the original weights too (LoftQ recomputes them)
        torch.testing.assert_close(logits(loaded), logits(tiny_llama()), rtol=1e-10, atol=1e-10)
    # resume: a freshly adapted model (other random draws) takes the saved state and gives the same model
    fresh = tiny_llama()
    torch.manual_seed(1)
    adapt(fresh, name, method)
    lx.load_adapter_state_dict(fresh, lx.adapter_state_dict(model))
    torch.testing.assert_close(logits(fresh), expected, rtol=1e-10, atol=1e-10)
    lx.unadapt_(fresh)
    torch.testing.assert_close(logits(fresh), logits(tiny_llama()), rtol=1e-10, atol=1e-10)


def test_moved_base_can_be_written_unconverted(tmp_path) -> None:
    """convert_to_lora=False writes the rank-r factors, right on the moved (residual) base only."""
    model = tiny_llama()
    adapt(model, "pissa")
    randomize(model)
    lx.save_adapter(model, tmp_path, format="peft", convert_to_lora=False)
    assert lx.io.read_adapter_config(tmp_path)["r"] == 2
    residual = tiny_llama()
    for path, a in lx.adapters(model):
        residual.get_submodule(path).weight.data.copy_(a.base.weight)
    theirs = lx.load_adapter(residual, tmp_path)
    torch.testing.assert_close(logits(theirs), logits(model), rtol=1e-10, atol=1e-10)


def test_failed_adapt_leaves_the_weights_untouched() -> None:
    """PiSSA moves bases only once every layer is built: a layer that fails late changes nothing."""
    model = tiny_llama()
    before = snapshot(model)
    config = lx.config("lora", rank=2, init="pissa")
    with pytest.raises(ValueError, match="rank 17 is above"):
        lx.adapt_(model, config, targets=TARGETS, rank_pattern={"down_proj": 17})
    assert_unchanged(model, before)


def test_tied_weights_stay_with_the_other_module() -> None:
    """A moved base is a new parameter: the embedding tied to lm_head keeps W0."""
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    table = model.model.embed_tokens.weight.detach().clone()
    before = logits(model)
    lx.adapt_(model, lx.config("lora", rank=2, init="pissa"), targets=["lm_head"])
    assert torch.equal(model.model.embed_tokens.weight, table)
    torch.testing.assert_close(logits(model), before, rtol=1e-10, atol=1e-10)


def test_data_aware_init_needs_data_and_data_free_refuses_it() -> None:
    aware = [n for n in INITS if lx.init.get(n).needs]
    model = tiny_llama()
    before = snapshot(model)
    for name in aware:
        with pytest.raises(ValueError, match="calibration"):
            lx.adapt_(model, lx.config("lora", init=name), targets=TARGETS)
        assert_unchanged(model, before)
    with pytest.raises(ValueError, match="uses no data"):
        lx.adapt_(
            model, lx.config("lora", init="pissa"), targets=TARGETS, calibration=calibration()
        )
    assert_unchanged(model, before)


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown init 'pisa'"):
        lx.config("lora", init="pisa")
    with pytest.raises(ValueError, match=r"no option.*'niters'.*niter"):
        lx.config("lora", init="pissa", init_options={"niters": 2})
    with pytest.raises(ValueError, match="even rank"):
        lx.adapt_(tiny_llama(), lx.config("lora", rank=3, init="orthogonal"), targets=TARGETS)


def test_embedding_refuses_weight_inits_before_anything_changes() -> None:
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(TypeError, match="embedding"):
        lx.adapt_(model, lx.config("lora", rank=2, init="pissa"), targets=["embed_tokens"])
    assert_unchanged(model, before)


def test_dora_with_a_moved_base_keeps_the_function_and_the_norms() -> None:
    """DoRA over PiSSA: m = ||W_res + s B A||_c = ||W0||_c, so W' = W0 at init, and PEFT reads the file."""
    model = tiny_llama()
    before = logits(model)
    W0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lx.adapt_(model, lx.config("dora", rank=2, init="pissa"), targets=TARGETS)
    torch.testing.assert_close(logits(model), before, rtol=1e-10, atol=1e-10)
    q = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q.magnitude, W0.norm(dim=1), rtol=1e-12, atol=1e-12)
    model2 = copy.deepcopy(model)
    lx.unadapt_(model2)
    torch.testing.assert_close(logits(model2), before, rtol=1e-10, atol=1e-10)


def test_eva_redistributes_ranks_and_keeps_every_scale() -> None:
    """EVA's rho: ranks move between layers (budget r per layer, at most rho r each) and alpha follows the rank
    (PEFT's adjust_scaling_factors), so every layer keeps s = alpha / r; rank-0 layers stay plain."""
    model = tiny_llama()
    config = lx.config("lora", rank=2, alpha=3.0, init="eva", init_options={"rho": 2.0})
    lx.adapt_(model, config, targets=TARGETS, calibration=calibration())
    layers = dict(lx.adapters(model))
    ranks = {p: a.config.rank for p, a in layers.items()}
    assert len(set(ranks.values())) > 1 and max(ranks.values()) <= 4
    assert sum(ranks.values()) <= 2 * 14  # 14 linear layers in the tiny Llama
    for a in layers.values():
        assert a.scale == pytest.approx(3.0 / 2)
    plain = lx.config(
        "lora", rank=2, alpha=3.0, init="eva", init_options={"adjust_scaling_factors": False}
    )
    model = lx.adapt_(tiny_llama(), plain, targets=TARGETS, calibration=calibration())
    assert {a.scale for _, a in lx.adapters(model)} != {1.5}
    with pytest.raises(ValueError, match="allocates the ranks itself"):
        lx.adapt_(
            tiny_llama(), config, targets=TARGETS, calibration=calibration(), rank_pattern={"q": 4}
        )


@pytest.mark.parametrize("name", ["pissa", "corda"])
def test_adalora_with_a_moved_base_saves_natively(name: str, tmp_path) -> None:
    """PEFT's AdaLoRA format cannot hold a moved base on the original model: "auto" picks loraredux's own format,
    and an explicit PEFT save names the problem."""
    model = tiny_llama()
    adapt(model, name, "adalora")
    with pytest.raises(ValueError, match="save with format='native'"):
        lx.save_adapter(model, tmp_path / "peft", format="peft")
    lx.save_adapter(model, tmp_path / "auto")
    assert lx.io.read_adapter_config(tmp_path / "auto")["format"] == "loraredux"
    with pytest.raises(ValueError, match="has no rank field"):
        adapt(tiny_llama(), "eva", "adalora")


def test_adalora_and_polar_take_the_principal_triplets_from_pissa() -> None:
    """AdaLoRA's P, Q and PoLAR's X, Y are orthonormal, and Λ (Θ) holds W0's top singular values over s."""
    model = tiny_llama()
    W0 = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    S = torch.linalg.svdvals(W0)
    lx.adapt_(model, method_config("adalora", "pissa"), targets=["down_proj"])
    a = model.model.layers[0].mlp.down_proj
    eye = torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(a.B.T @ a.B, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.A @ a.A.T, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.E.flatten() * a.scale, S[:2], rtol=1e-10, atol=1e-12)
    model = lx.adapt_(tiny_llama(), method_config("polar", "pissa"), targets=["down_proj"])
    p = model.model.layers[0].mlp.down_proj
    torch.testing.assert_close(p.X.T @ p.X, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(p.Y.T @ p.Y, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        torch.linalg.svdvals(p.Theta) * p.scale, S[:2], rtol=1e-10, atol=1e-12
    )


def test_a_moved_base_frees_the_original_weight() -> None:
    """adapt_ keeps no reference to a replaced W0 (its memory is freed); a tied module keeps its own."""
    import gc
    import weakref

    model = tiny_llama()
    q = model.model.layers[0].self_attn.q_proj
    old = weakref.ref(q.weight)
    adapt(model, "pissa")
    gc.collect()
    assert old() is None
    lx.unadapt_(model)
    assert all(p.requires_grad for p in model.parameters())
