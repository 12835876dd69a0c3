"""Saves killed at every step and at random moments: the adapter directory always holds the whole old adapter or
the whole new one beside the user's other files, and the next save clears every leftover.

Saves are killed for real (SIGKILL in a forked child, at the k-th change on disk that `atomic` announces to its test
hook). Recovery has no cleanup handlers, so there an exception raised by the hook leaves the disk as a kill would,
which lets one process walk a recovery one step at a time.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import stat
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import loraredux as lx
from loraredux.io import atomic, files, peft
from tiny_models import tiny_llama

ADAPTER = (files.CONFIG_NAME, files.WEIGHTS_NAME)
WEIGHTS = files.WEIGHTS_NAME
Tree = dict[str, tuple[Any, ...]]


@dataclass
class Version:
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    files: dict[str, bytes]  # the two files as a clean save writes them
    loaded: dict[str, torch.Tensor]  # the adapter state `lx.load_adapter` makes of them


def version(tmp: Path, rank: int, alpha: int) -> Version:
    model = lx.adapt_(tiny_llama(), lx.config("lora", rank=rank, alpha=alpha), ["q_proj", "v_proj"])
    torch.manual_seed(rank)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()  # B starts at zero: make every tensor tell the versions apart
    config, tensors = peft.to_files(model)
    files.write_adapter(tmp, config, tensors)
    loaded = lx.adapter_state_dict(lx.load_adapter(tiny_llama(), tmp))
    return Version(config, tensors, {n: (tmp / n).read_bytes() for n in ADAPTER}, loaded)


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Version]:
    root = tmp_path_factory.mktemp("versions")
    return {"old": version(root / "old", 4, 8), "new": version(root / "new", 8, 32)}


def add_user_files(directory: Path) -> None:
    (directory / "metrics.json").write_text('{"loss": 1.5}\n')
    (directory / "README.md").write_text("notes\n")
    (directory / "checkpoint" / "nested").mkdir(parents=True)
    (directory / "checkpoint" / "state.json").write_text("{}")
    (directory / "checkpoint" / "nested" / "tensors.bin").write_bytes(bytes(range(256)))
    (directory / "checkpoint").chmod(0o750)
    (directory / "latest").symlink_to("checkpoint")


def tree(directory: Path, skip: tuple[str, ...] = ADAPTER) -> Tree:
    """Every entry under `directory` but the top-level `skip`: folders with their mode, files with their bytes."""
    found: Tree = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if rel in skip:
            continue
        if path.is_symlink():
            found[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            found[rel] = ("dir", stat.S_IMODE(path.stat().st_mode))
        else:
            found[rel] = ("file", path.read_bytes())
    return found


def canonical(files: dict[str, bytes]) -> dict[str, Any]:
    """The files with the safetensors header parsed: safetensors writes its metadata keys in a random order, so two
    saves of one adapter differ in those bytes only."""
    weights = files.get(WEIGHTS)
    if weights is None:
        return files
    size = int.from_bytes(weights[:8], "little")
    return {**files, WEIGHTS: (json.loads(weights[8 : 8 + size]), weights[8 + size :])}


def which(directory: Path, versions: dict[str, Version]) -> str:
    """The version whose two files `directory` holds, byte for byte (but for the order of the metadata keys):
    anything else (a mix, a part) fails."""
    held = canonical(
        {n: (directory / n).read_bytes() for n in ADAPTER if (directory / n).is_file()}
    )
    matches = [name for name, v in versions.items() if canonical(v.files) == held]
    assert matches, f"{directory} holds neither adapter whole: {sorted(held)}"
    return matches[0]


def assert_loads_as(directory: Path, versions: dict[str, Version], name: str) -> None:
    with warnings.catch_warnings():
        # A config that is not the weights' own is reported by a warning.
        warnings.simplefilter("error")
        loaded = lx.adapter_state_dict(lx.load_adapter(tiny_llama(), directory))
    expected = versions[name].loaded
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def siblings(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.parent.iterdir() if p != directory)


def fresh(tmp_path: Path, versions: dict[str, Version]) -> tuple[Path, Tree]:
    """`tmp_path/adapter` holding the old adapter and the user's files (and nothing else in `tmp_path`)."""
    for path in tmp_path.iterdir():
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    directory = tmp_path / "adapter"
    files.write_adapter(directory, versions["old"].config, versions["old"].tensors)
    add_user_files(directory)
    return directory, tree(directory)


def in_child(work: Callable[[], object], kill_at: int | None = None) -> bool:
    """Run `work` in a forked child, SIGKILLed just before its `kill_at`-th change on disk; False if it finished."""
    pid = os.fork()
    if pid == 0:  # the child: it never returns into pytest
        code = 1
        try:
            calls = 0

            def hook(what: str) -> None:
                nonlocal calls
                calls += 1
                if calls == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

            atomic._hook = hook
            work()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the child's work failed (traceback above)"
    return False


class Killed(BaseException):
    pass


@pytest.fixture
def step_by_step(
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[[Callable[[], object]], Iterator[None]]:
    """`for _ in step_by_step(work)`: run `work` again and again, each run killed after one more change on disk
    than the run before made (so each run starts where a kill left the last), pausing after each kill."""

    def run(work: Callable[[], object]) -> Iterator[None]:
        for allowed in itertools.count(1):
            calls = 0

            def hook(what: str, allowed: int = allowed) -> None:
                nonlocal calls
                calls += 1
                if calls > allowed:
                    raise Killed(what)

            monkeypatch.setattr(atomic, "_hook", hook)
            try:
                work()
            except Killed:
                killed = True
            else:
                killed = False
            finally:
                monkeypatch.setattr(atomic, "_hook", None)
            if not killed:
                return
            yield

    return run


def unsupported(src: Path, dst: Path, flags: int) -> None:
    raise OSError(errno.EINVAL, "RENAME_EXCHANGE not supported here", str(src))


# ----------------------------------------------------------------------------------------------- kills


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "fallback"])
def test_a_kill_at_every_step(
    tmp_path: Path, versions: dict[str, Version], exchange: bool, monkeypatch, step_by_step
) -> None:
    if not exchange:
        monkeypatch.setattr(atomic, "_renameat2", unsupported)  # forked children inherit it
    new = versions["new"]

    def save() -> None:
        files.write_adapter(tmp_path / "adapter", new.config, new.tensors)

    seen, absent = [], 0
    for k in itertools.count(1):
        directory, user = fresh(tmp_path, versions)
        old = {n: (directory / n).read_bytes() for n in ADAPTER}
        if not in_child(save, kill_at=k):
            break
        if directory.exists():
            state = which(directory, versions)
            if state == "old":  # the very files, untouched
                assert {n: (directory / n).read_bytes() for n in ADAPTER} == old
            # All there, and nothing of the save's inside the directory.
            assert tree(directory) == user
            assert_loads_as(directory, versions, state)
        else:
            # Only the fallback, only between its two renames: the old directory waits beside, whole.
            assert not exchange
            (aside,) = [p for p in tmp_path.iterdir() if ".loraredux-old-" in p.name]
            assert which(aside, versions) == "old" and tree(aside) == user
            state, absent = "absent", absent + 1
        seen.append(state)
        assert len(siblings(directory)) <= 2 - exchange

        # A kill during the clean-up too, at each of its steps: it may only ever finish what the save did.
        for _ in step_by_step(lambda: atomic.recover_directory(tmp_path / "adapter", ADAPTER)):
            assert which(directory, versions) == ("old" if state == "absent" else state)
            assert tree(directory) == user
        assert siblings(directory) == []
        assert which(directory, versions) == ("old" if state == "absent" else state)

        # The kill again, and the next save straight after: the new adapter, the user's files, nothing else.
        fresh(tmp_path, versions)
        assert in_child(save, kill_at=k)
        save()
        assert siblings(directory) == [] and tree(directory) == user
        assert which(directory, versions) == "new"

    assert k > 10  # the save went through a dozen steps before one was left unkilled
    assert "old" in seen and "new" in seen  # before the swap, after it
    assert seen == sorted(seen, key=["old", "absent", "new"].index)  # and never back
    assert absent == (0 if exchange else 1)
    assert which(directory, versions) == "new"
    assert tree(directory) == user
    assert siblings(directory) == []


def test_a_kill_during_a_first_save(tmp_path: Path, versions: dict[str, Version]) -> None:
    directory, new = tmp_path / "deep" / "adapter", versions["new"]
    for k in itertools.count(1):
        shutil.rmtree(tmp_path / "deep", ignore_errors=True)
        if not in_child(lambda: files.write_adapter(directory, new.config, new.tensors), kill_at=k):
            break
        if directory.exists():
            assert which(directory, versions) == "new" and tree(directory) == {}
        files.write_adapter(directory, new.config, new.tensors)
        assert siblings(directory) == [] and which(directory, versions) == "new"
        assert tree(directory) == {}
    assert k > 3


def big(seed: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": torch.randn(256, 1024, generator=generator) for i in range(4)}  # 4 MiB
    return {"seed": seed}, tensors


@pytest.mark.filterwarnings("error")
def test_random_kills_of_a_process_saving_in_a_loop(tmp_path: Path) -> None:
    directory = tmp_path / "adapter"
    pair = [big(0), big(1)]
    expected = []
    for config, tensors in pair:
        files.write_adapter(tmp_path / "clean", config, tensors)
        expected.append(canonical({n: (tmp_path / "clean" / n).read_bytes() for n in ADAPTER}))
    shutil.rmtree(tmp_path / "clean")
    files.write_adapter(directory, *pair[0])
    add_user_files(directory)
    user = tree(directory)

    def save_forever() -> None:
        for n in itertools.count(1):
            files.write_adapter(directory, *pair[n % 2])

    rng, mid_save = random.Random(1234), 0
    for _ in range(24):
        pid = os.fork()
        if pid == 0:
            try:
                save_forever()
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.002, 0.08))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        held = canonical({n: (directory / n).read_bytes() for n in ADAPTER})
        assert held in expected
        files.read_adapter(directory)  # the config hash agrees: a warning would be an error here
        assert tree(directory) == user
        left = siblings(directory)
        assert len(left) <= 1  # each save clears the one before's: leftovers never pile up
        mid_save += len(left)
    assert mid_save > 0  # some kills did land inside a save
    files.write_adapter(directory, *pair[0])
    assert siblings(directory) == [] and tree(directory) == user


def test_what_a_killed_writer_leaves_never_reaches_the_directory(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    atomic.replace_directory_files(directory, {"a.bin": b"old"})
    (directory / "mine.txt").write_text("user")

    def dies_writing(path: Path) -> None:
        (path.parent / ".tmpAbC123").write_bytes(b"half")  # as safetensors' own temporary file
        os.kill(os.getpid(), signal.SIGKILL)

    assert in_child(lambda: atomic.replace_directory_files(directory, {"a.bin": dies_writing}))
    atomic.replace_directory_files(directory, {"a.bin": b"new"})
    assert tree(directory, skip=()) == {"a.bin": ("file", b"new"), "mine.txt": ("file", b"user")}
    assert siblings(directory) == []


# ----------------------------------------------------------------------------------------------- other guarantees


def test_saves_use_the_exchange_and_keep_the_config_hash(
    tmp_path: Path, versions: dict[str, Version], monkeypatch
) -> None:
    directory, _ = fresh(tmp_path, versions)
    steps: list[str] = []
    monkeypatch.setattr(atomic, "_hook", steps.append)
    files.write_adapter(directory, versions["new"].config, versions["new"].tensors)
    assert "exchange" in steps and "set old aside" not in steps  # renameat2 really works here
    config = (directory / files.CONFIG_NAME).read_bytes()
    with safe_open(str(directory / files.WEIGHTS_NAME), framework="pt") as f:
        assert f.metadata()["loraredux_config_sha256"] == hashlib.sha256(config).hexdigest()


def test_the_fallback_when_exchange_is_unsupported(
    tmp_path: Path, versions: dict[str, Version], monkeypatch
) -> None:
    directory, user = fresh(tmp_path, versions)
    inode = (directory / "checkpoint" / "state.json").stat().st_ino
    steps: list[str] = []
    monkeypatch.setattr(atomic, "_renameat2", unsupported)
    monkeypatch.setattr(atomic, "_hook", steps.append)
    files.write_adapter(directory, versions["new"].config, versions["new"].tensors)
    assert "set old aside" in steps and "rename new in" in steps
    assert which(directory, versions) == "new"
    assert tree(directory) == user
    assert siblings(directory) == []
    assert (directory / "checkpoint" / "state.json").stat().st_ino == inode  # the same file, linked


@pytest.mark.parametrize("umask, folder, file", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_permissions_follow_the_umask(
    tmp_path: Path, versions: dict[str, Version], umask: int, folder: int, file: int
) -> None:
    old = versions["old"]
    before = os.umask(umask)
    try:
        files.write_adapter(tmp_path / "adapter", old.config, old.tensors)
        files.write_text_atomic(tmp_path / "notes.txt", "x")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == folder
    for name in ADAPTER:
        assert stat.S_IMODE((tmp_path / "adapter" / name).stat().st_mode) == file
    assert stat.S_IMODE((tmp_path / "notes.txt").stat().st_mode) == file


def test_a_replaced_directory_keeps_its_mode(tmp_path: Path, versions: dict[str, Version]) -> None:
    directory, user = fresh(tmp_path, versions)
    directory.chmod(0o751)
    before = os.umask(0o077)
    try:
        files.write_adapter(directory, versions["new"].config, versions["new"].tensors)
    finally:
        os.umask(before)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o751
    assert tree(directory) == user  # the user's folder kept its 0o750 (`tree` holds folders' modes)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a folder to another user")
def test_a_replaced_directory_keeps_its_owner(tmp_path: Path, versions: dict[str, Version]) -> None:
    directory, _ = fresh(tmp_path, versions)
    os.chown(directory, 4321, 4322)
    files.write_adapter(directory, versions["new"].config, versions["new"].tensors)
    assert (directory.stat().st_uid, directory.stat().st_gid) == (4321, 4322)


def test_a_file_that_cannot_be_linked_is_moved(
    tmp_path: Path, versions: dict[str, Version], monkeypatch
) -> None:
    directory, user = fresh(tmp_path, versions)
    inode = (directory / "README.md").stat().st_ino
    real = os.link

    def link(src: Any, dst: Any, **kwargs: Any) -> None:
        if Path(src).name == "README.md":  # as for another user's file under fs.protected_hardlinks
            raise PermissionError(errno.EPERM, "not permitted", str(src))
        real(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", link)
    files.write_adapter(directory, versions["new"].config, versions["new"].tensors)
    assert which(directory, versions) == "new"
    assert tree(directory) == user
    assert siblings(directory) == []
    assert (directory / "README.md").stat().st_ino == inode


def test_what_another_program_changes_during_a_save_is_kept(
    tmp_path: Path, versions: dict[str, Version], monkeypatch
) -> None:
    directory, user = fresh(tmp_path, versions)

    def meanwhile(what: str) -> None:
        if what == "exchange":  # linked already, not yet swapped: changes land in the old directory
            files.write_text_atomic(directory / "metrics.json", '{"loss": 0.5}\n')
            (directory / "checkpoint" / "later.txt").write_text("written during the save")

    monkeypatch.setattr(atomic, "_hook", meanwhile)
    files.write_adapter(directory, versions["new"].config, versions["new"].tensors)
    assert which(directory, versions) == "new" and siblings(directory) == []
    assert tree(directory) == {
        **user,
        "metrics.json": ("file", b'{"loss": 0.5}\n'),
        "checkpoint/later.txt": ("file", b"written during the save"),
    }


def test_leftovers_are_recognised_by_their_exact_name(
    tmp_path: Path, versions: dict[str, Version]
) -> None:
    directory, user = fresh(tmp_path, versions)
    others = [
        ".other.loraredux-save-0123456789abcdef",  # another directory's
        ".adapter.loraredux-save-0123456789abcdef.loraredux-save-0123456789abcdef",
        ".adapter.loraredux-save-notarandomname",
    ]
    for name in others:
        (tmp_path / name).mkdir()
        (tmp_path / name / files.CONFIG_NAME).write_text("{}")
    mine = tmp_path / ".adapter.loraredux-save-00000000000000ff"
    mine.mkdir()
    (mine / files.CONFIG_NAME).write_text("{}")
    # A leftover's entry that the directory lacks goes back into it, never lost.
    (mine / "only-here.txt").write_text("keep me")
    files.write_adapter(directory, versions["new"].config, versions["new"].tensors)
    assert siblings(directory) == sorted(others)
    assert tree(directory) == {**user, "only-here.txt": ("file", b"keep me")}


def test_folders_left_inside_by_earlier_versions_are_removed(
    tmp_path: Path, versions: dict[str, Version]
) -> None:
    directory, _ = fresh(tmp_path, versions)
    for name, extra in [(".adapter-tmp-ab_12cde", None), (".adapter-tmp-zz99zz99", "data.txt")]:
        (directory / name).mkdir()
        (directory / name / files.WEIGHTS_NAME).write_bytes(b"half")
        if extra:
            (directory / name / extra).write_text("not ours")  # so kept
    files.write_adapter(directory, versions["new"].config, versions["new"].tensors)
    kept = tree(directory)
    assert ".adapter-tmp-ab_12cde" not in kept
    assert kept[".adapter-tmp-zz99zz99/data.txt"] == ("file", b"not ours")


def test_a_symlinked_directory_is_written_through(
    tmp_path: Path, versions: dict[str, Version]
) -> None:
    directory, _ = fresh(tmp_path, versions)
    (tmp_path / "link").symlink_to("adapter")
    files.write_adapter(tmp_path / "link", versions["new"].config, versions["new"].tensors)
    assert (tmp_path / "link").is_symlink() and which(directory, versions) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "link"]


def test_the_working_directory_follows_into_the_new_directory(
    tmp_path: Path, versions: dict[str, Version], monkeypatch
) -> None:
    directory, _ = fresh(tmp_path, versions)
    monkeypatch.chdir(directory / "checkpoint")
    files.write_adapter(directory, versions["new"].config, versions["new"].tensors)
    assert os.path.samefile(os.getcwd(), directory / "checkpoint")
    files.write_text_atomic("written-here.txt", "x")  # would fail in a deleted directory
    assert (directory / "checkpoint" / "written-here.txt").read_text() == "x"


# ----------------------------------------------------------------------------------------------- one file


def test_a_killed_single_file_write_is_cleaned_up(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    files.write_json_atomic(path, {"loss": 1})
    killed_before_the_rename = 2  # steps: write, rename
    assert in_child(lambda: files.write_json_atomic(path, {"loss": 2}), killed_before_the_rename)
    assert json.loads(path.read_text()) == {"loss": 1}
    (left,) = [p.name for p in tmp_path.iterdir() if p != path]
    assert left.startswith(".metrics.json.") and left.endswith(".tmp")
    # and what older versions (tempfile.mkstemp) left; other files, however alike, stay
    (tmp_path / ".metrics.json.a_b1c2d3.tmp").write_text("old temp")
    keep = [
        ".metrics.json.keep.tmp",
        ".other.json.0123456789abcdef.tmp",
        ".metrics.json.a_b1c2d3.tmp.bak",
    ]
    for name in keep:
        (tmp_path / name).write_text("not a temp of ours")
    files.write_json_atomic(path, {"loss": 3})
    assert json.loads(path.read_text()) == {"loss": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, "metrics.json"])


def test_a_single_file_is_fsynced_before_its_rename(tmp_path: Path, monkeypatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    files.write_text_atomic(tmp_path / "a.txt", "hello")
    (synced, written), (rename, renamed), (folder, folder_path) = events
    assert (synced, rename) == ("fsync", "replace") and renamed.endswith(".tmp")
    assert written == renamed  # the temporary file itself, before the rename
    assert (folder, folder_path) == ("fsync", str(tmp_path))  # and the folder after it
    assert (tmp_path / "a.txt").read_text() == "hello"
