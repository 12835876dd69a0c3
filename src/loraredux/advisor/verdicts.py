"""What a verification shows, in words: each run's summary, the advice against plain LoRA and the alternatives
(called better or worse only when at least 2 seeds were run and the difference exceeds their spread), and the
memory model's check against a measured step. The report and `loraredux advise` both say it this way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .formatting import DASH, format_bytes, format_number, is_number

__all__ = [
    "advised_and_plain",
    "compare_runs",
    "comparison",
    "memory_check",
    "run_summary",
    "seeds_of",
]


def count(n: int, noun: str) -> str:
    """`n` and the noun, plural where n is not 1."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def advised_and_plain(
    rec: Mapping[str, Any],
) -> tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]:
    """The verification's advised run and its plain-LoRA run: by name ("advised", "lora"), else by position (the
    schema's order); None where there is none."""
    runs = list((rec.get("verify") or {}).get("runs") or [])
    by_name = {r.get("name"): r for r in runs}
    advised = by_name.get("advised", runs[0] if runs else None)
    plain = by_name.get("lora", runs[1] if len(runs) > 1 else None)
    return advised, (plain if plain is not advised else None)


def run_summary(run: Mapping[str, Any]) -> str:
    config = run.get("config") or {}
    parts = [str(config.get("method", DASH))]
    for key, label in (("rank", "r"), ("alpha", "α")):
        if config.get(key) is not None:
            parts.append(f"{label}={format_number(config[key])}")
    if config.get("init"):
        parts.append(f"init={config['init']}")
    if run.get("rank_pattern"):
        parts.append(count(len(run["rank_pattern"]), "per-layer rank"))
    if run.get("optimizer"):
        parts.append(str(run["optimizer"]))
    if run.get("lr") is not None:
        parts.append(f"lr {run['lr']:g}")
    if run.get("per_seed"):
        values = "; ".join(f"{k}: {format_number(v, 4)}" for k, v in run["per_seed"].items())
        parts.append(f"mean of seeds {values} (spread {format_number(spread_of(run))})")
    if run.get("sweep"):
        grid = "; ".join(f"{lr}: {format_number(v, 4)}" for lr, v in run["sweep"].items())
        parts.append(f"best of lr {grid}")
    return ", ".join(parts)


def seeds_of(verify: Mapping[str, Any]) -> list[Any]:
    """The seeds every run trained at (older files name one `seed`)."""
    return list(verify.get("seeds") or [verify.get("seed", DASH)])


def spread_of(run: Mapping[str, Any]) -> float | None:
    """The run's seed spread (largest minus smallest metric over its seeds), None with fewer than 2 seeds."""
    values = [v for v in (run.get("per_seed") or {}).values() if is_number(v)]
    return max(values) - min(values) if len(values) >= 2 else None


def _noise(
    verify: Mapping[str, Any], a: Mapping[str, Any], b: Mapping[str, Any], *, short: bool = False
) -> str | None:
    """Why the difference between runs `a` and `b` is within seed noise, or None when it is evidence; `short`:
    the one-seed case without its explanation (said once before)."""
    seeds = seeds_of(verify)
    spreads = [spread_of(a), spread_of(b)]
    if len(seeds) < 2 or None in spreads:
        if short:
            return "within seed noise (one seed)"
        return (
            f"within seed noise: only one seed ({seeds[0]}) was run, so the seed-to-seed spread is unmeasured "
            "and no difference counts as evidence (`--seeds 2` or more measures it)"
        )
    noise = max(s for s in spreads if s is not None)
    if abs(a["metric"] - b["metric"]) <= noise:
        return (
            f"within seed noise: over {len(seeds)} seeds the difference of the means does not exceed the "
            f"larger seed spread of the two runs, {format_number(noise)} (largest minus smallest metric)"
        )
    return None


def compare_runs(verify: Mapping[str, Any] | None) -> list[str]:
    """The sentences comparing the verification's runs (the module docstring's rule): the advice against plain
    LoRA, then every other run that beat the advice. Empty without verification."""
    if not verify:
        return []
    rec = {"verify": verify}
    metric = verify.get("metric", "metric")
    higher = bool(verify.get("higher_is_better", True))
    advised, plain = advised_and_plain(rec)
    if advised is None or plain is None:
        return ["There is no plain-LoRA run to compare the advised configuration with."]
    a, b = advised.get("metric"), plain.get("metric")
    if not (is_number(a) and is_number(b)):
        return [
            f"The advised run or the plain-LoRA run has no {metric}, so they cannot be compared."
        ]
    diff = a - b
    noise = _noise(verify, advised, plain)
    if diff == 0:
        verdict = "the same score" + (f"; {noise}." if noise is not None else ".")
    elif noise is not None:
        verdict = noise + "."
    else:
        spread = max(s for s in (spread_of(advised), spread_of(plain)) if s is not None)
        verdict = (
            f"so the advice did {'better' if (diff > 0) == higher else 'worse'} than plain LoRA: over "
            f"{len(seeds_of(verify))} seeds the difference of the means exceeds the larger seed spread of the two "
            f"runs, {format_number(spread)}."
        )
    sentences = [
        f"The advised configuration (`{advised.get('name')}`) reached {metric} {format_number(a, 4)} against "
        f"{format_number(b, 4)} for plain LoRA (`{plain.get('name')}`): a difference of {diff:+.3g} "
        f"({'higher' if higher else 'lower'} is better), {verdict}"
    ]
    for run in verify.get("runs") or []:
        m = run.get("metric")
        if run is advised or run is plain or not is_number(m) or m == a or (m > a) != higher:
            continue
        noise = _noise(verify, run, advised, short=True)
        if noise is None:
            spread = max(s for s in (spread_of(run), spread_of(advised)) if s is not None)
            noise = f"beyond the larger seed spread of the two, {format_number(spread)}: prefer it"
        sentences.append(
            f"`{run.get('name')}` beat the advice: {metric} {format_number(m, 4)} against "
            f"{format_number(a, 4)} ({m - a:+.3g}), {noise}."
        )
    return sentences


def comparison(rec: Mapping[str, Any]) -> str | None:
    """The comparison sentences as one paragraph; None without verification."""
    sentences = compare_runs(rec.get("verify"))
    return " ".join(sentences) if sentences else None


def memory_check(rec: Mapping[str, Any]) -> str | None:
    """The verification's memory check in words, naming what it counts and how it differs from the base-format
    estimates of the Memory section (which set of figures is which); None without a measured check."""
    memory = (rec.get("verify") or {}).get("memory")
    if not (memory and is_number(memory.get("measured")) and memory["measured"] > 0):
        return None
    estimated = memory.get("estimated")
    here = memory.get("base") or "fp32"
    base = "fp32 base" if here == "fp32" else f"{here} base computing in fp32"
    text = (
        f"The memory model, checked on the way: one training step of the advised model as the verification "
        f"trains it (batch {memory.get('batch_size')} × {memory.get('seq_len')} tokens, {base}, "
        f"{memory.get('device')}; weights, adapters, gradients, optimizer states and activations) measured "
        f"{format_bytes(memory['measured'])}; the memory model's estimate for that same step is "
        f"{format_bytes(estimated)}"
    )
    if is_number(estimated):
        text += f", {estimated / memory['measured']:.3f} times the measurement"
    table = rec.get("memory") or {}
    chosen = table.get("chosen")
    option = (table.get("options") or {}).get(chosen) or {}
    if not option.get("total"):
        return text + "."
    method = (rec.get("config") or {}).get("method")
    optimizer = ((rec.get("choices") or {}).get("optimizer") or {}).get("value")
    differences = []
    if table.get("device") and table["device"] != memory.get("device"):
        differences.append(
            f"the device ({table['device']} there, {memory.get('device')} here: the activations depend on the "
            "attention kernel each device runs)"
        )
    there = (table.get("batch_size"), table.get("seq_len"))
    if there != (memory.get("batch_size"), memory.get("seq_len")):
        shape = "no batch" if None in there else f"{there[0]} × {there[1]} tokens"
        differences.append(f"the batch ({shape} there)")
    if chosen != here:
        differences.append(f"the base format ({chosen} there, {here} here)")
    elif here != "fp32":
        differences.append("the compute dtype (bf16 there, fp32 here)")
    if method and method != "lora":
        differences.append(f"the method (LoRA there, {method} here)")
    if optimizer and optimizer != "adamw":
        differences.append(f"the optimizer (AdamW's states there, {optimizer} here)")
    parts = memory.get("estimated_parts") or {}
    activations = ""
    if is_number(parts.get("activations")) and is_number(option.get("activations")):
        activations = (
            f" (activations {format_bytes(parts['activations'])} here, "
            f"{format_bytes(option['activations'])} there)"
        )
    if differences:
        text += (
            f". It is a different figure from the Memory section's estimate for the chosen base, "
            f"{format_bytes(option['total'])} at {chosen}: that one is for the training setup the advice was "
            f"given, and differs from this step in {', '.join(differences)}{activations}."
        )
    else:
        text += (
            f". The Memory section's estimate at {chosen}, {format_bytes(option['total'])}, is for the same "
            f"setup{activations}."
        )
    return text
