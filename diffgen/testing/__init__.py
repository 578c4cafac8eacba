"""Tiny random checkpoints in diffusers format, written fully offline (for tests and demos)."""

from diffgen.testing.tiny import TINY_FAMILIES, write_tiny_checkpoint

__all__ = ["TINY_FAMILIES", "write_tiny_checkpoint"]
