"""Shared DiT building blocks: each exists once and every model composes them."""
