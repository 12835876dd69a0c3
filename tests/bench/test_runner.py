"""The runner: every trial once, seeded, recorded as it ends; failures stored as results; an interrupted suite
resumes where it stopped without repeating or losing a run."""

from __future__ import annotations

import pytest
import torch

from loraredux.bench import Outcome, Run, Store, expand, run_trials

SPEC = {
    "suite": "sp",
    "problems": ["p"],
    "ranks": [2],
    "lrs": [0.1, 0.2],
    "seeds": [0, 1, 2],
    "steps": 5,
}


def fake(calls: list):
    """A trial whose metric is a draw from torch's RNG (so seeding shows) and its lr."""

    def execute(trial):
        calls.append(trial.key())
        return Outcome(
            metrics={"draw": torch.rand(()).item(), "lr": trial.lr},
            curves={"loss": [1.0, trial.lr]},
            trainable_parameters=7,
        )

    return execute


def test_each_trial_runs_once_seeded_and_is_stored_with_its_record(tmp_path):
    store = Store(tmp_path / "results.sqlite")
    trials = expand(SPEC)
    calls: list = []
    summary = run_trials(trials + trials[:2], store, fake(calls), progress=False)
    assert (summary.skipped, summary.finished, summary.failed) == (0, 6, 0)
    assert sorted(calls) == sorted(t.key() for t in trials)
    runs = {r.trial.key(): r for r in store.runs("sp")}
    for t in trials:
        torch.manual_seed(t.seed)
        assert runs[t.key()].metrics == {"draw": torch.rand(()).item(), "lr": t.lr}
        assert runs[t.key()].trainable_parameters == 7
        assert (
            runs[t.key()].versions["torch"] == torch.__version__.split("+")[0]
            or runs[t.key()].versions
        )
        assert runs[t.key()].wall_seconds >= 0
    again = run_trials(trials, store, fake(calls), progress=False)
    assert (again.skipped, again.finished) == (6, 0) and len(calls) == 6


def test_an_interrupted_suite_resumes_without_repeating_or_losing_a_run(tmp_path):
    store = Store(tmp_path / "results.sqlite")
    trials = expand(SPEC)
    calls: list = []
    inner = fake(calls)

    def interrupted(trial):
        if len(calls) == 3:
            raise KeyboardInterrupt
        return inner(trial)

    with pytest.raises(KeyboardInterrupt):
        run_trials(trials, store, interrupted, progress=False)
    assert len(store.runs("sp")) == 3
    first = {r.trial.key(): r.metrics for r in store.runs("sp")}
    summary = run_trials(trials, store, fake(calls), progress=False)
    assert (summary.skipped, summary.finished) == (3, 3)
    assert sorted(calls) == sorted(t.key() for t in trials)  # each exactly once
    assert {
        k: v for k, v in ((r.trial.key(), r.metrics) for r in store.runs("sp")) if k in first
    } == first


def test_a_failing_trial_is_a_stored_result_and_is_retried_only_on_request(tmp_path):
    store = Store(tmp_path / "results.sqlite")
    trials = expand(SPEC)

    def diverges(trial):
        if trial.lr > 0.15:
            raise FloatingPointError("the loss is nan")
        return Outcome(metrics={"loss": trial.lr})

    summary = run_trials(trials, store, diverges, progress=False)
    assert (summary.finished, summary.failed) == (3, 3)
    failed = store.runs("sp", status="failed")
    assert {r.error for r in failed} == {"FloatingPointError: the loss is nan"}
    assert all(r.metrics == {} for r in failed)
    assert run_trials(trials, store, diverges, progress=False).skipped == 6
    retried = run_trials(
        trials, store, lambda t: Outcome(metrics={"loss": 0.0}), retry_failed=True, progress=False
    )
    assert (retried.skipped, retried.finished) == (3, 3)
    assert store.runs("sp", status="failed") == []


def test_a_run_another_process_finished_meanwhile_is_kept_and_counted_as_skipped(tmp_path):
    """Two suites on one store: the runner read the finished runs at its start; a trial the other one finished
    in the meantime is not stored twice (nor does it stop the suite)."""
    store = Store(tmp_path / "results.sqlite")
    other = Store(tmp_path / "results.sqlite")  # the other process's handle
    trials = expand(SPEC)
    calls: list = []
    inner = fake(calls)

    def racing(trial):
        outcome = inner(trial)
        if trial == trials[2]:  # the other process finishes this trial first
            other.record(Run(trial=trial, status="ok", metrics={"draw": -1.0}))
        return outcome

    summary = run_trials(trials, store, racing, progress=False)
    assert (summary.skipped, summary.finished, summary.failed) == (1, 5, 0)
    runs = {r.trial.key(): r for r in store.runs("sp")}
    assert len(runs) == 6 and runs[trials[2].key()].metrics == {"draw": -1.0}
