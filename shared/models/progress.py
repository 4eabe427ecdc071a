"""What a user sees while a model is fetched and loaded: one status line per phase, and a bar where it is long.

Getting a catalog model runs download, extract, checksum, convert and load; the first four only once per
machine, and each can take from seconds to minutes for a 1.1 GB GGUF. Everything goes to stderr, so stdout
stays clean for the command's own output, and nothing is printed when `enabled` is False (services, tests).
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

PHASES = ("download", "extract", "checksum", "convert", "load")
PREFIX = "draftwire"


def status(phase: str, message: str, enabled: bool) -> None:
    """One line, `draftwire <phase>: <message>`, on stderr."""
    if enabled:
        print(f"{PREFIX} {phase}: {message}", file=sys.stderr, flush=True)


def byte_bar(phase: str, total: int, enabled: bool) -> tqdm:
    """A bar in bytes for `phase` (a context manager; does nothing when disabled)."""
    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"{PREFIX} {phase}",
        disable=not enabled,
        file=sys.stderr,
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
