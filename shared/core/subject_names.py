"""What may stand in one NATS subject token: request ids, session ids and instance names become subject tokens.

Pure, so the request parser in the core can check ids where they enter, with the same rule and message the
subject builders in `draftwire.shared.io.bus` use. The root of the subject space and the JetStream names live here too,
for `draftwire.shared.io.bus` (which builds the subjects and streams) and `draftwire.shared.core.nats_permissions` (which grants
them) alike.
"""

from __future__ import annotations

import re

ROOT = "draftwire"  # every draftwire subject lives under `draftwire.>`
# The JetStream streams, KV bucket and object store (named here, in the core, so the permissions policy and the I/O layer
# that creates them cannot drift apart)
JOBS_STREAM = "DRAFTWIRE_JOBS"
SUBMIT_STREAM = "DRAFTWIRE_SUBMIT"
DONE_STREAM = "DRAFTWIRE_DONE"
DELIVERED_BUCKET = "DRAFTWIRE_DELIVERED"
VOCAB_BUCKET = "DRAFTWIRE_VOCAB"  # object store: target tokenizers, each object named by its vocabulary digest

_BAD_TOKEN = re.compile(r"[\s.*>]")
_MAX_TOKEN = 256


def validate_token(value: str, what: str = "id") -> str:
    """Return `value` if it is usable as one NATS subject token, else raise a ValueError that says why."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > _MAX_TOKEN:
        raise ValueError(f"{what} is longer than {_MAX_TOKEN} characters: {value[:40]!r}...")
    if bad := _BAD_TOKEN.search(value):
        raise ValueError(
            f"{what} {value!r} is not a valid NATS subject token: contains {bad.group()!r} "
            "(whitespace, '.', '*' and '>' are not allowed)"
        )
    return value
