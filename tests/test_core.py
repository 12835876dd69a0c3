"""The model verbs, target selection and the errors of bad input (each leaves the model unchanged)."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

import loraredux as lx
from tiny_models import adapted_names, assert_unchanged, snapshot, tiny_bert, tiny_llama

# ---------------------------------------------------------------------------------------- targets


def test_suffix_names_match_as_peft_does():
    model = tiny_llama()
    lx.adapt_(model, lx.config("lora", rank=2), targets=["q_proj", "v_proj"])
    assert adapted_names(model) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]


def test_regex_must_match_the_whole_path():
    model = tiny_llama()
    lx.adapt_(model, lx.config("lora", rank=2), targets=r"model\.layers\.1\.mlp\.(up|down)_proj")
    assert adapted_names(model) == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]


def test_all_linear_leaves_the_output_head_alone():
    model = tiny_llama()
    lx.adapt_(model, lx.config("lora", rank=2), targets="all-linear", exclude=["o_proj"])
    names = adapted_names(model)
    assert len(names) == 2 * 6  # q, k, v, gate, up, down per layer; o_proj excluded
    assert "lm_head" not in names and not any(n.endswith("o_proj") for n in names)
    bert = tiny_bert()
    lx.adapt_(bert, lx.config("lora", rank=2), targets="all-linear")
    assert "classifier" not in adapted_names(bert)


def test_no_match_names_the_closest_modules():
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"q_proj"):
        lx.adapt_(model, lx.config("lora", rank=2), targets=["q_prj"])
    assert_unchanged(model, snap)


def test_a_container_match_is_a_type_error():
    model = tiny_llama()
    with pytest.raises(TypeError, match=r"self_attn.*LlamaAttention"):
        lx.adapt_(model, lx.config("lora", rank=2), targets=["self_attn"])


def test_adapting_an_adapted_layer_is_refused():
    model = tiny_llama()
    lx.adapt_(model, lx.config("lora", rank=2), targets=["q_proj"])
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already adapted"):
        lx.adapt_(model, lx.config("lora", rank=2), targets=["q_proj"])
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="already adapted"):
        lx.LoRA(model.model.layers[0].self_attn.q_proj, lx.config("lora", rank=2))


def test_two_adaptations_compose_and_merge():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 5))
    lx.adapt_(model, lx.config("lora", rank=2), targets=["q_proj"])
    lx.adapt_(model, lx.config("lora", rank=3, rslora=True), targets=["down_proj"])
    for p in lx.trainable_parameters(model).values():
        nn.init.normal_(p)
    expected = model(ids).logits
    lx.merge_(model)
    torch.testing.assert_close(model(ids).logits, expected)
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------- patterns


def test_rank_and_alpha_patterns_follow_peft_matching():
    model = tiny_llama()
    lx.adapt_(
        model,
        lx.config("lora", rank=2, alpha=4),
        targets=["q_proj", "v_proj"],
        rank_pattern={r"layers\.1\.self_attn\.q_proj": 5, "v_proj": 3, "q_proj": 1},
        alpha_pattern={"v_proj": 9},
    )
    got = {n: (a.config.rank, a.config.alpha) for n, a in lx.adapters(model)}
    assert got["model.layers.0.self_attn.q_proj"] == (1, 4)  # only the generic key matches
    assert got["model.layers.1.self_attn.q_proj"] == (5, 4)  # the first matching key wins
    assert got["model.layers.0.self_attn.v_proj"] == (3, 9)
    assert model.model.layers[1].self_attn.q_proj.A.shape == (5, 16)


@pytest.mark.parametrize(
    ("pattern", "error", "message"),
    [
        ({"q_proj": 0}, ValueError, r"self_attn\.q_proj: lora: rank must be an integer"),
        (
            {"q_proj(": 4},
            ValueError,
            r"rank_pattern key 'q_proj\(' is not a valid regular expression",
        ),
        ({3: 4}, TypeError, "rank_pattern keys must be non-empty strings"),
        (["q_proj"], TypeError, "rank_pattern must be a dict"),
    ],
)
def test_bad_patterns_are_named_and_change_nothing(pattern, error, message):
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(error, match=message):
        lx.adapt_(model, lx.config("lora", rank=2), targets=["q_proj"], rank_pattern=pattern)
    assert_unchanged(model, snap)


def test_pattern_key_does_not_match_a_mere_substring():
    model = tiny_llama()
    lx.adapt_(model, lx.config("lora", rank=2), targets=["q_proj"], rank_pattern={"proj": 4})
    assert {a.config.rank for _, a in lx.adapters(model)} == {2}


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("rank", [0, -1, 2.5, True])
def test_bad_rank_is_refused(rank):
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        lx.config("lora", rank=rank)


def test_rank_above_the_layer_limit_names_the_layer_and_changes_nothing():
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"k_proj.*rank 9 is above min\(in, out\) = 8"):
        lx.adapt_(model, lx.config("lora", rank=9), targets=["q_proj", "k_proj"])
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="above min"):
        lx.adapt_(model, lx.config("lora", rank=2), targets=["k_proj"], rank_pattern={"k_proj": 99})
    assert_unchanged(model, snap)


def test_unknown_method_and_field_are_explained():
    with pytest.raises(ValueError, match=r"unknown method 'lorax'.*'lora'"):
        lx.config("lorax")
    with pytest.raises(ValueError, match=r"no field\(s\) \['r'\].*'rank'"):
        lx.config("lora", r=8)
    with pytest.raises(ValueError, match="alpha"):
        lx.config("lora", alpha=float("nan"))
    with pytest.raises(ValueError, match="dropout"):
        lx.config("lora", dropout=1.0)


def test_unsupported_layer_type():
    with pytest.raises(TypeError, match="Conv2d"):
        lx.LoRA(nn.Conv2d(3, 3, 3), lx.config("lora", rank=2))


def test_failed_prepare_leaves_the_model_unchanged():
    model = tiny_bert()
    snap = snapshot(model)

    def fail(built, saved):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        lx.adapt_(model, lx.config("lora"), ["query"], modules_to_save=["classifier"], prepare=fail)
    assert_unchanged(model, snap)


def test_state_dict_mismatch_is_named_and_nothing_loads():
    model = tiny_llama()
    lx.adapt_(model, lx.config("lora", rank=2), targets=["q_proj"])
    state = lx.adapter_state_dict(model)
    before = {k: v.clone() for k, v in state.items()}
    bad = {k: torch.ones_like(v) for k, v in state.items()}
    bad["model.layers.0.self_attn.q_proj.B"] = torch.ones(16, 3, dtype=torch.float64)
    del bad["model.layers.1.self_attn.q_proj.A"]
    bad["nonsense.A"] = torch.ones(1)
    with pytest.raises(ValueError, match=r"missing.*layers\.1.*unexpected.*nonsense.*\(16, 3\)"):
        lx.load_adapter_state_dict(model, bad)
    for k, v in lx.adapter_state_dict(model).items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (float("nan"), r"q_proj\.B' holds 1 NaN or infinite"),
        (float("-inf"), r"q_proj\.B' holds 1 NaN or infinite"),
        ("int64", r"dtype mismatch.*q_proj\.B: file torch\.int64 vs layer torch\.float64"),
        ("complex64", r"dtype mismatch.*complex64"),
    ],
)
def test_state_dict_values_are_checked_before_anything_loads(value, message):
    model = lx.adapt_(tiny_llama(), lx.config("lora", rank=2), targets=["q_proj"])
    snap = snapshot(model)
    bad = {k: torch.ones_like(v) for k, v in lx.adapter_state_dict(model).items()}
    key = "model.layers.1.self_attn.q_proj.B"
    if isinstance(value, float):
        bad[key][0, 0] = value
    else:
        bad[key] = bad[key].to(getattr(torch, value))
    with pytest.raises(ValueError, match=message):
        lx.load_adapter_state_dict(model, bad)
    assert_unchanged(model, snap)
    if isinstance(value, float):  # the escape hatch loads it as it is
        lx.load_adapter_state_dict(model, bad, allow_nonfinite=True)
        assert not torch.isfinite(model.model.layers[1].self_attn.q_proj.B).all()


def test_a_state_whose_base_move_fails_in_the_last_layer_changes_nothing():
    """PiSSA: each layer moves its base by the loaded A0, B0. Factors too large for the base in the last layer
    are refused, and every layer (adapter tensors, base weights, moved flags) is as it was before the call."""
    model = lx.adapt_(tiny_llama(), lx.config("lora", rank=2, init="pissa"), ["q_proj", "v_proj"])
    snap = snapshot(model)
    moved = {p: a._moved for p, a in lx.adapters(model)}
    state = {k: v.clone() + 0.01 for k, v in lx.adapter_state_dict(model).items()}
    state["model.layers.1.self_attn.v_proj.B0"] *= 1e200
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.v_proj'.*too large for this base"):
        lx.load_adapter_state_dict(model, state)
    assert_unchanged(model, snap)
    assert {p: a._moved for p, a in lx.adapters(model)} == moved
    assert not any("_pending_base" in vars(a) for _, a in lx.adapters(model))
    state["model.layers.1.self_attn.v_proj.B0"] /= 1e200  # the same state, fixed, loads
    lx.load_adapter_state_dict(model, state)
    assert torch.equal(
        lx.adapter_state_dict(model)["model.layers.1.self_attn.v_proj.B0"],
        state["model.layers.1.self_attn.v_proj.B0"],
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rank": "8"}, "rank must be an integer >= 1, got '8'"),
        ({"alpha": [8]}, "alpha must be a finite number > 0"),
        ({"rslora": "false"}, "lora: rslora must be true or false, got str 'false'"),
        ({"dropout": "0.1"}, "lora: dropout must be a number, got str '0.1'"),
        ({"init_options": [1]}, "lora: init_options must be a dict"),
        ({"init": None}, "init must be a name"),
    ],
)
def test_config_fields_of_the_wrong_type_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        lx.config("lora", **fields)
    with pytest.raises(ValueError, match=message):
        lx.config_from_dict({"method": "lora", **fields})


def test_every_method_checks_its_field_types():
    """The generic check reads the dataclass annotations, so every registered method refuses a string where a
    boolean belongs (the value `bool("false")` would read as True)."""
    checked = 0
    for method in lx.available_methods():
        for field in dataclasses.fields(lx.core.config_class(method)):
            if field.type == "bool":
                with pytest.raises(
                    ValueError, match=rf"{method}: {field.name} must be true or false"
                ):
                    lx.config(method, **{field.name: "false"})
                checked += 1
    assert checked >= 5


def test_config_from_dict_refuses_a_method_that_is_no_string():
    with pytest.raises(ValueError, match="'method' must be a string, got list"):
        lx.config_from_dict({"method": ["lora"]})
    with pytest.raises(ValueError, match="must be an object of fields, got list"):
        lx.config_from_dict([("method", "lora")])


def test_merge_or_unadapt_without_adapters():
    with pytest.raises(ValueError, match="no adapter"):
        lx.merge_(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no adapter"):
        lx.unadapt_(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------- modules to save


def test_modules_to_save_train_a_copy_and_unadapt_restores_the_original():
    model = tiny_bert()
    ids = torch.randint(0, 50, (2, 6))
    base_logits = model(ids).logits
    original_head = model.classifier
    lx.adapt_(model, lx.config("lora", rank=2), targets=["query"], modules_to_save=["classifier"])
    assert isinstance(model.classifier, lx.SavedModule)
    trainable = lx.trainable_parameters(model)
    assert {"classifier.module.weight", "classifier.module.bias"} <= set(trainable)
    assert not any(n.startswith("classifier.original") for n in trainable)
    with torch.no_grad():
        model.classifier.module.weight.add_(1.0)
    assert not torch.allclose(model(ids).logits, base_logits)
    with lx.disabled(model):
        torch.testing.assert_close(model(ids).logits, base_logits)
    state = lx.adapter_state_dict(model)
    assert "classifier.module.weight" in state and "classifier.original.weight" not in state
    lx.unadapt_(model)
    assert model.classifier is original_head
    torch.testing.assert_close(model(ids).logits, base_logits)


def test_merge_keeps_the_trained_head():
    model = tiny_bert()
    ids = torch.randint(0, 50, (2, 6))
    lx.adapt_(model, lx.config("lora", rank=2), targets=["query"], modules_to_save=["classifier"])
    with torch.no_grad():
        model.classifier.module.weight.add_(1.0)
        for _, a in lx.adapters(model):
            a.B.normal_()
    expected = model(ids).logits
    lx.merge_(model)
    assert isinstance(model.classifier, nn.Linear)
    torch.testing.assert_close(model(ids).logits, expected)


def test_unknown_module_to_save():
    model = tiny_bert()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"modules_to_save.*'head'"):
        lx.adapt_(model, lx.config("lora"), ["query"], modules_to_save=["head"])
    assert_unchanged(model, snap)


def test_deepcopy_of_an_adapted_model_is_independent():
    model = tiny_llama()
    lx.adapt_(model, lx.config("lora", rank=2), targets=["q_proj"])
    clone = copy.deepcopy(model)
    lx.unadapt_(clone)
    assert list(lx.adapters(model)) and not list(lx.adapters(clone))
    assert all(p.requires_grad for p in clone.parameters())
    assert not model.lm_head.weight.requires_grad
