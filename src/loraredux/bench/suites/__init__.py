"""The benchmark suites: suite name -> problem name -> `fn(trial) -> Outcome` (issue 6)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..runner import Outcome
from ..trial import Trial
from .sp import sensing, teacher

__all__ = ["SPECS", "SUITES", "execute"]

SUITES: dict[str, dict[str, Callable[[Trial], Outcome]]] = {
    "sp": {"sensing": sensing, "teacher": teacher},
}


# The default specs of each suite: "quick" (minutes on 2 cores; CI runs sp's), "full" and further named ones
# (`loraredux bench sp --preset full_teacher`).
_SP_OPTIMIZERS = ["adamw", "scaled_adamw", "reflora", "altlora", "lora_rite"]
SPECS: dict[str, dict[str, dict[str, Any]]] = {
    "sp": {
        "quick": {
            "suite": "sp",
            "problems": [{"name": "sensing", "options": {"kappa": k}} for k in (1.0, 10.0, 100.0)],
            "optimizers": _SP_OPTIMIZERS,
            "ranks": [3],
            "lrs": [3e-3, 1e-2, 3e-2],
            "seeds": [0, 1, 2],
            "steps": 300,
        },
        "full_teacher": {
            "suite": "sp",
            "problems": [
                {"name": "teacher", "options": {"subspace": sub, "spectrum": spec}}
                for sub in ("principal", "minor", "random")
                for spec in ("decaying", "flat")
            ],
            "inits": ["kaiming", "pissa", "milora", "olora"],
            "optimizers": ["adamw", "scaled_adamw"],
            "ranks": [1, 2, 3, 4, 6],  # true rank 3: where low rank becomes the bottleneck
            "lrs": [3e-3, 1e-2, 3e-2],
            "seeds": [0, 1, 2],
            "steps": 300,
        },
        "full": {
            "suite": "sp",
            "problems": [
                {"name": "sensing", "options": {"kappa": k, "noise": n}}
                for k in (1.0, 10.0, 100.0, 1000.0)
                for n in (0.0, 0.1)
            ],
            "optimizers": [*_SP_OPTIMIZERS, "scaled_sgd", "loraplus", "reflora_s", "balora", "bar"],
            "ranks": [3],
            "lrs": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
            "seeds": [0, 1, 2],
            "steps": 1000,
        },
    },
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
