"""What `loraredux train` reads from its flags besides the task: the method's fields, the recommendation it may
follow (`--recommendation`: method config, ranks, targets, optimizer and base format) and the base format."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, NamedTuple

from loraredux.base_format import BASES

from .common import UsageError

__all__ = ["Advice", "add_base_argument", "method_fields", "read_recommendation"]


class Advice(NamedTuple):
    """What `--recommendation` sets: the method config, {rank_pattern, alpha_pattern}, the targets, the optimizer
    and the base format (None where the file has no such choice)."""

    config: Any
    patterns: dict[str, Any]
    targets: Any
    optimizer: str | None
    base: str | None


def add_base_argument(p: argparse.ArgumentParser, help: str) -> None:
    """`--base fp32|bf16|nf4|fp4|int8` (default None: the caller's default)."""
    p.add_argument("--base", choices=BASES, default=None, help=help)


def method_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The method's fields from --rank/--alpha/--dropout/--rslora and --field; a flag the method lacks is an error
    (an unknown --field is refused by `lx.config`, which lists the method's fields)."""
    from loraredux.core import config_class

    cls = config_class(args.method)
    known = {f.name for f in dataclasses.fields(cls)}
    given = {"rank": args.rank, "alpha": args.alpha, "dropout": args.dropout}
    given["rslora"] = True if args.rslora else None
    given["init"] = args.init
    if args.init_option:
        if args.init is None:
            raise UsageError("--init-option needs --init NAME")
        given["init_options"] = dict(args.init_option)
    lacking = [f"--{k}" for k, v in given.items() if v is not None and k not in known]
    if lacking:
        raise UsageError(
            f"{args.method} has no field for {', '.join(lacking)}; its fields are {sorted(known)}"
        )
    fields = {k: v for k, v in given.items() if v is not None}
    for key, value in args.field:
        if key in fields:
            raise UsageError(f"{key} is set twice (by --{key} and --field {key}=...)")
        fields[key] = value
    for key, default in (("rank", 8), ("alpha", 16.0)):
        if key in known:
            fields.setdefault(key, default)
    return fields


def read_recommendation(args: argparse.Namespace) -> Advice:
    """The method config, rank / alpha patterns, targets, optimizer and base format of `loraredux advise`'s
    recommendation.json; flags that would set the method's fields as well are refused."""
    import json

    import loraredux as lx

    path = args.recommendation
    if path.is_dir():
        path = path / "recommendation.json"
    if not path.is_file():
        raise UsageError(
            f"--recommendation: {path} is not a file (expected recommendation.json or its folder)"
        )
    clash = [f"--{k}" for k in ("rank", "alpha", "dropout", "init") if getattr(args, k) is not None]
    clash += ["--rslora"] * bool(args.rslora) + ["--field"] * bool(args.field)
    clash += ["--init-option"] * bool(args.init_option) + ["--method"] * (args.method != "lora")
    if clash:
        raise UsageError(
            f"--recommendation sets the method and its fields; drop {', '.join(clash)} (or edit the file)"
        )
    try:
        rec = json.loads(path.read_text())
        cfg = lx.config_from_dict(rec["config"])
        adapt = rec["adapt"]
        optimizer = (rec.get("choices", {}).get("optimizer") or {}).get("value")
        base = (rec.get("choices", {}).get("base") or {}).get("value")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise UsageError(f"--recommendation: {path} is not a recommendation.json ({err})") from None
    if base is not None and base not in BASES:
        raise UsageError(
            f"--recommendation: {path} advises the base {base!r}, which train cannot put a model in "
            f"(--base {'|'.join(BASES)}); give --base"
        )
    patterns = {k: adapt[k] for k in ("rank_pattern", "alpha_pattern") if adapt.get(k)}
    return Advice(cfg, patterns, adapt.get("targets"), optimizer, base)
