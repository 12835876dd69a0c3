"""kill -9 loses nothing: runs killed at random moments and inside their writes, then resumed, end bitwise equal to
runs that never stopped: `lx.train.fit`, `loraredux train --save-every N --resume`, and `loraredux bench`.

Each run is a sequence of lives, each a child process: the children of a zygote, this file run as a script
(`python tests/test_kill_resume.py zygote`), which imports torch, transformers and loraredux once and forks a
process per life, so a life costs a fraction of a second instead of the seconds of a fresh interpreter. A life
runs `fit`, or the CLI's `main(argv)` (what the `loraredux` console script runs). The zygote is the parent of each
life: it sends the SIGKILL (or the SIGINT) when the test says so and reaps it, so no pid is signalled after it
was reaped; a life can also kill itself at a chosen point of `checkpoint.save` or of a bench run's transaction,
which makes the kills inside a write deterministic. The other kills land at seeded random moments (a random
few milliseconds after a seeded random step or stored run), so where they land varies with the machine's speed;
what is asserted does not.

Every life and the uninterrupted reference run are forks of the same zygote with one thread, so the
floating-point arithmetic is the same and the comparisons are exact (`torch.equal`, `==` on the histories and
metrics). Only the wall times (`seconds`) differ and are not compared.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

STEPS, EVERY, ACCUMULATION = 24, 3, 2  # optimizer steps, checkpoint cadence, micro-batches per step
LIFE_TIMEOUT = (
    120.0  # seconds a life may take before the test gives up on it (a hang, not a timing check)
)


# ----------------------------------------------------------------------------------------------- the child side


def _build(case: str) -> dict[str, Any]:
    """The model, data, loss, eval and optimizer of a `fit` case: a function of the case alone (seeded)."""
    import torch

    import loraredux as lx
    from loraredux.train import TrainConfig, epoch_batches
    from tiny_models import tiny_llama

    model = tiny_llama(dtype=torch.float32).train()
    optimizer = None
    if case == "adalora":
        cfg = lx.config(
            "adalora", init_r=4, target_r=2, tinit=2, tfinal=6, deltaT=2, total_step=STEPS
        )
        lx.adapt_(model, cfg, targets=["q_proj", "v_proj"])
    else:
        dropout = 0.0 if case == "lora_adamw" else 0.2  # dropout draws from torch's RNG
        lx.adapt_(model, lx.config("lora", rank=2, dropout=dropout), targets=["q_proj", "v_proj"])
    if case not in ("lora_adamw", "adalora"):
        name = case.removesuffix("_dropout")
        optimizer = lambda params: lx.optim.create(name, model, lr=1e-2)  # noqa: E731
    ids = torch.randint(0, 64, (40, 8), generator=torch.Generator().manual_seed(5))
    batches = epoch_batches(list(range(40)), 4, lambda rows: ids[rows], seed=3)
    held_out = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(6))

    def loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(input_ids=batch, labels=batch).loss

    def eval_fn(model: torch.nn.Module) -> dict[str, float]:
        # draws from torch's RNG too: evaluation must put every RNG back
        return {"loss": float(loss_fn(model, held_out)), "draw": float(torch.rand(()))}

    config = TrainConfig(
        steps=STEPS,
        lr=1e-2,
        warmup_steps=3,
        accumulation=ACCUMULATION,
        max_grad_norm=1.0,
        eval_every=5,
        checkpoint_every=EVERY,
        seed=11,
    )
    return {
        "model": model,
        "batches": batches,
        "loss_fn": loss_fn,
        "eval_fn": eval_fn,
        "optimizer": optimizer,
        "config": config,
    }


def _die_inside_writes(cmd: dict[str, Any]) -> None:
    """`die_at`: SIGKILL this process when `checkpoint.save` first reaches that point. `die_at_commit`: SIGKILL it
    at the start of the COMMIT of its n-th bench run (its INSERT done, the transaction not committed)."""
    if cmd.get("die_at"):
        from loraredux import checkpoint

        def reached(point: str, target: str = cmd["die_at"]) -> None:
            if point == target:
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint._reached = reached
    if cmd.get("die_at_commit"):
        import sqlite3

        connect, inserts = sqlite3.connect, []

        def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            db = connect(*args, **kwargs)

            def trace(sql: str) -> None:
                if sql.startswith("INSERT OR REPLACE INTO runs"):
                    inserts.append(sql)
                elif sql.startswith("COMMIT") and len(inserts) == cmd["die_at_commit"]:
                    os.kill(os.getpid(), signal.SIGKILL)

            db.set_trace_callback(trace)
            return db

        sqlite3.connect = traced


def _fit_life(cmd: dict[str, Any]) -> int:
    """Resume from `root` if it holds a checkpoint (else start), train, write the outcome to `out`.

    `arm_at`: create the `armed` file at that micro-step (and wait at the end) so that the test kills it then.
    """
    import dataclasses

    from safetensors.torch import save_file

    import loraredux as lx
    from loraredux import checkpoint
    from loraredux.train import fit

    root, out = Path(cmd["root"]), Path(cmd["out"])
    armed = Path(cmd["armed"]) if cmd.get("armed") else None
    case = _build(cmd["case"])
    batches, arm_at = case["batches"], cmd.get("arm_at")

    def get(i: int) -> Any:
        if armed is not None and i >= arm_at and not armed.exists():
            armed.touch()
        return batches(i)

    result = fit(
        case["model"],
        get,
        case["loss_fn"],
        case["config"],
        optimizer=case["optimizer"],
        eval_fn=case["eval_fn"],
        checkpoint_dir=root,
        resume=checkpoint.find(root) is not None,
        progress=False,
    )
    if armed is not None:  # the kill is due: wait for it (it may land after the last step)
        armed.touch()
        time.sleep(LIFE_TIMEOUT)
        return 4
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in lx.adapter_state_dict(case["model"]).items()}
    save_file(tensors, str(out / "adapter.safetensors"))
    (out / "history.json").write_text(json.dumps(dataclasses.asdict(result)))
    return 0


def _life(cmd: dict[str, Any]) -> int:
    """One life, in a fresh fork of the zygote: one thread, output to its log, then `fit` or the CLI."""
    import torch

    torch.set_num_threads(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the zygote's stdout is the test's pipe
    log = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 2)
    _die_inside_writes(cmd)
    if "argv" in cmd:
        from loraredux.cli import main

        code = main(cmd["argv"])
    else:
        code = _fit_life(cmd)
    if cmd.get("die_at") or cmd.get("die_at_commit"):
        return 3  # the point was never reached: a wrong plan
    return code


def _zygote() -> None:
    """Import once, then fork a life per {"run": cmd} line on stdin; a "kill" (or "int") line sends SIGKILL (or
    SIGINT) to the life in flight. Replies on stdout: {"pid": ...} when a life starts, {"exit": code} when it
    ends (-9: killed)."""
    import matplotlib  # noqa: F401  (the bench report's plots)
    import torch  # noqa: F401
    import transformers
    from safetensors.torch import load_file  # noqa: F401

    import loraredux.bench.report
    import loraredux.bench.suites
    import loraredux.cli
    import loraredux.optim
    import loraredux.tasks
    import loraredux.train  # noqa: F401
    import tiny_models  # noqa: F401

    transformers.BertForSequenceClassification, transformers.AutoTokenizer  # noqa: B018  (loaded now)
    stdin, buffer = sys.stdin.fileno(), b""

    def send(message: dict[str, Any]) -> None:
        os.write(sys.stdout.fileno(), (json.dumps(message) + "\n").encode())

    def lines(timeout: float | None) -> list[str]:
        nonlocal buffer
        if not select.select([stdin], [], [], timeout)[0]:
            return []
        chunk = os.read(stdin, 65536)
        if not chunk:
            raise SystemExit(0)  # the test closed the pipe
        buffer += chunk
        *done, buffer = buffer.split(b"\n")
        return [d.decode() for d in done]

    signals = {"kill": signal.SIGKILL, "int": signal.SIGINT}
    send({"ready": True})
    while True:
        for line in lines(None):
            cmd = json.loads(line)["run"]
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = _life(cmd)
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            send({"pid": pid})
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                for order in lines(0.002):
                    os.kill(pid, signals[order])  # not reaped yet: the pid is still this child's
            send({"exit": os.waitstatus_to_exitcode(status)})


# ----------------------------------------------------------------------------------------------- the test side


class Zygote:
    """The test's handle on the zygote process."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("wb"),
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            cwd=Path(__file__).parent,
        )
        self.buffer = b""
        assert self.read(timeout=LIFE_TIMEOUT) == {"ready": True}, self.log.read_text()

    def read(self, timeout: float) -> dict[str, Any] | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            if not select.select([fd], [], [], timeout)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"the zygote died:\n{self.log.read_text()[-4000:]}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def send(self, message: dict[str, Any] | str) -> None:
        text = json.dumps(message) if isinstance(message, dict) else message
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def life(
        self,
        cmd: dict[str, Any],
        until: Callable[[], bool] | None = None,
        after: float = 0.0,
        signal_name: str = "kill",
    ) -> int:
        """Run one life; with `until`, signal it `after` seconds after `until()` first holds. Its exit code."""
        self.send({"run": cmd})
        assert "pid" in (self.read(timeout=LIFE_TIMEOUT) or {}), self.log.read_text()
        deadline, sent = time.monotonic() + LIFE_TIMEOUT, until is None
        while True:
            reply = self.read(timeout=0.001)
            if reply is not None:
                return reply["exit"]
            if not sent and until():
                time.sleep(after)
                self.send(signal_name)
                sent = True
            if time.monotonic() > deadline:
                self.send("kill")
                raise AssertionError(f"a life hung: {cmd}\n{Path(cmd['log']).read_text()[-4000:]}")

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote") / "stderr.txt")
    try:
        yield z
    finally:
        z.close()


def _tail(path: Path) -> str:
    return path.read_text()[-4000:] if path.exists() else ""


# ----------------------------------------------------------------------------------------------- fit


def _outcome(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load_file

    history = json.loads((out / "history.json").read_text())
    history.pop("seconds")  # wall time: the one entry that differs
    return load_file(out / "adapter.safetensors"), history


# The points of `checkpoint.save` each case's lives kill themselves at, in order (then 3 seeded random kills).
# The plain case reaches every point: a first save with nothing to replace reaches neither "aside" nor
# "discarding-old", so the lives before those leave a checkpoint in place ("placed").
CASES = {
    "lora_adamw": ["tensors", "placed", "tmp", "state", "aside", "discarding-old", "done"],
    "adalora": ["state", "aside"],
    "altlora_dropout": ["tensors", "aside"],
    "lora_rite_dropout": ["placed", "aside"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_killed_and_resumed_training_equals_an_uninterrupted_run(case, zygote, tmp_path):
    """5 or more SIGKILLs, one or more inside `checkpoint.save` at a chosen point, each followed by a resume: the
    adapter tensors and the history (losses, lrs, grad norms, evals) equal an uninterrupted run's bit for bit, so
    data order, every RNG (dropout, evaluation), the optimizer (AdamW, AltLoRA's alternation and momentum bases,
    LoRA-RITE's matrix moments), the scheduler and AdaLoRA's allocator state (importance EMAs, masks) are all
    restored, and no leftover of a killed write survives."""
    import torch

    from loraredux import checkpoint

    def cmd(name: str, **more: Any) -> dict[str, Any]:
        paths = {"root": tmp_path / name, "out": tmp_path / f"{name}-out", "log": tmp_path / "log"}
        return {"case": case, **{k: str(v) for k, v in paths.items()}, **more}

    assert zygote.life(cmd("ref")) == 0, _tail(tmp_path / "log")
    rng = random.Random(f"kill {case}")
    lives = [({"die_at": point}, 0.0) for point in CASES[case]]
    for i, arm in enumerate(sorted(rng.sample(range(1, STEPS * ACCUMULATION), 3))):
        lives.append(({"arm_at": arm, "armed": str(tmp_path / f"armed-{i}")}, rng.uniform(0, 0.01)))
    kills = 0
    for more, after in lives:
        before = checkpoint.find(tmp_path / "run")
        until = Path(more["armed"]).exists if "armed" in more else None
        code = zygote.life(cmd("run", **more), until=until, after=after)
        assert code == -signal.SIGKILL, (more, code, _tail(tmp_path / "log"))
        kills += 1
        # a kill anywhere, inside `save` too, leaves a checkpoint: the new one or the previous one
        found = checkpoint.find(tmp_path / "run")
        kept = before is None or (found is not None and found.step >= before.step)
        assert kept, (more, before, found)
    assert kills >= 5
    assert zygote.life(cmd("run")) == 0, _tail(tmp_path / "log")

    ours, theirs = _outcome(tmp_path / "run-out"), _outcome(tmp_path / "ref-out")
    assert ours[1] == theirs[1]  # losses, lrs, grad norms, evals: exactly
    assert len(ours[1]["losses"]) == STEPS
    assert [step for step, _ in ours[1]["evals"]] == [5, 10, 15, 20, 24]
    assert ours[0].keys() == theirs[0].keys()
    for key, value in ours[0].items():
        assert torch.equal(value, theirs[0][key]), key
    # no temporary folder, no old copy
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint"]


# ----------------------------------------------------------------------------------------------- the CLI


def _tiny_bert(folder: Path) -> Path:
    """A 2-layer BERT classifier (hidden 16) with MiniLM's tokenizer: `--model FOLDER` loads in a blink."""
    import shutil

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from loraredux import assets

    folder.mkdir(parents=True)
    source = Path(assets.minilm_dir())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, folder / name)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=2)  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def _adapter(out: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load_file

    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("seconds")  # wall time
    config = json.loads((out / "adapter_config.json").read_text())
    return load_file(out / "adapter_model.safetensors"), config, metrics


@pytest.mark.slow
def test_a_killed_cli_run_resumes_to_the_same_adapter_and_metrics(zygote, tmp_path):
    """`loraredux train --save-every 2` on a local model folder and the packaged Rotten Tomatoes, SIGKILLed 5
    times (at seeded random checkpoints plus a few milliseconds, and once between the renames of a checkpoint
    write) and interrupted once with Ctrl-C (one line naming the checkpoint and the command to resume, status
    130), each time continued with `--resume`: the adapter files and metrics.json equal an uninterrupted run's
    (all but the wall time)."""
    import torch

    from loraredux import checkpoint

    model = _tiny_bert(tmp_path / "tiny-bert")
    argv = ["train", "--model", str(model), "--train-examples", "48", "--eval-examples", "8",
            "--batch-size", "4", "--max-length", "16", "--steps", "16", "--rank", "2", "--dropout",
            "0.1", "--no-progress", "--save-every", "2"]  # fmt: skip
    out, log = tmp_path / "run", tmp_path / "log"

    def life(**more: Any) -> dict[str, Any]:
        resume = ["--resume"] if checkpoint.find(out) is not None else []
        return {"argv": [*argv, "--out", str(out), *resume], "log": str(log), **more}

    def at_step(step: int) -> Callable[[], bool]:
        return lambda: (found := checkpoint.find(out)) is not None and found.step >= step

    reference = {"argv": [*argv, "--out", str(tmp_path / "ref")], "log": str(log)}
    assert zygote.life(reference) == 0, _tail(log)
    rng = random.Random("cli kills")
    steps = sorted(rng.sample(range(2, 10, 2), 4))
    kills = 0
    for i, step in enumerate(steps):
        if i == 2:  # deterministic: between the renames of a checkpoint write
            assert zygote.life(life(die_at="aside")) == -signal.SIGKILL, _tail(log)
            kills += 1
        code = zygote.life(life(), until=at_step(step), after=rng.uniform(0.0, 0.03))
        assert code == -signal.SIGKILL, (step, code, _tail(log))
        kills += 1
    assert kills >= 5

    now = checkpoint.find(
        out
    ).step  # <= 10 + a few: the Ctrl-C lands in training, after a new checkpoint
    code = zygote.life(life(), until=at_step(now + 2), signal_name="int")
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert code == 130 and "Traceback" not in log.read_text(), _tail(log)
    assert lines[-1].startswith(f"interrupted; the last checkpoint is {out / 'checkpoint'} (step ")
    assert lines[-1].endswith(" --resume") and "resume with: loraredux train --model" in lines[-1]

    assert zygote.life(life()) == 0, _tail(log)
    ours, theirs = _adapter(out), _adapter(tmp_path / "ref")
    assert (
        ours[1:] == theirs[1:]
    )  # adapter_config.json, and metrics.json (accuracy, final loss, ...)
    assert ours[0].keys() == theirs[0].keys()
    for key, value in ours[0].items():
        assert torch.equal(value, theirs[0][key]), key
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "ref"))  # no leftover


# ----------------------------------------------------------------------------------------------- bench

BENCH_SPEC = {
    "suite": "sp",
    "problems": [{"name": "sensing", "options": {"kappa": 10.0}}],
    "optimizers": ["adamw", "altlora"],
    "ranks": [3],
    "lrs": [0.01, 0.03],
    "seeds": [0, 1],
    "steps": 80,
}


def _stored(path: Path) -> list[tuple[str, str, str, str]]:
    """(key, status, metrics, curves) of every row, read without writing (a life may hold the file)."""
    import sqlite3

    if not path.exists():
        return []
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0) as db:
            return db.execute("SELECT key, status, metrics, curves FROM runs").fetchall()
    except sqlite3.Error:  # not created yet
        return []


def test_a_killed_bench_suite_resumes_without_losing_or_repeating_a_run(zygote, tmp_path):
    """`loraredux bench` SIGKILLed 5 times (once inside a run's transaction, after its INSERT and before its
    COMMIT; then at seeded random moments after a seeded number of stored runs) and run again each time: the
    store ends with exactly one row per trial, each with the metrics and curves of an uninterrupted suite's."""
    from loraredux.bench import expand

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(BENCH_SPEC))
    store, log, n = tmp_path / "run" / "results.sqlite", tmp_path / "log", len(expand(BENCH_SPEC))

    def life(out: Path = store.parent, **more: Any) -> dict[str, Any]:
        return {
            "argv": ["bench", "sp", "--spec", str(spec), "--out", str(out)],
            "log": str(log),
        } | more

    assert zygote.life(life(tmp_path / "ref")) == 0, _tail(log)
    assert zygote.life(life(die_at_commit=2)) == -signal.SIGKILL, _tail(log)
    assert len(_stored(store)) == 1  # the second run died before its commit: not stored
    kills = 1
    rng = random.Random("bench kills")
    for at in sorted(rng.sample(range(2, n - 1), 4)):
        code = zygote.life(
            life(), until=lambda at=at: len(_stored(store)) >= at, after=rng.uniform(0, 0.1)
        )
        assert code == -signal.SIGKILL, (at, code, _tail(log))
        kills += 1
    assert kills >= 5
    assert zygote.life(life()) == 0, _tail(log)

    ours, theirs = _stored(store), _stored(tmp_path / "ref" / "results.sqlite")
    assert len(ours) == n and {row[0] for row in ours} == {t.key() for t in expand(BENCH_SPEC)}
    assert all(row[1] == "ok" for row in ours)
    assert sorted(ours) == sorted(theirs)  # the same metrics and curves, run by run


if __name__ == "__main__" and sys.argv[1:] == ["zygote"]:
    _zygote()
