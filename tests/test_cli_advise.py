"""`loraredux advise` on the packaged MiniLM, end to end: the recommendation, its report, the verification runs, and
`loraredux train --recommendation` applying the same file; bad input refused before anything is loaded."""

import json

import pytest
import torch

from loraredux.cli import main


@pytest.fixture(scope="module")
def advised(tmp_path_factory):
    out = tmp_path_factory.mktemp("advise") / "advice"
    argv = ["advise", "--targets", "query,value", "--calibration-batches", "4", "--batch-size", "8",
            "--max-length", "32", "--train-examples", "64", "--verify", "--steps", "2", "--budget", "8GiB",
            "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


@pytest.mark.slow
def test_advise_writes_a_recommendation_that_explains_itself(advised, capsys):
    rec = json.loads((advised / "recommendation.json").read_text())
    assert {p.name for p in advised.iterdir()} >= {
        "recommendation.json", "report.md", "report.html", "spectra.png", "ranks.png", "memory.png",
    }  # fmt: skip
    assert len(rec["layers"]) == 12  # query and value of 6 blocks
    for path, layer in rec["layers"].items():
        assert path.endswith(("query", "value")) and layer["shape"] == [384, 384]
        needed = layer["gradient"]["needed_rank"]
        assert layer["rank"] == min(max(needed, 1), 64)  # the Gavish-Donoho rank, clipped
        assert layer["gradient"]["noise"] > 0 and layer["gradient"]["threshold"] > 0
    pattern = rec["adapt"]["rank_pattern"] or {}
    assert all(rec["layers"][p]["rank"] == r != rec["config"]["rank"] for p, r in pattern.items())
    for name in ("method", "rank", "alpha", "init", "optimizer", "base", "serving"):
        assert rec["choices"][name]["reason"]
    memory = rec["memory"]
    assert memory["budget_bytes"] == 8 << 30 and memory["chosen"] == rec["choices"]["base"]["value"]
    assert memory["options"][memory["chosen"]]["fits"]
    report = (advised / "report.md").read_text()
    assert rec["choices"]["init"]["reason"] in report


@pytest.mark.slow
def test_verification_trains_the_advice_against_plain_lora(advised):
    rec = json.loads((advised / "recommendation.json").read_text())
    runs = {r["name"]: r for r in rec["verify"]["runs"]}
    assert list(runs)[:2] == ["advised", "lora"] and rec["verify"]["metric"] == "accuracy"
    # the same head and data: the trainable counts differ by exactly the adapters' ranks
    per_rank = 384 + 384
    ranks = [layer["rank"] for layer in rec["layers"].values()]
    assert runs["advised"]["trainable"] - runs["lora"]["trainable"] == per_rank * (
        sum(ranks) - 8 * 12
    )
    assert all(0.0 <= r["metric"] <= 1.0 for r in runs.values())
    # the memory model against one measured training step of the advised model (fp32, CPU)
    memory = rec["verify"]["memory"]
    assert memory["device"] == "cpu" and memory["batch_size"] == 8
    assert 0.85 <= memory["estimated"] / memory["measured"] <= 1.15
    # one seed: the report claims no difference as evidence, and names what each memory figure counts
    report = (advised / "report.md").read_text()
    assert (
        rec["verify"]["seeds"] == [0] and "within seed noise: only one seed (0) was run" in report
    )
    assert "did better" not in report and "did worse" not in report
    assert "as the verification trains it (batch 8 × 32 tokens, fp32 base, cpu;" in report
    assert "differs from this step in the device (cuda there, cpu here" in report
    assert (
        "each estimate counts the base weights at that format" in rec["choices"]["base"]["reason"]
    )


@pytest.mark.slow
def test_train_applies_the_recommendation_file(advised, tmp_path):
    rec = json.loads((advised / "recommendation.json").read_text())
    out = tmp_path / "run"
    argv = ["train", "--recommendation", str(advised), "--train-examples", "64", "--eval-examples", "16",
            "--steps", "2", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"] == rec["config"]
    assert metrics.get("rank_pattern", {}) == (rec["adapt"]["rank_pattern"] or {})
    assert metrics["optimizer"] == rec["choices"]["optimizer"]["value"]
    advised_run = next(r for r in rec["verify"]["runs"] if r["name"] == "advised")
    assert metrics["trainable_parameters"] == advised_run["trainable"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["advise", "--budget", "24 parsecs"],
            "--budget: cannot read '24 parsecs' as a memory size",
        ),
        (["advise", "--min-rank", "8", "--max-rank", "4"], "--max-rank 4 is below --min-rank 8"),
        (
            ["advise", "--calibration-batches", "1"],
            "--calibration-batches 1: at least 2 are needed, since the gradient noise",
        ),
        (["train", "--recommendation", "/nonexistent/dir"], "is not a file"),
    ],
)
def test_bad_advice_options_fail_before_loading_anything(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_recommendation_sets_the_method_so_method_flags_clash(tmp_path, capsys):
    path = tmp_path / "recommendation.json"
    path.write_text(
        json.dumps({"config": {"method": "lora", "rank": 4}, "adapt": {"targets": "all-linear"}})
    )
    assert main(["train", "--recommendation", str(path), "--rank", "8", "--init", "pissa"]) == 2
    assert "drop --rank, --init" in capsys.readouterr().err
    path.write_text("{not json")
    assert main(["train", "--recommendation", str(path)]) == 2
    assert "is not a recommendation.json" in capsys.readouterr().err


@pytest.mark.slow
def test_verify_over_a_learning_rate_grid_compares_each_at_its_best(tmp_path, capsys):
    import loraredux as lx
    from loraredux import tasks
    from loraredux.advisor import verify

    torch.manual_seed(0)
    model, task, _ = tasks.build_task("minilm", train_examples=32, eval_examples=16, batch_size=8,
                                      max_length=16, progress=False)  # fmt: skip
    rec = lx.advise(model, [task.batches(i) for i in range(4)], task.loss_fn,
                    targets=["query"], modules_to_save=task.modules_to_save)  # fmt: skip
    out = verify(rec, "minilm", train_examples=32, eval_examples=16, steps=1, lr=[1e-30, 1e-3],
                 batch_size=8, max_length=16, seed=3, seeds=2, progress=False)  # fmt: skip
    assert out["lrs"] == ["1e-30", "0.001"] and out["seeds"] == [3, 4]
    for run in out["runs"]:
        assert set(run["sweep"]) == {"1e-30", "0.001"}
        assert run["metric"] == max(run["sweep"].values())  # accuracy: higher is better
        assert run["sweep"][format(run["lr"], "g")] == run["metric"]
        # each point is the mean over the two seeds, whose scatter is kept
        assert set(run["per_seed"]) == {"3", "4"}
        assert run["metric"] == pytest.approx(sum(run["per_seed"].values()) / 2)
        assert run["spread"] == max(run["per_seed"].values()) - min(run["per_seed"].values())
    with pytest.raises(ValueError, match="lr must be a number > 0"):
        verify(rec, "minilm", lr=[])
    with pytest.raises(ValueError, match="seeds must be an integer >= 1"):
        verify(rec, "minilm", seeds=0)
