"""The benchmark store and trial grid: stable keys, the product a spec expands into, runs that survive processes
and are never replaced once finished, and clear errors for bad specs and foreign files."""

from __future__ import annotations

import json
import math
import sqlite3

import pytest

from loraredux.bench import Run, Store, Trial, expand, finite_or_none, load_spec
from loraredux.bench.store import AlreadyFinished

SPEC = {
    "suite": "sp",
    "problems": ["sensing", {"name": "teacher", "options": {"subspace": "minor"}}],
    "optimizers": ["adamw", {"name": "scaled_adamw", "options": {"delta": 0.01}}],
    "ranks": [2, 4],
    "lrs": [1e-3, 1e-2],
    "seeds": [0, 1, 2],
    "steps": 50,
}


def test_a_spec_expands_into_the_full_product_in_order_with_stable_keys():
    trials = expand(SPEC)
    assert (
        len(trials) == 2 * 1 * 1 * 2 * 2 * 2 * 3
    )  # problems, methods, inits, optimizers, ranks, lrs, seeds
    assert [t.seed for t in trials[:3]] == [0, 1, 2]  # seeds innermost
    assert trials[0] == Trial("sp", "sensing", "lora", 2, "adamw", 1e-3, 0, 50)
    assert trials[-1].problem_options == {"subspace": "minor"}
    assert trials[-1].optimizer_options == {"delta": 0.01}
    keys = [t.key() for t in trials]
    assert len(set(keys)) == len(keys)
    assert keys == [
        t.key() for t in expand(json.loads(json.dumps(SPEC)))
    ]  # stable across a JSON round trip
    assert Trial.from_json(trials[5].to_json()) == trials[5]
    # the key depends on every field: one changed learning rate is another run
    other = Trial(**{**trials[0].__dict__, "lr": 2e-3})
    assert other.key() != trials[0].key()
    # repeated grid values give each run once
    assert len(expand({**SPEC, "seeds": [0, 0, 1]})) == len(trials) * 2 // 3


def test_variants_are_the_union_of_their_grids_in_order():
    base = {"suite": "sp", "problems": ["sensing"], "ranks": [2], "lrs": [1e-3, 1e-2], "steps": 5}
    spec = {
        **base,
        "variants": [
            {},
            {"inits": ["pissa"]},
            {"methods": ["dora"], "lrs": [1e-2]},
            {"lrs": [1e-2]},
        ],
    }  # fmt: skip  (the last repeats runs of the first)
    trials = expand(spec)
    configs = [(t.method, t.init, t.lr) for t in trials]
    assert configs == [("lora", None, 1e-3), ("lora", None, 1e-2), ("lora", "pissa", 1e-3),
                       ("lora", "pissa", 1e-2), ("dora", None, 1e-2)]  # fmt: skip
    assert [t.key() for t in expand(base)] == [t.key() for t in trials[:2]]  # same runs, same keys


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        ([], "variants must be a non-empty list"),
        ([{"suite": "classify"}], "variant 0 must be a table of keys other than suite"),
        ([{}, {"rank": [2]}], r"unknown key\(s\) \['rank'\].*\(variant 1\)"),
        ([{"lrs": [-1.0]}], r"lrs must be numbers > 0, got -1.0 \(variant 0\)"),
    ],
)
def test_bad_variants_are_refused_by_name(variants, message):
    with pytest.raises(ValueError, match=message):
        expand({**SPEC, "variants": variants})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lr": [1e-3]}, r"unknown key\(s\) \['lr'\]"),
        ({"ranks": [0]}, "ranks must be numbers > 0, got 0"),
        ({"lrs": [float("nan")]}, "lrs must be numbers > 0"),
        ({"lrs": []}, "lrs must be a non-empty list"),
        ({"steps": 1.5}, "steps must be an integer >= 1"),
        ({"problems": [{"name": "x", "opts": {}}]}, "a name or a table with 'name' and 'options'"),
        ({"seeds": [True]}, "seeds must be integers"),
        (
            {"methods": ["lora", "lorra"]},
            r"unknown method\(s\) \['lorra'\]; the methods are \['abba'",
        ),
        ({"optimizers": ["adamm"]}, r"unknown optimizer\(s\) \['adamm'\]"),
        ({"inits": [None, "pisa"]}, r"unknown init\(s\) \['pisa'\]"),
    ],
)
def test_bad_specs_are_refused_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        expand({**SPEC, **change})


def test_a_missing_key_names_what_it_holds():
    spec = {k: v for k, v in SPEC.items() if k != "lrs"}
    with pytest.raises(ValueError, match=r"missing 'lrs' \(a list of learning rates"):
        expand(spec)


def test_load_spec_reads_json_and_refuses_other_text(tmp_path):
    good = tmp_path / "spec.json"
    good.write_text(json.dumps(SPEC))
    assert expand(load_spec(good)) == expand(SPEC)
    bad = tmp_path / "bad.json"
    bad.write_text("{suite: sp")
    with pytest.raises(ValueError, match="not a valid JSON spec"):
        load_spec(bad)


def run_of(trial: Trial, status: str = "ok", loss: float = 0.5) -> Run:
    return Run(
        trial=trial,
        status=status,
        metrics={"loss": loss},
        curves={"loss": [1.0, 0.7, loss]},
        wall_seconds=1.25,
        versions={"torch": "2.13.0"},
        error=None if status == "ok" else "diverged",
        peak_memory_bytes=1 << 20,
        trainable_parameters=96,
    )


def test_runs_survive_a_new_process_and_a_finished_one_is_never_replaced(tmp_path):
    path = tmp_path / "out" / "results.sqlite"
    trials = expand(SPEC)
    store = Store(path)
    store.record(run_of(trials[0]))
    store.record(run_of(trials[1], status="failed"))
    again = Store(path)  # another process would open it the same way
    assert again.finished("sp") == {trials[0].key()}
    assert again.finished("other") == set()
    (run,) = again.runs("sp")
    assert (
        run.trial == trials[0]
        and run.metrics == {"loss": 0.5}
        and run.curves["loss"] == [1.0, 0.7, 0.5]
    )
    assert (
        run.trainable_parameters == 96 and run.peak_memory_bytes == 1 << 20 and run.finished_at > 0
    )
    assert [r.error for r in again.runs(status="failed")] == ["diverged"]
    with pytest.raises(AlreadyFinished, match=r"already finished .* never replaced"):
        again.record(run_of(trials[0], loss=0.1))
    assert again.runs("sp")[0].metrics == {"loss": 0.5}
    again.record(run_of(trials[1], loss=0.25))  # a failed run may be retried
    assert again.finished() == {trials[0].key(), trials[1].key()}
    assert len(again.runs(status=None)) == 2


def test_a_run_finished_by_another_process_during_a_record_is_not_replaced(tmp_path, monkeypatch):
    """`record`'s check "not finished yet" and its write are one IMMEDIATE transaction. Here another process
    holds the write lock with the same trial's finished run uncommitted, and commits just as `record` begins
    to write (its BEGIN, or a deferred one's INSERT): `record` must then see that run and refuse, not replace
    it with a check made before the commit."""
    path = tmp_path / "results.sqlite"
    store = Store(path)
    trial = expand(SPEC)[0]
    theirs = run_of(trial, loss=0.125)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute(
        "INSERT INTO runs VALUES (?, ?, ?, 'ok', NULL, ?, '{}', 1.0, NULL, NULL, '{}', 1.0)",
        (trial.key(), trial.suite, trial.to_json(), json.dumps(theirs.metrics)),
    )
    connect = sqlite3.connect

    def traced(*args, **kwargs):
        db = connect(*args, **kwargs)

        def trace(sql: str) -> None:
            if other.in_transaction and sql.startswith(("BEGIN", "INSERT")):
                other.execute("COMMIT")

        db.set_trace_callback(trace)
        return db

    monkeypatch.setattr(sqlite3, "connect", traced)
    with pytest.raises(AlreadyFinished):
        store.record(run_of(trial, loss=0.5))
    other.close()
    assert [r.metrics for r in store.runs()] == [{"loss": 0.125}]


def test_non_finite_metrics_and_bad_status_are_refused_before_writing(tmp_path):
    store = Store(tmp_path / "results.sqlite")
    trial = expand(SPEC)[0]
    with pytest.raises(ValueError, match="finite JSON numbers"):
        store.record(run_of(trial, loss=math.nan))
    with pytest.raises(ValueError, match="status is 'ok' or 'failed'"):
        store.record(run_of(trial, status="done"))
    assert store.runs(status=None) == []
    assert finite_or_none(math.inf) is None and finite_or_none(2.0) == 2.0


def test_foreign_files_are_refused(tmp_path):
    text = tmp_path / "notes.sqlite"
    text.write_text("these are my notes, not a database" * 50)
    with pytest.raises(ValueError, match="not a loraredux results store"):
        Store(text)
    assert text.read_text().startswith("these are my notes")  # left as it was
    newer = tmp_path / "newer.sqlite"
    Store(newer)
    with sqlite3.connect(newer) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    with pytest.raises(ValueError, match="schema 99; this loraredux reads schema 1"):
        Store(newer)
