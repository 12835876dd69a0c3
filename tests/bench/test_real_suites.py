"""The `classify` and `lm` suites on the packaged MiniLM and SmolLM2, cut to a few steps: a run measures the model it
trained on the fixed held-out set, is a pure function of its trial, and feeds the report (higher accuracy wins)."""

from __future__ import annotations

import math

import pytest
import torch

from loraredux import tasks
from loraredux.bench import Run, Trial
from loraredux.bench.report import render
from loraredux.bench.suites import execute

TINY_CLS = {
    "train_examples": 48,
    "eval_examples": 40,
    "batch_size": 8,
    "max_length": 32,
    "every": 1,
}
TINY_LM = {"max_tokens": 3000, "eval_examples": 4, "batch_size": 2, "max_length": 32}


def cls_trial(**kw):
    fields = {"suite": "classify", "problem": "rotten_tomatoes", "method": "lora", "rank": 4,
              "optimizer": "adamw", "lr": 3e-3, "seed": 0, "steps": 10, "problem_options": TINY_CLS}  # fmt: skip
    return Trial(**{**fields, **kw})


def base_accuracy(seed):
    """The accuracy of the untrained model the suite starts from: the head drawn from the seed, no adapter."""
    torch.manual_seed(seed)
    model, task, _ = tasks.build_task(
        "minilm", "rotten_tomatoes", train_examples=48, eval_examples=40, max_length=32,
        seed=seed, progress=False,
    )  # fmt: skip
    return task.evaluate(model.eval())["accuracy"]


@pytest.mark.parametrize("init", [None, "pissa", "lora_ga"])
def test_a_vanishing_learning_rate_measures_the_untouched_model(init):
    # Every one of these inits leaves W' = W0 at the start (PiSSA and LoRA-GA move the base by what the
    # adapter adds), so a run at lr 1e-30 must score exactly what the untrained model scores on the same
    # held-out snippets; a data-aware init (LoRA-GA) also needs its calibration batches.
    options = {**TINY_CLS, "calibration_batches": 2}
    outcome = execute(cls_trial(lr=1e-30, steps=2, init=init, problem_options=options))
    assert outcome.metrics["accuracy"] == base_accuracy(0)
    # LoRA r=4 on query and value of 6 layers (384 -> 384) plus the 2-class head (384 x 2 + 2).
    assert outcome.trainable_parameters == 6 * 2 * 4 * (384 + 384) + 384 * 2 + 2


def test_a_run_is_a_pure_function_of_its_trial_and_learns():
    first, again = execute(cls_trial()), execute(cls_trial())

    def fixed(o):  # everything but the step time, which is a measurement
        return (
            {k: v for k, v in o.metrics.items() if k != "step_seconds"},
            o.curves,
            o.trainable_parameters,
        )

    assert fixed(first) == fixed(again)
    assert first.metrics["step_seconds"] > 0
    # the file lx.save_adapter writes: LoRA's A and B of 12 layers and the head, float32, plus the header
    assert first.metrics["adapter_bytes"] > 4 * first.trainable_parameters
    losses = first.curves["train_loss"]  # every=1: the loss of each step
    assert len(losses) == 10 and first.metrics["train_loss"] == losses[-1]  # the last tenth
    assert first.curves["accuracy"] == [first.metrics["accuracy"]]  # eval_every 0: once, at the end
    other = execute(cls_trial(seed=1))  # another training sample, order and head
    assert other.curves["train_loss"] != losses


def test_eval_every_gives_the_metric_curve():
    outcome = execute(cls_trial(steps=4, problem_options={**TINY_CLS, "eval_every": 2}))
    assert len(outcome.curves["accuracy"]) == 2
    assert outcome.curves["accuracy"][-1] == outcome.metrics["accuracy"]


def test_the_lm_suite_reports_held_out_perplexity():
    trial = Trial("lm", "kjv", "lora", 2, "adamw", 1e-30, 0, 1, problem_options=TINY_LM)
    outcome = execute(trial)
    assert outcome.metrics["perplexity"] == pytest.approx(math.exp(outcome.metrics["loss"]))
    model, task, _ = tasks.build_task("smollm2", "kjv", eval_examples=4, batch_size=2,
                                      max_length=32, max_tokens=3000, progress=False)  # fmt: skip
    assert outcome.metrics["perplexity"] == pytest.approx(
        task.evaluate(model.eval())["perplexity"], rel=1e-6
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"epochs": 2}, r"unknown option\(s\) \['epochs'\]; the options are"),
        ({"warmup": 2}, r"warmup is a fraction of the steps in \[0, 1\]"),
        ({"every": 0}, r"every must be an integer >= 1"),
        ({"eval_every": -1}, r"eval_every must be an integer >= 0"),
        ({"model": "smollm2"}, r"needs a classification model"),
    ],
)
def test_bad_problem_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        execute(cls_trial(problem_options={**TINY_CLS, **options}))


def test_a_bad_method_field_fails_before_loading_anything(monkeypatch):
    monkeypatch.setattr(tasks, "build_task", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="lora"):
        execute(cls_trial(method_options={"rnak": 3}))


def test_the_report_picks_the_highest_accuracy_for_classify():
    runs = [
        Run(cls_trial(lr=lr, seed=seed), "ok", {"accuracy": acc})
        for lr, accs in ((1e-3, (0.70, 0.72)), (1e-2, (0.80, 0.78)), (1e-1, (0.50, 0.52)))
        for seed, acc in enumerate(accs)
    ]
    report, _ = render(runs)
    assert "## Suite `classify`: accuracy (higher is better)" in report
    best = next(line for line in report.splitlines() if line.startswith("| rotten_tomatoes"))
    assert best.split(" | ")[5:7] == ["0.01", "0.79 ± 0.0141 (n=2)"]
