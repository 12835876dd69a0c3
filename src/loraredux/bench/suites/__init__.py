"""The benchmark suites: suite name -> problem name -> `fn(trial) -> Outcome` (issue 6)."""

from __future__ import annotations

from collections.abc import Callable

from ..runner import Outcome
from ..trial import Trial
from .sp import sensing

__all__ = ["SUITES", "execute"]

SUITES: dict[str, dict[str, Callable[[Trial], Outcome]]] = {
    "sp": {"sensing": sensing},
}


def execute(trial: Trial) -> Outcome:
    """Run one trial of a registered suite.

    Raises:
        ValueError: an unknown suite or problem (naming the known ones).
    """
    problems = SUITES.get(trial.suite)
    if problems is None:
        raise ValueError(f"unknown suite {trial.suite!r}; the suites are {sorted(SUITES)}")
    fn = problems.get(trial.problem)
    if fn is None:
        raise ValueError(
            f"suite {trial.suite!r} has no problem {trial.problem!r}; it has {sorted(problems)}"
        )
    return fn(trial)
