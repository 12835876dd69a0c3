"""Axis 1 of the taxonomy: one file per method. Importing this package registers every method."""

from .lora import LoRA, LoRAConfig

__all__ = ["LoRA", "LoRAConfig"]
