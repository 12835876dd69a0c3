"""Axis 1 of the taxonomy: one file per method. Importing this package registers every method."""

from .dora import DoRA, DoRAConfig
from .lora import LoRA, LoRAConfig

__all__ = ["DoRA", "DoRAConfig", "LoRA", "LoRAConfig"]
