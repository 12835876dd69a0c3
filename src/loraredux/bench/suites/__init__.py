"""The benchmark suites: suite name -> problem name -> `fn(trial) -> Outcome`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..runner import Outcome
from ..trial import Trial
from .real import kjv, rotten_tomatoes
from .sp import sensing, teacher

__all__ = ["BUDGET_RANKS", "SPECS", "SUITES", "execute"]

SUITES: dict[str, dict[str, Callable[[Trial], Outcome]]] = {
    "sp": {"sensing": sensing, "teacher": teacher},
    "classify": {"rotten_tomatoes": rotten_tomatoes},
    "lm": {"kjv": kjv},
}


# The default specs of each suite: "quick" (minutes on 2 cores; CI runs sp's), "full" and further named ones
# (`loraredux bench sp --preset full_teacher`; `classify` and `lm` have "quant", the quick setting on an NF4 base).
_SP_OPTIMIZERS = ["adamw", "scaled_adamw", "reflora", "altlora", "lora_rite"]
# The rank at which each cross-layer method trains at most LoRA r=8's 73,728 parameters on MiniLM's query/value
# layers (`loraredux.bench.budget.rank_for_budget`; tests/bench/test_budget.py checks them).
BUDGET_RANKS = {
    "vera": 5760,
    "tied_lora": 88,
    "lotr": 52,
    "lorta": 95,
    "tucker": 59,
    "tensor_train": 58,
}
SHARED_METHODS = ("tied_lora", "lotr", "lorta", "tucker", "tensor_train")
# The classify suite's quick setting: LoRA r=8 on MiniLM's query/value (+ the head), one epoch of 1,280 snippets.
_CLASSIFY_QUICK: dict[str, Any] = {
    "suite": "classify",
    "problems": [
        {"name": "rotten_tomatoes", "options": {"train_examples": 1280, "batch_size": 16}}
    ],
    "methods": ["lora"],
    "ranks": [8],
    "lrs": [1e-3, 3e-3, 1e-2],
    "seeds": [0, 1],
    "steps": 80,
}
# QLoRA (NF4 base, B = 0), QPiSSA and LoftQ (T = 1) against LoRA on the dense fp32 model, each at the suite's quick
# setting: the same targets, learning rates and seeds, only the base and the init change (suites/quantized.py).
_QUANT_VARIANTS: list[dict[str, Any]] = [{}, {"bases": ["nf4"], "inits": [None, "pissa", "loftq"]}]
# The lm suite's quick setting: LoRA r=8 on SmolLM2's q_proj/v_proj, 25 steps of 4 blocks of 128 tokens.
_LM_QUICK: dict[str, Any] = {
    "suite": "lm",
    "problems": ["kjv"],
    "methods": ["lora"],
    "ranks": [8],
    "lrs": [1e-3, 3e-3, 1e-2],
    "seeds": [0],
    "steps": 25,
}
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
        # Where the update lies decides which init wins; the rank sweep (true rank 3) shows where low rank
        # becomes the bottleneck.
        "full_teacher": {
            "suite": "sp",
            "problems": [
                {"name": "teacher", "options": {"subspace": sub, "spectrum": spec}}
                for sub in ("principal", "minor", "random")
                for spec in ("decaying", "flat")
            ],
            "inits": ["kaiming", "pissa", "milora", "olora", "lora_ga"],
            "ranks": [3],
            "lrs": [3e-3, 1e-2, 3e-2],
            "seeds": [0, 1, 2],
            "steps": 300,
            # LoRA-One (a one-step start from the gradient, W' != W0) is what the advisor picks when the gradient
            # is sharp but aligned with neither of W0's subspaces.
            "variants": [
                {},
                {"inits": ["kaiming", "pissa"], "ranks": [1, 2, 4, 6]},
                {"inits": ["lora_one"]},
            ],
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
            # PEFT's damping delta = 1e-2 is as large as the smallest planted direction at kappa = 100: the scaled
            # optimizers again with almost none (0 itself is refused while B = 0).
            "variants": [
                {},
                {
                    "optimizers": [
                        {"name": "scaled_sgd", "options": {"delta": 1e-6}},
                        {"name": "scaled_adamw", "options": {"delta": 1e-6}},
                    ]
                },
            ],
        },
    },
    # MiniLM on Rotten Tomatoes: LoRA r=8 on query/value (+ the classifier head) against a data-free and a
    # data-aware init, DoRA, and the parameterization-aware optimizers. quick: one epoch of 1,280 snippets.
    "classify": {
        "quick": {
            **_CLASSIFY_QUICK,
            # LoRA+ trains B 16 times faster than A: its grid sits a step lower.
            "variants": [
                {},
                {"inits": ["pissa"]},
                {"methods": ["dora"]},
                {"optimizers": ["loraplus"], "lrs": [3e-4, 1e-3, 3e-3]},
            ],
        },
        # The cross-layer methods at LoRA r=8's budget (BUDGET_RANKS). VeRA draws its projections again from the
        # seed (save_projection=False), so its file holds the vectors only, and gets a grid a step higher.
        "budget": {
            **_CLASSIFY_QUICK,
            "variants": [
                {},
                {
                    "methods": [{"name": "vera", "options": {"save_projection": False}}],
                    "ranks": [BUDGET_RANKS["vera"]],
                    "lrs": [3e-3, 1e-2, 3e-2],
                },
                *({"methods": [m], "ranks": [BUDGET_RANKS[m]]} for m in SHARED_METHODS),
            ],
        },
        "quant": {**_CLASSIFY_QUICK, "variants": _QUANT_VARIANTS},
        "full": {
            "suite": "classify",
            "problems": [
                {
                    "name": "rotten_tomatoes",
                    "options": {"train_examples": 4000, "eval_examples": 1000},
                }
            ],
            "methods": ["lora"],
            "ranks": [8],
            "lrs": [3e-4, 1e-3, 3e-3, 1e-2],
            "seeds": [0, 1, 2],
            "steps": 250,  # two epochs of 4,000 snippets
            "variants": [
                {"ranks": [2, 8, 32]},
                {"inits": ["pissa", "milora", "lora_ga", "eva"]},
                {"methods": ["dora"]},
                {"optimizers": ["scaled_adamw", "lora_rite"]},
                {"optimizers": ["loraplus"], "lrs": [1e-4, 3e-4, 1e-3, 3e-3]},
            ],
        },
    },
    # SmolLM2-135M on the King James Bible: short runs. quick: 25 steps of 4 x 128 tokens.
    "lm": {
        "quick": {**_LM_QUICK, "variants": [{}, {"inits": ["pissa"]}]},
        "quant": {**_LM_QUICK, "variants": _QUANT_VARIANTS},
        "full": {
            "suite": "lm",
            "problems": [{"name": "kjv", "options": {"eval_examples": 32}}],
            "methods": ["lora"],
            "ranks": [8],
            "lrs": [3e-4, 1e-3, 3e-3, 1e-2],
            "seeds": [0, 1],
            "steps": 100,
            "variants": [
                {"ranks": [2, 8, 32]},
                {"inits": ["pissa", "lora_ga"]},
                {"methods": ["dora"]},
                {"optimizers": ["scaled_adamw"]},
                {"optimizers": ["loraplus"], "lrs": [3e-5, 1e-4, 3e-4, 1e-3]},
            ],
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
