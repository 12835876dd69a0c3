"""The locked environment: requirements.lock pins every package exactly, satisfies pyproject.toml, is what this
suite runs on, and is what docs/setup.md says it is."""

from __future__ import annotations

import os
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
# `make test-latest` runs this suite on the newest releases, which are not the lock's by design.
UNLOCKED = os.environ.get("LORAREDUX_UNLOCKED") == "1"


def pins(path: Path) -> dict[str, str]:
    """{normalised name: version} of a requirements file; every requirement must be an exact pin."""
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        assert match, f"{path.name}: {line!r} is not an exact pin (name==version)"
        name = canonicalize_name(match[1])
        assert name not in found, f"{path.name} pins {name} twice"
        found[name] = match[2]
    return found


LOCK = pins(ROOT / "requirements.lock")
ASSETS = pins(ROOT / "lock" / "assets.txt")
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements() -> list[Requirement]:
    listed = list(PROJECT["dependencies"])
    listed += [r for extra in PROJECT["optional-dependencies"].values() for r in extra]
    return [Requirement(r) for r in listed]


def test_the_lock_holds_the_whole_dependency_tree() -> None:
    assert {"torch", "transformers", "peft", "accelerate", "huggingface-hub", "pytest"} <= set(LOCK)
    assert {"pip", "setuptools"} <= set(LOCK)  # the installer and the build backend are pinned too
    assert "loraredux" not in LOCK  # the project itself is installed from the tree


@pytest.mark.parametrize("requirement", requirements(), ids=str)
def test_the_lock_satisfies_pyproject(requirement: Requirement) -> None:
    name = canonicalize_name(requirement.name)
    assert name in LOCK, f"{requirement} is not in requirements.lock: run `make lock`"
    assert requirement.specifier.contains(LOCK[name], prereleases=True), (
        f"requirements.lock has {name}=={LOCK[name]}, outside pyproject's {requirement}: run `make lock`"
    )


def test_each_range_starts_at_a_tested_release() -> None:
    """A lower bound below the locked minor release would promise users releases the suite never ran on."""
    for requirement in (Requirement(r) for r in PROJECT["dependencies"]):
        lows = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        assert lows, f"{requirement} has no lower bound"
        locked = Version(LOCK[canonicalize_name(requirement.name)])
        tested = Version(f"{locked.major}.{locked.minor}")
        assert max(lows) >= tested, f"{requirement} admits releases older than the tested {locked}"


def test_torch_is_the_cpu_build_of_lock_torch_txt() -> None:
    wanted = pins(ROOT / "lock" / "torch.txt")["torch"]
    assert Version(LOCK["torch"]).base_version == wanted
    assert Version(LOCK["torch"]).local == "cpu"


def test_the_asset_packages_are_not_also_resolved() -> None:
    """They are installed without dependencies; resolving them too would pull in their heavy dependencies."""
    assert not set(ASSETS) & set(LOCK)


@pytest.mark.skipif(UNLOCKED, reason="make test-latest runs on the newest releases, not the lock")
def test_this_environment_is_the_lock() -> None:
    differ = {}
    for name, version in {**LOCK, **ASSETS}.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None or Version(installed) != Version(version):
            differ[name] = (version, installed)
    assert not differ, (
        f"the environment differs from the lock (locked, installed): {differ}; run `make test`, which rebuilds "
        ".venv from the lock"
    )


def test_docs_state_the_locked_versions() -> None:
    text = (ROOT / "docs" / "setup.md").read_text()
    rows = dict(re.findall(r"^\| ([a-z][a-z0-9-]*) \| ([0-9][^ |]*) \|$", text, flags=re.M))
    rows.pop("python")
    assert {"torch", "transformers", "peft", "accelerate"} <= set(rows)
    assert {name: LOCK[name] for name in rows} == rows
