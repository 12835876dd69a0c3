"""Number and byte formatting and the checks the advisor's report and plots share (the rules' reasons use the
byte format too)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "DASH",
    "REQUIRED",
    "best_runs",
    "check_recommendation",
    "format_bytes",
    "format_number",
    "is_number",
    "rank_summary",
    "short_path",
]

#: top-level keys a recommendation must have
REQUIRED = ("choices", "config", "adapt", "layers", "memory")
#: a missing value
DASH = "—"


def format_number(x: Any, digits: int = 3) -> str:
    """`x` compactly: an int as it is, a float to `digits` significant digits ("1.23e3", "4.5e-5"), None as "—"."""
    if x is None:
        return DASH
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    text = f"{x:.{digits}g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def format_bytes(n: float | None) -> str:
    """A byte count in binary units: "512 B", "3.00 MiB", "1.50 GiB" (1 GiB = 2**30 bytes); None as "—"."""
    if n is None:
        return DASH
    if abs(n) < 1024:
        return f"{n:.0f} B"
    value, k = float(n), 0
    while abs(value) >= 1024 and k < 4:
        value, k = value / 1024, k + 1
    return f"{value:.2f} {('KiB', 'MiB', 'GiB', 'TiB')[k - 1]}"


def check_recommendation(rec: Any) -> None:
    if not isinstance(rec, Mapping):
        raise TypeError(
            f"a recommendation is a dict (Recommendation.to_dict()), got {type(rec).__name__}"
        )
    for key in REQUIRED:
        if key not in rec:
            raise ValueError(f"the recommendation has no {key!r} key (it has {sorted(rec)})")


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def best_runs(verify: Mapping[str, Any]) -> set[int]:
    """Indices of the runs with the best metric (all of them on a tie)."""
    values = {
        i: r["metric"] for i, r in enumerate(verify.get("runs") or []) if is_number(r.get("metric"))
    }
    if not values:
        return set()
    best = (max if verify.get("higher_is_better", True) else min)(values.values())
    return {i for i, v in values.items() if v == best}


def short_path(path: str) -> str:
    """The last two components of a module path, after the block number where the path has one."""
    parts = path.split(".")
    numbers = [p for p in parts[:-2] if p.isdigit()]
    tail = ".".join(parts[-2:])
    return f"{numbers[-1]}:{tail}" if numbers else tail


def rank_summary(ranks: Sequence[int], rank: int) -> str:
    """How many of the layers hold `rank` (the config's r), and the layer ranks' range and median:
    "4 of 12 layers; layer ranks 1-15, median 12"."""
    if not ranks:
        return "no layers"
    held = sum(1 for r in ranks if r == rank)
    text = f"{held} of {len(ranks)} layers"
    if min(ranks) == max(ranks):
        return text
    return f"{text}; layer ranks {min(ranks)}-{max(ranks)}, median {statistics.median(ranks):g}"
