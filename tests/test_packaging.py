"""The installed distribution lives under one `draftwire` namespace, whatever the repository's folders are called."""

import pathlib
import subprocess
import sys
import tomllib
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def package_folders() -> set[str]:
    return {"draftwire." + ".".join(init.parent.relative_to(ROOT).parts)
            for top in ("shared", "services") for init in (ROOT / top).rglob("__init__.py")}


def test_every_package_folder_is_listed_in_pyproject():
    """A new package folder not listed would import from the checkout and be missing from the wheel."""
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == package_folders()


def test_the_wheel_installs_only_the_draftwire_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=180)
    (wheel,) = tmp_path.glob("draftwire-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"draftwire"}
    assert "draftwire/shared/bench/prompts.jsonl" in names
    assert "draftwire/services/cli/main.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "draftwire = draftwire.services.cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()
