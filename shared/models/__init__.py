"""Model runtime: named models, their cache, and one draft/target interface with rollback-able KV caches.

The catalog/store half imports no torch, so listing models stays instant; the runtime half loads on first use.
"""

from __future__ import annotations

from typing import Any

from .errors import ModelError
from .store import ResolvedSource, list_models, pull, resolve

__all__ = [
    "DTYPES",
    "KVSequence",
    "LoadedModel",
    "ModelError",
    "ResolvedSource",
    "list_models",
    "load_model",
    "pull",
    "resolve",
]

_RUNTIME_NAMES = {"DTYPES", "KVSequence", "LoadedModel", "load_model"}


def __getattr__(name: str) -> Any:
    if name in _RUNTIME_NAMES:
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
