"""Reports come from the store alone: the best learning rate by the mean over seeds, the spread, failed cells, the
same bytes when rebuilt; and the `loraredux bench` command runs a spec, resumes, and renders."""

from __future__ import annotations

import importlib.util
import json
import statistics

import pytest

from loraredux.bench import Run, Store, Trial
from loraredux.bench.report import render, write_report
from loraredux.cli import main


def stored(tmp_path):
    store = Store(tmp_path / "results.sqlite")
    errors = {0.01: [0.3, 0.5], 0.1: [0.1, 0.2], 1.0: None}  # lr 1.0 diverged
    for lr, values in errors.items():
        for seed in (0, 1):
            t = Trial("sp", "sensing", "lora", 3, "adamw", lr, seed, 10)
            if values is None:
                store.record(Run(t, "failed", {}, error="FloatingPointError: nan"))
            else:
                store.record(
                    Run(t, "ok", {"relative_error": values[seed]}, trainable_parameters=132)
                )
    return store


def test_best_of_sweep_and_sensitivity_are_computed_from_the_runs(tmp_path):
    report, table = render(stored(tmp_path).runs(status=None))
    best = [line for line in report.splitlines() if line.startswith("| sensing")]
    mean, sd = statistics.fmean([0.1, 0.2]), statistics.stdev([0.1, 0.2])
    assert best[0].split(" | ")[5:8] == ["0.1", f"{mean:.3g} ± {sd:.3g} (n=2)", "132"]
    assert best[0].rstrip(" |").endswith("| 2")  # the two failed runs of the sweep
    assert best[1].split(" | ")[5:] == ["0.4", "0.15", "failed (2) |"]
    assert len(table.splitlines()) == 1 + 6 and "FloatingPointError: nan" in table


def test_the_report_rebuilds_byte_for_byte_and_a_missing_store_is_named(tmp_path):
    stored(tmp_path)
    first = write_report(tmp_path).read_bytes()
    if importlib.util.find_spec("matplotlib") is not None:  # the dev install has it
        names = ["sp_lr_sensitivity.png", "sp_curves.png", "sp_cost.png"]
        assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(names)
        assert all(f"![{n}]({n})" in first.decode() for n in names)
    csv = (tmp_path / "runs.csv").read_bytes()
    assert (
        write_report(tmp_path).read_bytes() == first and (tmp_path / "runs.csv").read_bytes() == csv
    )
    with pytest.raises(FileNotFoundError, match=r"has no results\.sqlite"):
        write_report(tmp_path / "elsewhere")


def test_the_bench_command_runs_a_spec_resumes_and_renders(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "suite": "sp",
                "problems": [{"name": "sensing", "options": {"out": 8, "in": 6}}],
                "optimizers": ["adamw", "scaled_adamw"],
                "ranks": [2],
                "lrs": [0.01],
                "steps": 20,
            }
        )
    )
    out = tmp_path / "bench"
    assert main(["bench", "sp", "--spec", str(spec), "--out", str(out)]) == 0
    assert "2 run now, 0 failed now, 0 already stored" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "| sensing" in report and "scaled_adamw" in report
    assert main(["bench", "sp", "--spec", str(spec), "--out", str(out)]) == 0
    assert "0 run now, 0 failed now, 2 already stored" in capsys.readouterr().out
    assert (out / "report.md").read_text() == report
    assert main(["bench", "report", str(out)]) == 0 and (out / "report.md").read_text() == report
    assert main(["bench", "report", str(tmp_path / "none")]) == 2
    assert main(["bench", "nosuch", "--out", str(out)]) == 2
    assert "unknown suite 'nosuch'" in capsys.readouterr().err
    assert main(["bench", "sp"]) == 2
    assert main(["bench", "sp", "--preset", "nosuch", "--out", str(out)]) == 2
    assert "has no preset 'nosuch'" in capsys.readouterr().err


def test_every_preset_expands():
    from loraredux.bench import expand
    from loraredux.bench.suites import SPECS

    for suite, presets in SPECS.items():
        for name, spec in presets.items():
            assert expand(spec), (suite, name)
