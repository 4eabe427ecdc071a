"""Stop strings: where a generation's decoded text must end, and how much of it may be streamed yet.

OpenAI's `stop`: the text ends just before the first stop string to appear, which is itself left out. The
check runs on decoded text (a stop string may span tokens, or end inside one), after every round; streaming
holds back any tail that could still grow into a stop string, so a client never sees text that the final
result will not contain. Pure functions on strings.
"""

from __future__ import annotations

from collections.abc import Sequence


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index in `text` where the earliest stop string begins, or None; only matches ending after `start`
    are looked for (the text before it was checked already)."""
    if not stops:
        return None
    begin = max(0, start - max(len(s) for s in stops) + 1)
    found = [i for s in stops if (i := text.find(s, begin)) >= 0]
    return min(found) if found else None


def streamable(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be streamed now: all but the longest tail that is a proper prefix of a stop
    string (it may yet become one)."""
    held = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:n]):
                held = n
                break
    return len(text) - held


__all__ = ["find_stop", "streamable"]
