"""Dataclass configs that also read as mappings, as diffusers' configs do (``config.get(key)``, ``config[key]``,
``dict(config)``): the native VAE's and sampler's configs stand in for diffusers' where pipelines read them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import fields
from typing import Any


class MappingConfig(Mapping):
    """Base of a dataclass whose fields are its keys (a key it lacks: KeyError, so ``get`` gives None)."""

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return (f.name for f in fields(self))

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)
