"""What the advisor decides: pure rules from measurements to choices, each with the measured reason.

Every rule takes what `measure.py` / `model.py` / `memory.py` measured and returns a `Choice`: the value and a
sentence that gives the numbers it rests on and, where one exists, the benchmark that backs it (BENCHMARKS.md).
The thresholds are module constants, so a reader sees each in one place:

Per layer (rank and init; with a newly drawn head trained in full, the gradient passes through that random
head, so the init is kaiming whatever the gradient shows):
    rank   the Gavish-Donoho rank of the mean calibration gradient at its measured noise (the number of singular
           values that stand above the optimal hard threshold τ), clipped to [min_rank, max_rank]; without
           gradients `DEFAULT_RANK`.
    init   where the gradient's top-k subspaces lie (k = the layer's rank):
             principal alignment >= ALIGNED     -> pissa   (the update lives where W0 is strong)
             minor alignment >= ALIGNED, or the user protects prior knowledge and some signal exists
                                                -> milora  (the update lives where W0 is weak)
             the top-k singular values hold >= SHARP of the gradient's energy, above the noise
                                                -> lora_one (a spectral start from the gradient itself)
             otherwise                          -> kaiming (B = 0: nothing carried, nothing assumed)
           Base-moving inits (PiSSA, MiLoRA) carry s B0 A0 and so spend rank when the update lies outside that span;
           the teacher-student benchmark measured the cost (kaiming fits every case to 1e-4; PiSSA stops near 1 when
           the update is in the minor subspace). That is why they need a measured alignment, not a default. LoRA-GA
           is never picked: it stopped at 0.31 in every teacher-student case (BENCHMARKS.md, "a base-moving init
           spends rank").

Global (the config and the training setup):
    rank, alpha   the config's r is the most common layer rank (the larger on a tie), so the rank pattern lists the
                  fewest layers; it is a bookkeeping choice, not a typical layer's rank, so when it is not the rank
                  of most layers its reason says so and gives how many layers hold it, the range and the median
                  of the layer ranks (`formatting.rank_summary`). rsLoRA's scale s = alpha / √r with
                  alpha = 2√8, so a layer of any rank r gets s = 2√(8 / r): the tuned default's s = 2 at r = 8
                  (r = 8, alpha = 16), and under Adam the same size of step at every rank (each entry of B moves
                  about lr a step, and s B A sums r of them: s√r is what must stay fixed). With s = alpha / r fixed
                  instead (alpha = 2r), a larger rank steps harder: MiniLM on all its linear layers at r = 15 reached
                  0.741 that way against 0.782 with rsLoRA, and collapsed to the majority guess in a longer run
                  (BENCHMARKS.md, the advisor). A method without rsLoRA gets alpha 2√(8 r) per layer, the same s.
    init          the layers' init weighted by their parameter count.
    optimizer     lora_rite (gauge-invariant, Adam-like) when most measured layers need an ill-conditioned update
                  well above the noise: the kept singular values above STRONG x τ span a ratio >= ILL_CONDITIONED.
                  The sensing benchmark: without noise, LoRA-RITE reaches 4e-16 at κ up to 1000 where AdamW
                  stalls near 1e-3; with noise every tuned optimizer reaches the same floor, so AdamW otherwise.
    method        rank augmentation (MoRA) when most layers need more than max_rank; a shared adapter (LoTR, the
                  best of the shared methods at LoRA's budget in the cross-layer benchmark) when `adapters` copies
                  of LoRA would not fit `storage_bytes`; DoRA when the layers need rank <= DORA_MAX_RANK (its
                  magnitude vector adds a per-output degree of freedom outside the rank budget) and it fits; else
                  LoRA (on `classify`, DoRA was within 0.3 points of LoRA at r = 8 for 6% more parameters).
    base          the widest format among bf16, int8, nf4 whose estimated total fits the memory budget; the reason
                  names what the estimate counts (base, adapters, gradients, optimizer states, and activations at
                  the training batch shape and device), since `--verify` checks another step on another device.
    serving       merge for one adapter (no inference cost); unmerged multi-adapter serving for several.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .formatting import format_bytes as _bytes
from .formatting import rank_summary
from .measure import LayerMeasurement

__all__ = [
    "ALIGNED",
    "DEFAULT_RANK",
    "DORA_MAX_RANK",
    "ILL_CONDITIONED",
    "REFERENCE_ALPHA",
    "REFERENCE_RANK",
    "SHARP",
    "STRONG",
    "Choice",
    "choose_alpha",
    "choose_base",
    "choose_init",
    "choose_method",
    "choose_optimizer",
    "choose_rank",
    "choose_serving",
    "layer_alpha",
    "layer_init",
    "layer_rank",
]

#: mean squared cosine between the gradient's top-k subspaces and W0's that counts as "lies in" (random: k / n)
ALIGNED = 0.5
#: energy fraction of the gradient in its top-k singular values that counts as a sharp spectrum
SHARP = 0.8
#: singular values at least this many thresholds τ above the noise count as strong signal
STRONG = 3.0
#: condition number of the strong part of the gradient above which the factors would be ill-conditioned
ILL_CONDITIONED = 10.0
#: the rank without calibration data: the tuned default of `loraredux train` (README)
DEFAULT_RANK = 8
#: the tuned default of `loraredux train` (README): its scale s = alpha / r = 2 at rank 8 is what every rank keeps
REFERENCE_RANK, REFERENCE_ALPHA = 8, 16.0
#: DoRA only when the layers need at most this rank
DORA_MAX_RANK = 2


@dataclass(frozen=True)
class Choice:
    """A decision and the measured reason for it."""

    value: Any
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "reason": self.reason}


def _g(x: float) -> str:
    return f"{x:.3g}"


# ------------------------------------------------------------------------------------------------- per layer


def layer_rank(
    m: LayerMeasurement, *, min_rank: int = 1, max_rank: int = 64, limit: int | None = None
) -> Choice:
    """The layer's rank: the Gavish-Donoho rank of its mean gradient, clipped to [min_rank, max_rank] (and to
    `limit`, the layer's min(out, in)); `DEFAULT_RANK` without a measured noise level."""
    if min_rank < 1 or max_rank < min_rank:
        raise ValueError(f"need 1 <= min_rank <= max_rank, got {min_rank} and {max_rank}")
    top = min(max_rank, limit) if limit is not None else max_rank
    if m.needed_rank is None or m.threshold is None:
        r = max(min(DEFAULT_RANK, top), min(min_rank, top))
        why = (
            "no gradient noise was measured (calibration needs at least 2 batches)"
            if m.gradient is not None
            else "no calibration data, so the rank the task needs cannot be measured"
        )
        return Choice(
            r, f"rank {r}: {why}; {DEFAULT_RANK} is the tuned default of `loraredux train`"
        )
    k = m.needed_rank
    head = (
        f"{k} singular value{'s' if k != 1 else ''} of the mean gradient stand{'s' if k == 1 else ''} above "
        f"the Gavish-Donoho threshold τ = {_g(m.threshold)} (noise σ = {_g(m.noise or 0.0)} per entry, from "
        "two halves of the batches)"
    )
    if k == 0:
        head = (
            f"no singular value of the mean gradient stands above the Gavish-Donoho threshold τ = "
            f"{_g(m.threshold)} (largest {_g(_top(m))}, noise σ = {_g(m.noise or 0.0)}): the data support no "
            "direction yet"
        )
    r = min(max(k, min_rank), top)
    if r > k:
        return Choice(r, f"rank {r}, the minimum: {head}")
    if r < k:
        return Choice(r, f"rank {r}, capped: {head}; the cap is {top}")
    return Choice(r, f"rank {r}: {head}")


def _top(m: LayerMeasurement) -> float:
    return float(m.gradient_values[0]) if m.gradient_values is not None else 0.0


def layer_init(
    m: LayerMeasurement, rank: int, *, preserve: bool = False, new_head: bool = False
) -> Choice:
    """The layer's init from where its gradient lies (see the module docstring); `preserve` asks to keep the
    pretrained knowledge (MiLoRA's minor subspace) whenever the gradient holds any signal; `new_head`: the loss
    passes through a newly drawn head trained in full, so the gradient's subspace is not evidence (kaiming)."""
    if new_head and not preserve:
        return Choice(
            "kaiming",
            "kaiming (B = 0): the loss passes through a newly drawn head, so the gradient at W0 points where "
            "that random head pulls, not where the task's update lies (MiniLM on Rotten Tomatoes, all linear "
            "layers: a LoRA-One start from it ended at the majority guess, 0.578, where B = 0 reached 0.782)",
        )
    if m.gradient is None:
        if preserve:
            return Choice(
                "milora",
                "milora: prior knowledge is to be protected (asked), so the adapter starts in W0's minor "
                "subspace; no calibration data to check where the update lies",
            )
        return Choice(
            "kaiming",
            "kaiming (B = 0): no calibration data, so nothing shows where the update lies; B = 0 carries "
            "nothing and assumes nothing",
        )
    k = max(rank, 1)
    n = m.weight.numerical_rank or 1
    chance = f"chance {_g(k / max(n, k))}"
    pa, ma = m.principal_alignment or 0.0, m.minor_alignment or 0.0
    signal = m.needed_rank is None or m.needed_rank > 0
    energy = float(m.gradient.energy[min(k, len(m.gradient.energy)) - 1])
    if signal and pa >= ALIGNED and pa >= ma:
        return Choice(
            "pissa",
            f"pissa: the gradient's top-{k} subspaces lie in W0's principal ones (alignment {_g(pa)} >= "
            f"{ALIGNED}, {chance}), so starting on W0's top singular directions starts where the update is",
        )
    if signal and (ma >= ALIGNED or preserve):
        why = (
            f"the gradient's top-{k} subspaces lie in W0's minor ones (alignment {_g(ma)} >= {ALIGNED}, "
            f"{chance})"
            if ma >= ALIGNED
            else f"prior knowledge is to be protected (asked; minor alignment {_g(ma)})"
        )
        return Choice("milora", f"milora: {why}, so the adapter starts in W0's minor subspace")
    if signal and energy >= SHARP:
        return Choice(
            "lora_one",
            f"lora_one: the gradient's spectrum is sharp (its top {k} singular values hold {_g(energy)} >= "
            f"{SHARP} of its energy) but lies in neither of W0's subspaces (principal {_g(pa)}, minor "
            f"{_g(ma)}), so the start is the gradient's own top subspace",
        )
    if not signal:
        return Choice(
            "kaiming",
            "kaiming (B = 0): the gradient is noise at this calibration size, so no subspace is reliable",
        )
    return Choice(
        "kaiming",
        f"kaiming (B = 0): the gradient's top {k} hold {_g(energy)} < {SHARP} of its energy and align with "
        f"neither of W0's subspaces (principal {_g(pa)}, minor {_g(ma)}, {chance}); a base-moving start would "
        "spend rank carrying W0's directions (teacher-student benchmark)",
    )


# ------------------------------------------------------------------------------------------------- global


def layer_alpha(rank: int) -> float:
    """The alpha that gives a rank-`rank` layer (scale s = alpha / r) the step size of the tuned default:
    s = (REFERENCE_ALPHA / REFERENCE_RANK) √(REFERENCE_RANK / r), so alpha = (REFERENCE_ALPHA / REFERENCE_RANK)
    √(REFERENCE_RANK r), 16 at rank 8."""
    return REFERENCE_ALPHA / REFERENCE_RANK * math.sqrt(REFERENCE_RANK * rank)


def choose_alpha(rank: int, rslora: bool) -> Choice:
    """The config's alpha: with rsLoRA (s = alpha / √r) one alpha for every layer, else `layer_alpha(rank)` (and
    the others in an alpha pattern); see the module docstring."""
    s_ref = REFERENCE_ALPHA / REFERENCE_RANK
    why = (
        f"every layer of rank r then gets s = {s_ref:g}√({REFERENCE_RANK}/r): the tuned default's s = {s_ref:g} "
        f"(r = {REFERENCE_RANK}, alpha = {REFERENCE_ALPHA:g}) at r = {REFERENCE_RANK}, and under Adam the same "
        "size of step at any rank; with alpha = 2r instead, a larger rank steps harder (MiniLM all-linear r = 15: "
        "0.741 against 0.782 with rsLoRA)"
    )
    if rslora:
        alpha = s_ref * math.sqrt(REFERENCE_RANK)
        return Choice(alpha, f"alpha {alpha:.4g} with rsLoRA's scale s = alpha / √r: {why}")
    alpha = layer_alpha(rank)
    return Choice(
        alpha,
        f"alpha {alpha:.4g} = {s_ref:g}√({REFERENCE_RANK} x {rank}), per layer in the alpha pattern: {why}",
    )


def choose_rank(ranks: Mapping[str, int]) -> Choice:
    """The config's rank: the most common layer rank (the larger on a tie), so the rank pattern lists the fewest
    layers. Its reason says how many layers hold it and, when that is not most of them, that it is not a typical
    layer's rank, with the layer ranks' range and median (`formatting.rank_summary`)."""
    if not ranks:
        raise ValueError("no layer ranks to choose from")
    counts = Counter(ranks.values())
    top = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
    others = len(ranks) - counts[top]
    summary = rank_summary(list(ranks.values()), top)
    if not others:
        return Choice(top, f"rank {top}: every one of the {len(ranks)} layers needs it")
    pattern = (
        "the other layer gets its own rank in the rank pattern"
        if others == 1
        else f"the {others} others get their own rank in the rank pattern"
    )
    if counts[top] * 2 > len(ranks):
        return Choice(top, f"rank {top}, the rank of most layers ({summary}); {pattern}")
    return Choice(
        top,
        f"rank {top} is only the config's r ({summary}): the most common layer rank, chosen so that the rank "
        f"pattern lists the fewest layers, not the rank most layers get; {pattern}",
    )


def choose_init(inits: Mapping[str, Choice], weights: Mapping[str, int] | None = None) -> Choice:
    """The config's init: the layers' choice weighted by `weights` (parameter counts; equal by default)."""
    if not inits:
        raise ValueError("no layer inits to choose from")
    tally: Counter[str] = Counter()
    for path, choice in inits.items():
        tally[choice.value] += (weights or {}).get(path, 1)
    total = sum(tally.values())
    value, score = max(tally.items(), key=lambda kv: (kv[1], kv[0] == "kaiming"))
    layers = sum(1 for c in inits.values() if c.value == value)
    first = next(c.reason for c in inits.values() if c.value == value)
    reason = first.split(": ", 1)[1] if ": " in first else first
    if layers == len(inits):
        return Choice(value, f"{value}: every layer ({len(inits)}): {reason}")
    rest = ", ".join(f"{k} {v / total:.0%}" for k, v in tally.most_common() if k != value)
    return Choice(
        value,
        f"{value}: {layers} of {len(inits)} layers, {score / total:.0%} of the adapted weights ({rest}); "
        f"for example: {reason}",
    )


def _strong_condition(m: LayerMeasurement) -> float | None:
    if m.gradient_values is None or m.threshold is None:
        return None
    strong = m.gradient_values[m.gradient_values >= STRONG * m.threshold]
    if len(strong) < 2:
        return None
    return float(strong[0] / strong[-1])


def choose_optimizer(
    measurements: Mapping[str, LayerMeasurement], *, shared: bool = False
) -> Choice:
    """adamw, or lora_rite when most measured layers need an ill-conditioned update well above the noise (see the
    module docstring); adamw for a shared (cross-layer) method, which the pair optimizers do not train."""
    if shared:
        return Choice(
            "adamw",
            "adamw: a shared adapter has no per-layer factor pair for a gauge-invariant optimizer to precondition",
        )
    conds = {p: _strong_condition(m) for p, m in measurements.items()}
    measured = [c for c in conds.values() if c is not None]
    noisy = sum(1 for m in measurements.values() if m.threshold is not None) - len(measured)
    if not measured:
        why = (
            "no layer's gradient has two singular values well above the noise"
            if any(m.threshold is not None for m in measurements.values())
            else "no gradient noise was measured, so the update's conditioning is unknown"
        )
        return Choice(
            "adamw",
            f"adamw: {why}; with noisy measurements every tuned optimizer reached the same floor in the "
            "sensing benchmark",
        )
    ill = sorted(c for c in measured if c >= ILL_CONDITIONED)
    median = sorted(measured)[len(measured) // 2]
    if len(ill) * 2 > len(measurements):
        return Choice(
            "lora_rite",
            f"lora_rite: {len(ill)} of {len(measurements)} layers need an update whose strong singular values "
            f"(>= {STRONG} τ) span κ >= {ILL_CONDITIONED} (median κ {_g(median)}); gauge-invariant steps do not "
            "slow down with κ (sensing benchmark: LoRA-RITE 4e-16 at κ up to 1000, AdamW stalls near 1e-3)",
        )
    return Choice(
        "adamw",
        f"adamw: {len(ill)} of {len(measurements)} layers need an ill-conditioned strong update (κ >= "
        f"{ILL_CONDITIONED}; median κ {_g(median)}, {noisy} layers with at most one strong direction), too few "
        "for a gauge-invariant optimizer to pay; with noise every tuned optimizer reached the same floor in the "
        "sensing benchmark",
    )


def choose_method(
    needed: Mapping[str, int | None],
    ranks: Mapping[str, int],
    *,
    max_rank: int,
    adapters: int = 1,
    storage_bytes: int | None = None,
    adapter_bytes: int | None = None,
    dora_fits: bool = True,
) -> Choice:
    """lora, dora, mora (rank augmentation) or lotr (shared), from the layers' needed ranks, their chosen ranks
    and the storage the `adapters` copies would take (see the module docstring).

    Args:
        needed: the Gavish-Donoho rank per layer (None where unmeasured).
        ranks: the chosen rank per layer.
        max_rank: the rank cap the ranks were clipped to.
        adapters: how many adapters of this shape must be stored or served.
        storage_bytes: the storage they may take (None: no limit).
        adapter_bytes: one LoRA adapter's file size at the chosen ranks.
        dora_fits: whether DoRA's estimate fits the memory budget.
    """
    if adapters < 1:
        raise ValueError(f"adapters must be >= 1, got {adapters}")
    if storage_bytes is not None and adapter_bytes is not None:
        total = adapters * adapter_bytes
        if total > storage_bytes:
            return Choice(
                "lotr",
                f"lotr: {adapters} LoRA adapters take {_bytes(total)}, over the {_bytes(storage_bytes)} of "
                "storage; LoTR shares one basis across layers and was the most accurate shared method at "
                "LoRA's parameter budget (cross-layer benchmark: 0.766 against LoRA's 0.774)",
            )
    measured = {p: k for p, k in needed.items() if k is not None}
    if measured:
        over = [p for p, k in measured.items() if k > max_rank]
        if len(over) * 2 > len(measured):
            return Choice(
                "mora",
                f"mora: {len(over)} of {len(measured)} layers need more than the rank cap {max_rank} (Gavish-"
                f"Donoho ranks up to {max(measured.values())}); rank augmentation reaches a higher-rank update "
                "at the same parameter count (MoRA, arXiv 2405.12130; not benchmarked here)",
            )
        low = [p for p in measured if ranks[p] <= DORA_MAX_RANK]
        if len(low) * 2 > len(measured) and dora_fits:
            return Choice(
                "dora",
                f"dora: {len(low)} of {len(measured)} layers need rank <= {DORA_MAX_RANK}, where DoRA's "
                "magnitude vector adds a per-output degree of freedom outside the rank budget for about 3% of a "
                "training step (methods benchmark: 1.03 x LoRA's step time)",
            )
    return Choice(
        "lora",
        "lora: the needed ranks fit under the cap, so no rank augmentation; DoRA was within 0.3 points of LoRA "
        "on classify at r = 8 for 6% more parameters, so it does not earn its cost at these ranks",
    )


def choose_base(
    totals: Mapping[str, int],
    budget_bytes: int | None,
    *,
    current: str = "bf16",
    counts: str | None = None,
) -> Choice:
    """The widest base format whose estimated total (`totals`: {format: bytes}, widest first) fits the budget;
    `counts` says what each estimate counts (added to the reason, so it is not taken for another figure)."""
    if not totals:
        raise ValueError("no memory estimates to choose a base format from")
    what = f"; each estimate counts {counts}" if counts else ""
    if budget_bytes is None:
        value = current if current in totals else next(iter(totals))
        return Choice(
            value,
            f"{value}: no memory budget given; the training estimate at {value} is "
            f"{_bytes(totals[value])}{what}",
        )
    for fmt, total in totals.items():
        if total <= budget_bytes:
            wider = [f"{f} {_bytes(t)}" for f, t in totals.items() if t > budget_bytes]
            extra = f" ({', '.join(wider)} would not fit)" if wider else ""
            return Choice(
                fmt,
                f"{fmt}: the widest format whose training estimate, {_bytes(total)}, fits the "
                f"{_bytes(budget_bytes)} budget{extra}{what}",
            )
    fmt, total = min(totals.items(), key=lambda kv: kv[1])
    return Choice(
        fmt,
        f"{fmt}: nothing fits the {_bytes(budget_bytes)} budget; {fmt} is the smallest at {_bytes(total)}: "
        f"lower the batch size or the sequence length (activations grow with both){what}",
    )


def choose_serving(adapters: int, base_bytes: int | None = None) -> Choice:
    """merge for one adapter, unmerged multi-adapter serving for several."""
    if adapters < 1:
        raise ValueError(f"adapters must be >= 1, got {adapters}")
    if adapters == 1:
        return Choice(
            "merge",
            "merge: one adapter, so `lx.merge_` (or `loraredux merge`) folds it into W0 and inference costs "
            "exactly the base model's",
        )
    copies = (
        f" ({adapters} merged copies of the base would take {_bytes(adapters * base_bytes)})"
        if (base_bytes)
        else ""
    )
    return Choice(
        "unmerged-multi-adapter",
        f"unmerged-multi-adapter: {adapters} adapters share one base{copies}; keep them unmerged and serve "
        "them together (vLLM's or S-LoRA's multi-LoRA batching reads the PEFT files loraredux writes)",
    )


def weights_of(shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Parameter counts {path: out * in} for `choose_init`'s weighting."""
    return {p: int(math.prod(s)) for p, s in shapes.items()}
