"""The command line, end to end on the packaged MiniLM: train, then PEFT, inspect and merge agree on the result."""

import json
import os
import shlex
from pathlib import Path

import pytest
import torch

import loraredux as lx
from loraredux import checkpoint
from loraredux.cli import build_parser, main
from tiny_models import tiny_bert


def test_every_command_and_option_has_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, subparser in sub.choices.items():
        for action in subparser._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0
    assert "--rank" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--rank", "0"], "must be an integer >= 1"),
        (["train", "--alpha", "-1"], "must be a number > 0"),
    ],
)
def test_bad_options_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--method", "nosuch"], "unknown method 'nosuch'"),
        (["train", "--method", "lora", "--dropout", "1.5"], "dropout must be in [0, 1)"),
        (["train", "--method", "mora", "--alpha", "4"], "mora has no field for --alpha"),
        (["train", "--method", "mora", "--field", "nosuch=1"], "has no field(s) ['nosuch']"),
        (["train", "--method", "mora", "--field", "compress=zip"], "compress must be one of"),
        (["train", "--rank", "4", "--field", "rank=2"], "rank is set twice"),
        (["train", "--init", "pisa"], "unknown init 'pisa'"),
        (["train", "--method", "mora", "--init", "pissa"], "mora has no field for --init"),
        (["train", "--init-option", "niter=2"], "--init-option needs --init NAME"),
        (["train", "--init", "pissa", "--init-option", "n=2"], "has no option(s) ['n']"),
        (["train", "--optimizer", "sgdd"], "unknown --optimizer 'sgdd'"),
    ],
)
def test_bad_method_choices_fail_before_loading_anything(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_field_must_be_key_equals_value(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--field", "init_r"])
    assert "expected KEY=VALUE" in capsys.readouterr().err


@pytest.mark.slow
def test_adalora_trains_from_the_cli_with_its_allocator(tmp_path, capsys):
    """The CLI sets AdaLoRA's total_step to the run's steps, and fit steps the allocator down to target_r."""
    out = tmp_path / "adalora"
    argv = ["train", "--method", "adalora", "--field", "init_r=4", "--field", "target_r=2"]
    argv += ["--train-examples", "64", "--eval-examples", "16", "--steps", "4", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["init_r"], config["total_step"]) == ("ADALORA", 4, 4)
    masks = config[
        "rank_pattern"
    ]  # PEFT's per-layer masks: the final ranks sum to target_r per layer
    assert sum(sum(m) for m in masks.values()) == 2 * 12  # 12 layers (query and value of 6 blocks)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["total_step"] == 4


def test_methods_lists_lora(capsys):
    assert main(["methods"]) == 0
    assert "lora" in capsys.readouterr().out


def test_inits_lists_every_initialiser_with_what_it_needs(capsys):
    assert main(["inits"]) == 0
    shown = capsys.readouterr().out
    for name in lx.init.available():
        assert f"\n{name} " in shown
    assert "options: niter=None" in shown


def test_optimizers_lists_every_optimizer_with_its_options(capsys):
    assert main(["optimizers"]) == 0
    shown = capsys.readouterr().out
    for name in lx.optim.available():
        assert shown.startswith(f"{name} ") or f"\n{name} " in shown
    assert "delta=0.01" in shown and "mode='precondition'" in shown
    assert lx.optim.describe("reflora").options["mode"] == "precondition"
    assert lx.optim.describe("reflora").passes_on and not lx.optim.describe("scaled_sgd").passes_on
    with pytest.raises(ValueError, match="unknown optimizer 'nosuch'"):
        lx.optim.describe("nosuch")


@pytest.mark.slow
@pytest.mark.parity
def test_train_with_a_data_aware_init_writes_a_plain_lora_for_the_original_model(tmp_path, capsys):
    """--init lora_ga estimates from training batches, moves the base, and the PEFT file is the rank-2r plain
    LoRA on the packaged MiniLM: PEFT and loraredux load it on the original model and agree."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    from loraredux import assets

    out = tmp_path / "ga"
    argv = ["train", "--init", "lora_ga", "--calibration-batches", "2", "--rank", "4", "--steps"]
    argv += ["2", "--train-examples", "64", "--eval-examples", "16", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "init lora_ga: estimating from 2 training batches" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 32.0, True)
    assert json.loads((out / "metrics.json").read_text())["config"]["init"] == "lora_ga"

    def base():
        return AutoModelForSequenceClassification.from_pretrained(
            assets.minilm_dir(), num_labels=2
        ).eval()

    ids = torch.randint(1000, 2000, (3, 12), generator=torch.Generator().manual_seed(0))
    ours = lx.load_adapter(base(), out)(input_ids=ids).logits
    theirs = peft.PeftModel.from_pretrained(base(), out).eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "adapter"
    argv = [
        "train",
        "--train-examples",
        "64",
        "--eval-examples",
        "32",
        "--steps",
        "3",
        "--rank",
        "4",
    ]
    assert main([*argv, "--out", str(out), "--no-progress", "--seed", "1"]) == 0
    return out


@pytest.mark.slow
def test_train_writes_a_peft_adapter_and_metrics(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert {"accuracy_before", "accuracy_after", "trainable_parameters"} <= set(metrics)
    assert 0.0 <= metrics["accuracy_after"] <= 1.0
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert config["task_type"] == "SEQ_CLS"


@pytest.mark.slow
@pytest.mark.parity
def test_trained_adapter_gives_the_same_logits_in_peft_and_after_merge(trained, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    from loraredux import assets

    def base():
        return AutoModelForSequenceClassification.from_pretrained(
            assets.minilm_dir(), num_labels=2
        ).eval()

    ids = torch.randint(1000, 2000, (3, 12), generator=torch.Generator().manual_seed(0))
    ours = lx.load_adapter(base(), trained)
    expected = ours(input_ids=ids).logits
    theirs = peft.PeftModel.from_pretrained(base(), trained).eval()
    torch.testing.assert_close(theirs(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    with lx.disabled(ours):
        assert not torch.allclose(ours(input_ids=ids).logits, expected)  # the adapter did something

    capsys.readouterr()
    assert main(["inspect", str(trained)]) == 0
    shown = capsys.readouterr().out
    assert "method lora" in shown and "encoder.layer.5.attention.self.value" in shown

    merged = tmp_path / "merged"
    assert main(["merge", str(trained), "--out", str(merged)]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert not list(lx.adapters(plain))
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert main(["merge", str(trained), "--out", str(merged)]) == 2  # refuses to overwrite


@pytest.mark.slow
def test_train_with_a_scaled_optimizer(tmp_path, capsys):
    """--optimizer picks a loraredux.optim optimizer (with its options) and the run records it."""
    out = tmp_path / "scaled"
    argv = [
        "train",
        "--optimizer",
        "scaled_adamw",
        "--optimizer-option",
        "delta=0.05",
        "--rank",
        "2",
    ]
    argv += ["--steps", "2", "--train-examples", "32", "--eval-examples", "16", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["optimizer"] == "scaled_adamw" and metrics["optimizer_options"] == {
        "delta": 0.05
    }
    bad = ["train", "--optimizer", "loraplus", "--optimizer-option", "ratio=-1", "--steps", "1"]
    assert main([*bad, "--train-examples", "8", "--eval-examples", "8", "--no-progress"]) == 2
    assert "ratio must be > 0" in capsys.readouterr().err


def test_a_cross_layer_method_trains_saves_inspects_and_merges(tmp_path, capsys):
    out = tmp_path / "tied"
    argv = ["train", "--method", "tied_lora", "--rank", "4", "--train-examples", "32",
            "--eval-examples", "16", "--steps", "2", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    # MiniLM's twelve query/value layers are all 384 x 384: one tied pair, r (in + out) = 4 * 768
    assert "shared bank tied_lora_384x384: 3,072 trainable parameters, used by 12 layers" in shown
    merged = tmp_path / "merged"
    assert main(["merge", str(out), "--out", str(merged)]) == 0
    assert (merged / "config.json").is_file()


# --------------------------------------------------------------------- checkpoints, resume, interrupts, --out
# On a toy task (a 3-layer MLP with query/value layers, `build_task` replaced): the train command's own logic,
# without a model to load. tests/test_kill_resume.py kills real runs on a real (tiny) model.


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.value = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.classifier = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.value(torch.tanh(self.query(x)))))


@pytest.fixture
def toy(monkeypatch):
    """`build_task` gives the toy task; `toy.bad_step` makes the loss NaN, `toy.stop_step` raises
    KeyboardInterrupt (Ctrl-C), at that training step; `toy.loads` counts the model loads."""
    import torch.nn.functional as F

    from loraredux.cli import train as cli_train
    from loraredux.tasks import Task
    from loraredux.train import epoch_batches

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)
    y = (x[:, 0] > 0).long()
    state = type("Toy", (), {"bad_step": None, "stop_step": None, "loads": 0})()
    batches = epoch_batches(list(range(32)), 4, lambda rows: (x[rows], y[rows]), seed=0)
    micro = {"i": 0}

    def get(i: int):
        micro["i"] = i
        return batches(i)

    def loss_fn(model, batch):
        step = micro["i"] + 1
        if model.training and step == state.stop_step:
            raise KeyboardInterrupt
        loss = F.cross_entropy(model(batch[0]), batch[1])
        return loss * float("nan") if model.training and step == state.bad_step else loss

    def evaluate(model):
        with torch.no_grad():
            return {"accuracy": float((model(x).argmax(1) == y).float().mean())}

    def build_task(args):
        state.loads += 1
        torch.manual_seed(args.seed)
        task = Task("classification", "accuracy", True, get, loss_fn, evaluate, 32,
                    ["query", "value"], ["classifier"])  # fmt: skip
        return Toy(), task, "toy"

    monkeypatch.setattr(cli_train, "build_task", build_task)
    return state


TOY = ["train", "--steps", "6", "--rank", "2", "--dropout", "0.1", "--lr", "0.01", "--no-progress"]


def _toy_outcome(out) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("seconds")
    return load_file(out / "adapter_model.safetensors"), metrics


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--resume"], "--resume needs --out DIR, the folder of the run to continue"),
        (
            ["--resume", "--overwrite", "--out", "x"],
            "--resume continues the run in --out, --overwrite replaces it: give one",
        ),
        (["--save-every", "0"], None),  # refused by the parser
    ],
)
def test_checkpoint_flags_are_checked_before_loading(extra, message, toy, capsys):
    if message is None:
        with pytest.raises(SystemExit):
            main([*TOY, *extra])
        assert "must be an integer >= 1" in capsys.readouterr().err
    else:
        assert main([*TOY, *extra]) == 2
        assert capsys.readouterr().err.strip() == f"error: {message}"
    assert toy.loads == 0


def test_an_unusable_out_is_refused_in_one_line_before_loading(toy, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main([*TOY, "--out", str(blocker)]) == 2
    assert (
        capsys.readouterr().err.strip() == f"error: --out {blocker} exists and is not a directory"
    )
    assert main([*TOY, "--out", str(blocker / "run" / "deeper")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --out {blocker / 'run' / 'deeper'}: {blocker} is a file, not a directory"
    )
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    assert main([*TOY, "--out", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"error: --out {tmp_path / 'new'}: cannot write in {tmp_path} (Permission denied); "
        + ("choose a writable folder")
    )
    assert toy.loads == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_ctrl_c_prints_where_the_checkpoint_is_and_the_command_that_resumes(toy, tmp_path, capsys):
    full = tmp_path / "full"
    assert main([*TOY, "--save-every", "2", "--out", str(full)]) == 0
    out = tmp_path / "run"
    argv = [*TOY, "--save-every", "2", "--out", str(out)]
    toy.stop_step = 5
    capsys.readouterr()
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    command = shlex.join(["loraredux", *argv, "--resume"])
    assert command.endswith(f"--save-every 2 --out {out} --resume")
    expected = (
        f"interrupted; the last checkpoint is {out / 'checkpoint'} (step 4); resume with: {command}"
    )
    assert err.strip() == expected
    toy.stop_step = None
    assert main(shlex.split(command)[1:]) == 0
    assert "resuming from" in capsys.readouterr().out
    ours, theirs = _toy_outcome(out), _toy_outcome(full)
    assert ours[1] == theirs[1]
    for key, value in ours[0].items():
        assert torch.equal(value, theirs[0][key]), key
    assert main([*TOY, "--save-every", "2", "--out", str(out)]) == 2  # a new run would overwrite it
    assert capsys.readouterr().err.strip() == (
        f"error: --out {out} holds an earlier run (adapter_config.json, adapter_model.safetensors, "
        "metrics.json, checkpoint); add --resume to continue its checkpoint (step 6), --overwrite to "
        "replace it, or choose another --out"
    )
    toy.stop_step = 2
    plain = tmp_path / "plain"
    assert main([*TOY, "--out", str(plain)]) == 130
    assert capsys.readouterr().err.strip() == (
        f"interrupted before the first checkpoint; nothing was written to {plain / 'checkpoint'} "
        "(run the same command again to start over)"
    )


def test_resume_refuses_a_missing_checkpoint_or_other_options_before_loading(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TOY, "--out", str(out), "--resume"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --resume: no checkpoint in {out / 'checkpoint'}; start the run with --save-every N --out {out}"
    )
    toy.stop_step = 4
    assert main([*TOY, "--save-every", "2", "--out", str(out)]) == 130
    loads = toy.loads
    other = [a if a != "0.01" else "0.02" for a in TOY]
    assert main([*other, "--rank", "3", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "was written by a run with other options" in err
    assert "--rank 2 there, 3 here" in err and "--lr 0.01 there, 0.02 here" in err
    assert toy.loads == loads  # refused before loading anything


def test_a_diverged_run_is_one_line_naming_the_step_and_the_checkpoint(toy, tmp_path, capsys):
    out = tmp_path / "run"
    toy.bad_step = 5
    assert main([*TOY, "--save-every", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "error: the loss is nan at step 5; the first non-finite "
    )
    assert f"the last good checkpoint is {out / 'checkpoint'} (step 4)" in err
    assert err.strip().endswith("a lower --lr (this run: 0.01) often keeps training finite")
    assert checkpoint.find(out).step == 4 and not (out / "metrics.json").exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"loraredux {lx.__version__}"


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_anywhere_adds_the_traceback_to_the_one_line(tmp_path, capsys, where):
    argv = ["inspect", str(tmp_path / "missing")]
    argv = ["-v", *argv] if where == "before" else [*argv, "--verbose"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert err.strip().splitlines()[-1] == f"error: no adapter directory {tmp_path / 'missing'}"
    assert main(argv[1:] if where == "before" else argv[:-1]) == 2
    assert capsys.readouterr().err.count("\n") == 1  # without -v: the one line only


@pytest.mark.parametrize("keep", [-7, 40], ids=["tail-cut", "header-cut"])
@pytest.mark.parametrize("named_base", [True, False], ids=["--model", "config's base"])
def test_a_damaged_adapter_file_is_one_line_before_the_base_loads(
    tmp_path, capsys, monkeypatch, keep, named_base
):
    import transformers

    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    model = lx.adapt_(base, lx.config("lora", rank=2), ["query", "value"])
    directory = lx.save_adapter(model, tmp_path / "adapter")
    config = json.loads((directory / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "base")
    (directory / "adapter_config.json").write_text(json.dumps(config))
    weights = directory / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep])  # truncated
    capsys.readouterr()  # save_pretrained's own bar

    def loaded(*args, **kwargs):
        raise AssertionError("the base model was loaded before the adapter's files were checked")

    for auto in ("AutoModel", "AutoModelForSequenceClassification", "AutoModelForCausalLM"):
        monkeypatch.setattr(getattr(transformers, auto), "from_pretrained", loaded)
    model_arg = ["--model", str(tmp_path / "base")] if named_base else []
    for argv in (
        ["inspect", str(directory)],
        ["merge", str(directory), "--out", str(tmp_path / "m")],
    ):
        assert main([*argv, *model_arg]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
        assert "adapter_model.safetensors" in err and "truncated" in err
    assert not (tmp_path / "m").exists()


def test_ctrl_c_in_bench_says_the_same_command_continues(tmp_path, monkeypatch, capsys):
    import loraredux.bench

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loraredux.bench, "run_trials", interrupted)
    argv = ["bench", "sp", "--quick", "--out", str(tmp_path / "b")]
    assert main(argv) == 130
    assert capsys.readouterr().err.strip() == (
        f"interrupted; every finished run is kept in {tmp_path / 'b'}; the same command continues: "
        f"loraredux bench sp --quick --out {tmp_path / 'b'}"
    )


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_merged_model_gets_the_usual_permissions(tmp_path, umask, capsys):
    """A serving process running as another user can read the merged model wherever the umask lets it."""
    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    model = lx.adapt_(
        base, lx.config("lora", rank=2), ["query", "value"], modules_to_save=["classifier"]
    )
    directory = lx.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    old = os.umask(umask)
    try:
        assert (
            main(["merge", str(directory), "--out", str(out), "--model", str(tmp_path / "base")])
            == 0
        )
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    for path in files:
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, path.name


def test_sigterm_stops_at_a_step_with_a_checkpoint_and_resume_finishes_the_same(
    toy, tmp_path, capsys, monkeypatch
):
    """A scheduler's SIGTERM (or a first Ctrl-C) ends the run after the step in flight, where a checkpoint is
    written off the --save-every cadence; --resume then gives the uninterrupted run's adapter and metrics."""
    import os
    import signal

    full = tmp_path / "full"
    assert main([*TOY, "--out", str(full)]) == 0
    out = tmp_path / "run"
    argv = [*TOY, "--out", str(out)]  # the default cadence: no checkpoint before the last step
    import loraredux.train as train_module

    real_fit = train_module.fit

    def fit_sending_sigterm(*args, **kwargs):
        loss_fn = args[2]

        def loss_then_signal(model, batch):
            loss = loss_fn(model, batch)
            if model.training and not getattr(loss_then_signal, "sent", False):
                loss_then_signal.calls = getattr(loss_then_signal, "calls", 0) + 1
                if loss_then_signal.calls == 3:  # during step 3
                    loss_then_signal.sent = True
                    os.kill(os.getpid(), signal.SIGTERM)
            return loss

        return real_fit(args[0], args[1], loss_then_signal, *args[3:], **kwargs)

    monkeypatch.setattr(train_module, "fit", fit_sending_sigterm)
    capsys.readouterr()
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "SIGTERM: stopping after this step" in err
    assert err.strip().splitlines()[-1] == (
        f"interrupted; the last checkpoint is {out / 'checkpoint'} (step 3); resume with: "
        + shlex.join(["loraredux", *argv, "--resume"])
    )
    assert checkpoint.find(out).step == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    monkeypatch.setattr(train_module, "fit", real_fit)
    assert main([*argv, "--resume"]) == 0
    ours, theirs = _toy_outcome(out), _toy_outcome(full)
    assert ours[1] == theirs[1]
    for key, value in ours[0].items():
        assert torch.equal(value, theirs[0][key]), key


def test_without_out_a_new_named_folder_is_used_and_printed(toy, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(TOY) == 0
    (made,) = (tmp_path / "runs").iterdir()
    assert made.name.startswith("train-")
    assert f"writing to {Path('runs') / made.name}/" in capsys.readouterr().out
    assert (made / "adapter_config.json").exists() and (made / "metrics.json").exists()


def test_overwrite_replaces_an_earlier_run(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TOY, "--out", str(out), "--seed", "1"]) == 0
    first = (out / "adapter_model.safetensors").read_bytes()
    assert main([*TOY, "--out", str(out)]) == 2
    assert main([*TOY, "--out", str(out), "--overwrite"]) == 0
    assert (out / "adapter_model.safetensors").read_bytes() != first
    assert json.loads((out / "metrics.json").read_text())["seed"] == 0


@pytest.mark.parametrize(("flag", "shown"), [([], True), (["--no-progress"], False)])
def test_bench_takes_no_progress(tmp_path, monkeypatch, capsys, flag, shown):
    import loraredux.bench
    from loraredux.bench.runner import RunSummary

    seen = {}

    def record(trials, store, execute, **kwargs):
        seen.update(kwargs)
        return RunSummary(0, 0, len(trials))

    monkeypatch.setattr(loraredux.bench, "run_trials", record)
    assert main(["bench", "sp", "--quick", "--out", str(tmp_path), *flag]) == 0
    assert seen["progress"] is shown


@pytest.mark.parametrize(("flag", "shown"), [([], True), (["--no-progress"], False)])
def test_merge_shows_transformers_bars_only_in_a_terminal_without_no_progress(
    tmp_path, monkeypatch, capsys, flag, shown
):
    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    directory = lx.save_adapter(
        lx.adapt_(base, lx.config("lora", rank=2), ["query"]), tmp_path / "a"
    )
    capsys.readouterr()
    argv = [
        "merge",
        str(directory),
        "--out",
        str(tmp_path / "m"),
        "--model",
        str(tmp_path / "base"),
    ]
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)  # as in a terminal
    assert main([*argv, *flag]) == 0
    assert ("Writing model shards" in capsys.readouterr().err) is shown
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()  # restored after


def test_an_adapter_without_task_type_merges_onto_the_class_the_base_folder_names(tmp_path, capsys):
    """PEFT's task_type is optional (and left out where the head is part of the base): the base folder's
    config.json names the class whose module paths the adapter's keys use."""
    from transformers import BertForSequenceClassification

    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    model = lx.adapt_(base, lx.config("lora", rank=2), ["query"])
    with torch.no_grad():
        for p in lx.trainable_parameters(model).values():
            p.normal_()  # a nonzero update (B starts at zero)
    directory = lx.save_adapter(model, tmp_path / "a")
    assert json.loads((directory / "adapter_config.json").read_text()).get("task_type") is None
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    argv = [
        "merge",
        str(directory),
        "--out",
        str(tmp_path / "m"),
        "--model",
        str(tmp_path / "base"),
    ]
    assert main(argv) == 0
    merged = BertForSequenceClassification.from_pretrained(tmp_path / "m").double().eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected)


@pytest.mark.parametrize("command", ["train", "advise", "bench", "inspect", "merge"])
def test_every_working_command_takes_no_progress(command):
    required = {"inspect": ["d"], "merge": ["d", "--out", "o"], "bench": ["sp"]}
    args = build_parser().parse_args([command, *required.get(command, []), "--no-progress"])
    assert args.no_progress is True


@pytest.mark.parametrize("command", ["train", "advise", "bench", "inspect", "merge"])
def test_help_states_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    options: list[str] = []  # each option's help, its wrapped lines joined
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            options.append(line)
        elif options and line.startswith("   "):
            options[-1] += " " + line.strip()
    assert len(options) >= 3
    for option in options:
        assert not any(f"(default: {v})" in option for v in ("None", "False", "[]")), option
        # argparse's "(default: X)" only where the help itself does not already say it
        assert "(default:" not in option or option.lower().count("default") == 1, option
