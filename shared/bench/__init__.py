"""Prompt sets that ship with the repository (so a fresh clone's benchmarks and checks are reproducible).

`chat.jsonl`: 32 chat prompts the project wrote (OpenAI's `messages` shape, one user turn each), sent through
the target's chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHAT_SET = HERE / "chat.jsonl"


def load_set(path: str | Path = CHAT_SET) -> list[dict]:
    """Rows of a JSONL prompt file; a clear error for a missing file or a bad line, never a silent fallback."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompt set {file} does not exist")
    rows = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{file}:{n}: not JSON: {exc}") from None
    return rows
