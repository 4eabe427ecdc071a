"""Prompt sets that ship with the repository (so a fresh clone's benchmarks and checks are reproducible).

`prompts.jsonl`: the project's benchmark set, 24 raw-completion prompts (`id`, `kind`: chat, code, story,
fact, list, math; `prompt`), copied from the workspace's shared set that every figure in README was measured
on, so a fresh clone reproduces them. `chat.jsonl`: 32 chat prompts the project wrote (OpenAI's `messages`
shape, one user turn each), sent through the target's chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHAT_SET = HERE / "chat.jsonl"
BENCH_SET = HERE / "prompts.jsonl"


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
