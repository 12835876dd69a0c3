"""VeRA: one pair of frozen random matrices shared by every layer, and two trainable scaling vectors per layer.

    W'_l = W0_l + Λ_b B_l Λ_d A_l,     Λ_b = diag(b) (out,),  Λ_d = diag(d) (r,)
    A_l = A[:, :in_l]  (r, in_l),      B_l = B[:out_l, :]  (out_l, r)

A (r, max_in) and B (max_out, r) are drawn once, Kaiming-uniform (gain sqrt(2), fan-in: bound sqrt(6 / fan_in)), from
a CPU generator seeded with `projection_prng_key`, A first; every layer uses their top-left block of its shape.
b starts at 0 (so W' = W0) and d at `d_initial`. Trainable parameters per layer: out + r.

Kopiczko, Blankevoort, Asano, "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024, arXiv 2310.11454. The
largest-shape bank sliced per layer, the draw order and the initial values are PEFT's (`peft/tuners/vera`), so a
VeRA adapter reads and writes PEFT's files with identical outputs: the shared matrices as `base_model.vera_A` /
`base_model.vera_B` (or regenerated from the seed when `save_projection=False`), each layer's vectors as
`vera_lambda_b` / `vera_lambda_d`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..bases import view_of
from ..core import Adapter, AdapterConfig, initialising, register
from .banks import Bank, BankedAdapter

__all__ = ["VeRA", "VeRABank", "VeRAConfig", "kaiming_uniform"]


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """A float32 (rows, cols) tensor drawn U(-bound, bound), bound = sqrt(3) * sqrt(2) / sqrt(cols) (Kaiming
    uniform with ReLU's gain and fan-in = cols), from `generator`: PEFT's `_kaiming_init`."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


class VeRABank(Bank):
    """VeRA's shared frozen matrices A (r, max_in) and B (max_out, r), regenerated from the seed.

    They are persistent buffers (saved in the adapter file, PEFT's default) when `save_projection`, else
    non-persistent ones that every build draws again from the seed.
    """

    def __init__(
        self,
        rank: int,
        max_out: int,
        max_in: int,
        seed: int,
        save_projection: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__("vera")
        self.seed = seed
        self.save_projection = save_projection
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.register_buffer("A", torch.empty(rank, max_in, **kw), persistent=save_projection)
        self.register_buffer("B", torch.empty(max_out, rank, **kw), persistent=save_projection)
        if (
            initialising() or not save_projection
        ):  # a load fills saved buffers; unsaved ones are drawn
            self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Draw A, then B, from a CPU generator seeded with the seed (PEFT's order and distribution)."""
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        self.A.copy_(kaiming_uniform(tuple(self.A.shape), generator))
        self.B.copy_(kaiming_uniform(tuple(self.B.shape), generator))

    def peft_tensors(self) -> dict[str, Tensor]:
        """The shared tensors PEFT writes under `base_model.` (none without `save_projection`)."""
        return {"vera_A": self.A, "vera_B": self.B} if self.save_projection else {}

    @torch.no_grad()
    def load_peft_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Copy PEFT's `vera_A` / `vera_B` in (they must have the bank's shapes); without them keep the draw.

        Raises:
            ValueError: other names, only one of the two, or other shapes.
        """
        if not tensors:
            return
        if set(tensors) != {"vera_A", "vera_B"}:
            raise ValueError(
                f"expected base_model.vera_A and base_model.vera_B, got {sorted(tensors)}"
            )
        for name, own in (("vera_A", self.A), ("vera_B", self.B)):
            if tuple(tensors[name].shape) != tuple(own.shape):
                raise ValueError(
                    f"base_model.{name}: file {tuple(tensors[name].shape)} vs bank {tuple(own.shape)} "
                    "(rank x largest in, largest out x rank over the target layers)"
                )
        self.A.copy_(tensors["vera_A"])
        self.B.copy_(tensors["vera_B"])

    @classmethod
    def for_layers(cls, config: VeRAConfig, modules: list[nn.Module]) -> VeRABank:
        """The bank for these base layers: the largest in and out among them, their weights' dtype and device."""
        views = [view_of(m) for m in modules]
        W0 = views[0].weight()
        return cls(
            config.rank,
            max(v.out_features for v in views),
            max(v.in_features for v in views),
            config.projection_prng_key,
            config.save_projection,
            W0.dtype,
            W0.device,
        )


class VeRA(BankedAdapter):
    """y = base(x) + ((dropout(x) A_l^T) * d) (B_l * b[:, None])^T."""

    def __init__(self, base: nn.Module, config: VeRAConfig, bank: VeRABank | None = None) -> None:
        super().__init__(base, config, bank)
        W0 = self.base_weight()
        self.lambda_b = nn.Parameter(
            torch.zeros(self.out_features, dtype=W0.dtype, device=W0.device)
        )
        self.lambda_d = nn.Parameter(
            torch.full((config.rank,), config.d_initial, dtype=W0.dtype, device=W0.device)
        )

    def own_bank(self, config: Any, path: str) -> VeRABank:
        return VeRABank.for_layers(config, [self.base])  # a bank of this layer's shape

    def check_bank(self, bank: Any) -> None:
        out, inp, r = self.out_features, self.in_features, self.config.rank
        if bank.A.shape[0] != r or bank.A.shape[1] < inp or bank.B.shape[0] < out:
            raise ValueError(
                f"vera: the bank (A {tuple(bank.A.shape)}, B {tuple(bank.B.shape)}) does not cover a rank-{r} "
                f"layer of out={out}, in={inp}"
            )

    def projections(self) -> tuple[Tensor, Tensor]:
        """(A_l (r, in), B_l (out, r)): this layer's blocks of the shared matrices."""
        return self.bank.A[:, : self.in_features], self.bank.B[: self.out_features, :]

    # -- the spec and the fast path --------------------------------------------------------------------
    def effective_weight(self) -> Tensor:
        A, B = self.projections()
        return self.base_weight() + (self.lambda_b[:, None] * B) @ (self.lambda_d[:, None] * A)

    def lora_form(self) -> tuple[Tensor, Tensor, float]:
        A, B = self.projections()
        return self.lambda_d[:, None] * A, self.lambda_b[:, None] * B, 1.0

    def low_rank(self, h: Tensor) -> tuple[Tensor, Tensor]:
        A, B = self.projections()
        return self.view.project(h, A) * self.lambda_d, B * self.lambda_b[
            :, None
        ]  # y += z (Λ_b B)^T

    # -- PEFT format -----------------------------------------------------------------------------------
    def peft_tensors(self) -> dict[str, Tensor]:
        return {"vera_lambda_b": self.lambda_b, "vera_lambda_d": self.lambda_d}


@register("vera")
@dataclass(frozen=True)
class VeRAConfig(AdapterConfig):
    """VeRA's hyper-parameters, PEFT's defaults (r = 256, seed 0, d_initial = 0.1).

    Args:
        rank: r, the rows of the shared A (VeRA needs a far larger r than LoRA: its per-layer cost is out + r).
        projection_prng_key: the seed A and B are drawn from.
        save_projection: write A and B into the adapter file (PEFT's default); else they are drawn again from the
            seed when loading.
        dropout: dropout on the adapter's input.
        d_initial: the initial value of every entry of d.
    """

    rank: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    dropout: float = 0.0
    d_initial: float = 0.1

    adapter: ClassVar[type[Adapter]] = VeRA
    base_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d")
    peft_type: ClassVar[str | None] = "VERA"
    # PEFT's VeraConfig has neither field (every layer shares one rank), and PEFT warns on a file that has them
    peft_absent_fields: ClassVar[tuple[str, ...]] = ("exclude_modules", "rank_pattern")

    def __post_init__(self) -> None:
        super().__post_init__()
        key = self.projection_prng_key
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise ValueError(f"vera: projection_prng_key must be an integer >= 0, got {key!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"vera: dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)):
            raise ValueError(f"vera: d_initial must be a number, got {self.d_initial!r}")

    def check_shape(self, in_features: int, out_features: int) -> None:
        """Any shape: the shared A and B are at least as large as every target layer (rank may exceed it)."""

    def parameter_count(self, in_features: int, out_features: int) -> int:
        return out_features + self.rank

    def build_layers(
        self, layers: Mapping[str, tuple[nn.Module, AdapterConfig]]
    ) -> dict[str, Adapter]:
        """One bank of the largest (out, in) among the layers, then each layer's adapter on it."""
        different = sorted(path for path, (_, c) in layers.items() if c != self)
        if different:
            raise ValueError(
                f"vera: every layer shares one bank of rank {self.rank}, so a per-layer rank or alpha cannot "
                f"apply (layers {different[:5]})"
            )
        if not layers:
            return {}
        for path, (module, _) in layers.items():
            try:
                kind = view_of(module).kind
            except TypeError as err:
                raise TypeError(f"{path}: {err}") from err
            if kind not in self.base_kinds:
                raise TypeError(
                    f"{path}: vera does not support a {type(module).__name__} base (it supports "
                    f"{', '.join(self.base_kinds)} layers)"
                )
        bank = VeRABank.for_layers(self, [m for m, _ in layers.values()])
        built = {}
        for path, (module, config) in layers.items():
            try:
                built[path] = VeRA(module, config, bank)  # type: ignore[arg-type]
            except (ValueError, TypeError) as err:
                raise type(err)(f"{path}: {err}") from err
        return built

    # -- PEFT format ------------------------------------------------------------------------------
    def peft_fields(self) -> dict[str, Any]:
        """The `adapter_config.json` fields of PEFT's VeraConfig that this config sets."""
        return {
            "r": self.rank,
            "projection_prng_key": self.projection_prng_key,
            "save_projection": self.save_projection,
            "vera_dropout": self.dropout,
            "d_initial": self.d_initial,
            "bias": "none",
            "init_weights": True,
        }

    @classmethod
    def from_peft_fields(cls, fields: dict[str, Any]) -> VeRAConfig:
        """Read PEFT's VeraConfig fields; refuse a bias (PEFT trains it, loraredux's VeRA does not)."""
        if fields.get("bias", "none") not in ("none", None):
            raise ValueError(
                f"PEFT VeRA adapter has bias={fields['bias']!r}, which loraredux's vera does not train; "
                "expected 'none'"
            )
        return cls(
            rank=int(fields.get("r", 256)),
            projection_prng_key=int(fields.get("projection_prng_key", 0)),
            save_projection=bool(fields.get("save_projection", True)),
            dropout=float(fields.get("vera_dropout", 0.0) or 0.0),
            d_initial=float(fields.get("d_initial", 0.1)),
        )
