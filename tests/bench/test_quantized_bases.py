"""Trials on a quantized base: the spec's `bases` is checked before anything runs, a trial with base nf4 trains on
bitsandbytes 4-bit layers (the inits that move the base computed on the dense weights), the dense trials keep their
keys, and the report groups by base."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from loraredux.bench import Run, Trial, expand
from loraredux.bench.report import render
from loraredux.bench.suites import SPECS, execute
from loraredux.bench.suites import real as real_suites

bnn = pytest.importorskip("bitsandbytes.nn")

TINY_CLS = {"train_examples": 32, "eval_examples": 16, "batch_size": 8, "max_length": 16}
SPEC = {
    "suite": "classify",
    "problems": [{"name": "rotten_tomatoes", "options": TINY_CLS}],
    "ranks": [4],
    "lrs": [1e-3],
    "steps": 2,
}


def cls_trial(**kw):
    fields = {"suite": "classify", "problem": "rotten_tomatoes", "method": "lora", "rank": 4,
              "optimizer": "adamw", "lr": 1e-3, "seed": 0, "steps": 2, "problem_options": TINY_CLS}  # fmt: skip
    return Trial(**{**fields, **kw})


# -- the spec ---------------------------------------------------------------------------------------------------------


def test_bases_expand_into_the_grid_and_a_dense_trial_keeps_its_key():
    trials = expand({**SPEC, "bases": [None, "nf4"], "inits": [None, "pissa"]})
    assert [(t.base, t.init) for t in trials] == [
        (None, None), (None, "pissa"), ("nf4", None), ("nf4", "pissa")
    ]  # fmt: skip
    dense, quantized = trials[0], trials[2]
    # a dense base is left out of the canonical JSON, so stores written before bases existed still resume
    assert '"base"' not in dense.to_json() and '"base":"nf4"' in quantized.to_json()
    assert dense.key() != quantized.key()
    assert Trial.from_json(quantized.to_json()) == quantized
    assert Trial.from_json(dense.to_json()) == dense


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"bases": ["nf3"]},
            r"unknown base format\(s\) \['nf3'\]; a base is null .* \['nf4', 'fp4', 'int8'\]",
        ),
        ({"bases": "nf4"}, r"bases must be a non-empty list"),
        ({"bases": []}, r"bases must be a non-empty list"),
        (
            {"bases": ["nf4"], "inits": ["lora_one"]},
            r"init 'lora_one' needs the gradient .* nf4 base",
        ),
        ({"bases": ["int8"], "inits": ["loftq"]}, r"init 'loftq' fits its base to NF4's grid"),
        (
            {"variants": [{}, {"bases": ["int4"]}]},
            r"unknown base format\(s\) \['int4'\].*\(variant 1\)",
        ),
    ],
)
def test_a_bad_base_is_refused_by_name_before_anything_runs(change, message, monkeypatch):
    monkeypatch.setattr(real_suites, "build_task", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match=message):
        expand({**SPEC, **change})


def test_a_suite_without_a_real_model_refuses_a_quantized_base():
    spec = {"suite": "sp", "problems": ["sensing"], "ranks": [3], "lrs": [0.01], "steps": 5}
    assert expand(spec)  # dense: fine
    with pytest.raises(ValueError, match=r"suite 'sp' trains no real model.*\['classify', 'lm'\]"):
        expand({**spec, "bases": ["nf4"]})


def test_the_quant_presets_compare_qlora_qpissa_and_loftq_with_dense_lora():
    for suite in ("classify", "lm"):
        quant = expand(SPECS[suite]["quant"])
        quick = expand(SPECS[suite]["quick"])
        lora = [t for t in quick if (t.method, t.init, t.optimizer) == ("lora", None, "adamw")]
        # the dense rows are the quick preset's LoRA trials (the same keys), and QLoRA, QPiSSA and LoftQ run
        # each at their learning rates, seeds, rank, steps and problem options
        expected = lora + [
            dataclasses.replace(t, base="nf4", init=init)
            for init in (None, "pissa", "loftq")
            for t in lora
        ]
        assert sorted(t.key() for t in quant) == sorted(t.key() for t in expected)


# -- a run on a quantized base ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_trial_with_base_nf4_trains_on_4bit_layers_and_qpissa_loftq_start_closer(monkeypatch):
    seen = {}
    fit = real_suites.fit

    def spy(model, *args, **kwargs):  # the model as training starts
        import loraredux as lx

        seen["bases"] = {p: type(a.base) for p, a in lx.adapters(model)}
        seen["formats"] = {a.view.format for _, a in lx.adapters(model)}
        seen["quantized"] = [n for n, m in model.named_modules() if isinstance(m, bnn.Linear4bit)]
        seen["head"] = type(model.classifier.module)  # trained in full
        return fit(model, *args, **kwargs)

    monkeypatch.setattr(real_suites, "fit", spy)
    errors = {}
    for init in (None, "pissa", "loftq"):
        outcome = execute(cls_trial(base="nf4", init=init, steps=1))
        # LoRA on the 12 query/value layers, each on a bitsandbytes NF4 layer
        assert len(seen["bases"]) == 12 and set(seen["bases"].values()) == {bnn.Linear4bit}
        assert seen["formats"] == {"nf4"}
        # every linear layer of the encoder (6 x 6) and the pooler is quantized; the new head stays dense
        assert len(seen["quantized"]) == 37 and not any(
            "classifier" in n for n in seen["quantized"]
        )
        assert seen["head"] is torch.nn.Linear
        assert outcome.trainable_parameters == 6 * 2 * 4 * (384 + 384) + 384 * 2 + 2
        errors[init] = outcome.metrics["init_error"]
    # QPiSSA and LoftQ are computed on the dense W0 and their moved base is quantized once, so both take back
    # part of NF4's error (PiSSA on an already quantized layer would add its residual's error instead)
    assert 0.08 < errors[None] < 0.11  # NF4's relative error on MiniLM's query/value
    assert errors["pissa"] < errors[None] and errors["loftq"] < errors[None]


# -- the report -------------------------------------------------------------------------------------------------------


def test_the_report_groups_by_base():
    runs = [
        Run(cls_trial(base=base, lr=lr, seed=seed), "ok", {"accuracy": acc})
        for base, accs in ((None, {1e-3: 0.70, 1e-2: 0.80}), ("nf4", {1e-3: 0.75, 1e-2: 0.60}))
        for lr, acc in accs.items()
        for seed in (0, 1)
    ]
    report, table = render(runs)
    lines = report.splitlines()
    assert "| problem | base | method | init | optimizer | rank | best lr |" in "\n".join(lines)
    rows = [line for line in lines if line.startswith("| rotten_tomatoes")]
    best = {row.split(" | ")[1]: row.split(" | ")[6] for row in rows[:2]}
    assert best == {"-": "0.01", "nf4": "0.001"}  # each base its own best learning rate
    header = table.splitlines()[0].split(",")
    assert header[header.index("init") + 1] == "base"
    # a store without quantized bases renders as before: no base column
    dense_report, dense_table = render([r for r in runs if r.trial.base is None])
    assert "| base |" not in dense_report and ",base," not in dense_table.splitlines()[0]
