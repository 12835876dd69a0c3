"""One benchmark run's configuration (`Trial`) and the grid a suite expands into.

A suite is problems x bases x methods x inits x optimizers x ranks x learning rates x seeds. `expand(spec)` turns a
spec
(a dict, or a JSON file read by `load_spec`) into the list of trials, in a fixed order. Each trial has a stable
`key()`, a hash of its canonical JSON, so the store can tell a finished run from a new one across processes and
sessions.

    spec = {"suite": "sp", "problems": [{"name": "sensing", "options": {"kappa": 10}}],
            "methods": ["lora"], "optimizers": ["adamw", "scaled_adamw"], "ranks": [4],
            "lrs": [1e-3, 3e-3, 1e-2], "seeds": [0, 1, 2], "steps": 200}

A full product is often more than is wanted: `variants` lists grids that differ from the spec in a few keys, and
the trials are their union (LoRA with two inits and DoRA, say, without DoRA with both inits):

    {..., "methods": ["lora"], "variants": [{"inits": [null, "pissa"]}, {"methods": ["dora"]}]}

`bases` picks the format of the frozen base: null (the model as loaded) or a quantized format of `lx.quantize_`
("nf4", "fp4", "int8"); QLoRA is LoRA with `"bases": ["nf4"]`. The suites that train a real model (`classify`,
`lm`) take it; `QUANTIZED_SUITES` names them, and a spec giving another suite a quantized base is refused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["QUANTIZED_SUITES", "SPEC_KEYS", "Trial", "expand", "load_spec", "problem_options"]

#: The suites whose trials may run on a quantized base (`bases`): those that train a real model.
QUANTIZED_SUITES = frozenset({"classify", "lm"})

# spec key -> (required, what it holds)
SPEC_KEYS: dict[str, tuple[bool, str]] = {
    "suite": (True, "the suite's name"),
    "problems": (True, "a list of problem names or {name, options} tables"),
    "methods": (False, 'a list of method names or {name, options} tables (default ["lora"])'),
    "bases": (
        False,
        "a list of base formats: null for the model as loaded, or a quantized format of lx.quantize_ "
        '("nf4", "fp4", "int8") (default [null])',
    ),
    "inits": (False, "a list of initialiser names, null for the method's own (default [null])"),
    "optimizers": (
        False,
        'a list of optimizer names or {name, options} tables (default ["adamw"])',
    ),
    "ranks": (True, "a list of ranks (integers >= 1)"),
    "lrs": (True, "a list of learning rates (> 0): the sweep"),
    "seeds": (False, "a list of integer seeds (default [0])"),
    "steps": (True, "optimizer steps per run (an integer >= 1)"),
    "variants": (
        False,
        "a list of tables, each overriding some of the keys above but suite: the trials are the union of "
        "each variant's grid (default [{}], the one grid)",
    ),
}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class Trial:
    """One run: everything that decides its result.

    Attributes:
        suite: the suite's name.
        problem: the problem's name within the suite.
        method: the adapter method (`lx.available_methods()`).
        rank: the adapter rank.
        optimizer: the optimizer (`lx.optim.available()`).
        lr: the learning rate.
        seed: the seed of everything random in the run.
        steps: optimizer steps.
        init: the initialiser (`lx.init.available()`), None for the method's own.
        base: the base's quantized format ("nf4", "fp4", "int8"), None for the model as loaded.
        problem_options, method_options, optimizer_options: extra settings (JSON values).
    """

    suite: str
    problem: str
    method: str
    rank: int
    optimizer: str
    lr: float
    seed: int
    steps: int
    init: str | None = None
    base: str | None = None
    problem_options: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, Any] = field(default_factory=dict)
    optimizer_options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """The canonical JSON (sorted keys): equal trials give equal text. A dense base (None) is left out, so a
        trial keeps the key it had before bases were a field, and stores written then still resume."""
        fields = asdict(self)
        if fields["base"] is None:
            del fields["base"]
        return _canonical(fields)

    def key(self) -> str:
        """A stable 16-hex-digit identifier: the SHA-256 of the canonical JSON."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, text: str) -> Trial:
        """The trial that `to_json` wrote."""
        return cls(**json.loads(text))


def _named(entries: Any, what: str) -> list[tuple[str, dict[str, Any]]]:
    """[(name, options)] from a list of names or {name, options} tables."""
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"spec: {what} must be a non-empty list, got {entries!r}")
    out = []
    for entry in entries:
        if isinstance(entry, str):
            out.append((entry, {}))
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            extra = set(entry) - {"name", "options"}
            options = entry.get("options", {})
            if extra or not isinstance(options, dict):
                raise ValueError(
                    f"spec: an entry of {what} is a name or a table with 'name' and 'options' (a table), "
                    f"got {entry!r}"
                )
            out.append((entry["name"], options))
        else:
            raise ValueError(f"spec: an entry of {what} must be a name or a table, got {entry!r}")
    return out


def _numbers(values: Any, what: str, kind: type, positive: bool) -> list[Any]:
    if not isinstance(values, list) or not values:
        raise ValueError(f"spec: {what} must be a non-empty list, got {values!r}")
    for v in values:
        ok = isinstance(v, kind) and not isinstance(v, bool)
        if kind is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or (positive and not v > 0):
            need = "numbers > 0" if positive else "integers"
            raise ValueError(f"spec: {what} must be {need}, got {v!r}")
    return [kind(v) for v in values]


def expand(spec: dict[str, Any]) -> list[Trial]:
    """The trials of a spec: the product problems x bases x methods x inits x optimizers x ranks x lrs x seeds, in
    that nesting order (seeds innermost), for each of its variants in turn, with duplicates removed.

    Raises:
        ValueError: an unknown or missing key, or a value of the wrong kind (the message names it and what is
            expected); an unknown base format, a quantized base in a suite that trains no real model, or a
            method or init that cannot run on a quantized base (named).
    """
    if not isinstance(spec, dict):
        raise ValueError(f"a spec is a table of {sorted(SPEC_KEYS)}, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"spec: unknown key(s) {unknown}; the keys are {sorted(SPEC_KEYS)}")
    variants = spec.get("variants", [{}])
    if not isinstance(variants, list) or not variants:
        raise ValueError(f"spec: variants must be a non-empty list of tables, got {variants!r}")
    base = {k: v for k, v in spec.items() if k != "variants"}
    trials: dict[str, Trial] = {}
    for i, variant in enumerate(variants):
        bad = sorted(set(variant) & {"suite", "variants"}) if isinstance(variant, dict) else None
        if bad is None or bad:
            raise ValueError(
                f"spec: variant {i} must be a table of keys other than suite and variants, got {variant!r}"
            )
        try:
            for trial in _grid({**base, **variant}):
                trials.setdefault(trial.key(), trial)
        except ValueError as err:
            where = f" (variant {i})" if "variants" in spec else ""
            raise ValueError(f"{err}{where}") from None
    return list(trials.values())


def _registered(methods: list[str], inits: list[str], optimizers: list[str]) -> None:
    """Refuse a name no registry knows (a typo would otherwise run as a failed trial and a broken table row)."""
    from .. import init as inits_registry
    from .. import optim
    from ..core import available_methods

    for kind, names, known in (
        ("method", methods, available_methods()),
        ("init", inits, inits_registry.available()),
        ("optimizer", optimizers, optim.available()),
    ):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"spec: unknown {kind}(s) {unknown}; the {kind}s are {sorted(known)}")


def _bases(spec: dict[str, Any], methods: list[str], inits: list[str]) -> list[str | None]:
    """The spec's base formats, checked: known formats, a suite that takes them, and methods and inits that can
    run on each (so a typo or an impossible pairing fails before any trial runs, not as a failed run)."""
    from .. import init as inits_registry
    from ..core import config_class
    from ..quant.formats import FORMATS

    bases = spec.get("bases", [None])
    if not isinstance(bases, list) or not bases:
        raise ValueError(f"spec: bases must be a non-empty list of formats or null, got {bases!r}")
    unknown = [b for b in bases if b is not None and b not in FORMATS]
    if unknown:
        raise ValueError(
            f"spec: unknown base format(s) {unknown}; a base is null (the model as loaded) or one of "
            f"{list(FORMATS)}"
        )
    quantized = [b for b in bases if b is not None]
    if quantized and spec["suite"] not in QUANTIZED_SUITES:
        raise ValueError(
            f"spec: suite {spec['suite']!r} trains no real model, so it has no base to quantize (bases "
            f"{quantized}); the suites that take quantized bases are {sorted(QUANTIZED_SUITES)}"
        )
    for fmt in quantized:
        refused = [m for m in methods if fmt not in config_class(m).quantized_formats]
        if refused:
            raise ValueError(f"spec: method(s) {refused} cannot adapt a {fmt} base")
        for name in inits:
            spec_ = inits_registry.get(name)
            # an init that moves the base runs on the dense weights before quantizing (suites/quantized.py)
            if spec_.needs & {"grad", "grads"} and not spec_.moves_base:
                raise ValueError(
                    f"spec: init {name!r} needs the gradient of the loss with respect to W0, which a {fmt} "
                    "base does not have; pair it with a dense base (null) only, in its own variant"
                )
            if name == "loftq" and fmt != "nf4":
                raise ValueError(
                    f"spec: init 'loftq' fits its base to NF4's grid, so on a {fmt} base it is not LoftQ; "
                    "pair it with base nf4"
                )
    return bases


def _grid(spec: dict[str, Any]) -> list[Trial]:
    """The product of one grid (a spec without variants)."""
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"spec: unknown key(s) {unknown}; the keys are {sorted(SPEC_KEYS)}")
    missing = [k for k, (required, _) in SPEC_KEYS.items() if required and k not in spec]
    if missing:
        raise ValueError(
            "spec: missing " + "; ".join(f"{k!r} ({SPEC_KEYS[k][1]})" for k in missing)
        )
    if not isinstance(spec["suite"], str) or not spec["suite"]:
        raise ValueError(f"spec: suite must be a name, got {spec['suite']!r}")
    steps = spec["steps"]
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"spec: steps must be an integer >= 1, got {steps!r}")
    problems = _named(spec["problems"], "problems")
    methods = _named(spec.get("methods", ["lora"]), "methods")
    optimizers = _named(spec.get("optimizers", ["adamw"]), "optimizers")
    inits = spec.get("inits", [None])
    if (
        not isinstance(inits, list)
        or not inits
        or not all(i is None or isinstance(i, str) for i in inits)
    ):
        raise ValueError(f"spec: inits must be a non-empty list of names or null, got {inits!r}")
    _registered(
        [m for m, _ in methods], [i for i in inits if i is not None], [o for o, _ in optimizers]
    )
    bases = _bases(spec, [m for m, _ in methods], [i for i in inits if i is not None])
    ranks = _numbers(spec["ranks"], "ranks", int, positive=True)
    lrs = _numbers(spec["lrs"], "lrs", float, positive=True)
    seeds = _numbers(spec.get("seeds", [0]), "seeds", int, positive=False)
    trials: dict[str, Trial] = {}
    for (p, p_opt), base, (m, m_opt), init, (o, o_opt), rank, lr, seed in itertools.product(
        problems, bases, methods, inits, optimizers, ranks, lrs, seeds
    ):
        trial = Trial(
            suite=spec["suite"],
            problem=p,
            method=m,
            rank=rank,
            optimizer=o,
            lr=lr,
            seed=seed,
            steps=steps,
            init=init,
            base=base,
            problem_options=p_opt,
            method_options=m_opt,
            optimizer_options=o_opt,
        )
        trials.setdefault(trial.key(), trial)
    return list(trials.values())


def load_spec(path: str | Path) -> dict[str, Any]:
    """A spec from a JSON file (never a pickle).

    Raises:
        ValueError: a file that does not parse as JSON (naming the file and the parser's message).
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a valid JSON spec: {err}") from None


def problem_options(trial: Trial, defaults: dict[str, Any]) -> dict[str, Any]:
    """The problem's defaults updated with the trial's problem options.

    Raises:
        ValueError: an option the problem does not have (naming it and the known ones).
    """
    unknown = sorted(set(trial.problem_options) - set(defaults))
    if unknown:
        raise ValueError(
            f"{trial.problem}: unknown option(s) {unknown}; the options are {sorted(defaults)}"
        )
    return {**defaults, **trial.problem_options}
