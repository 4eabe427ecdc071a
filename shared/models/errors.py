"""The one exception type of the model runtime.

Callers (the CLI, the services) catch a single type and show its message as is, so every message says what
went wrong, with which file or name, and what to do about it.
"""

from __future__ import annotations


class ModelError(RuntimeError):
    """A model could not be found, fetched, converted or loaded."""
