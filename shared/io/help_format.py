"""One `--help` style for every draftwire parser: each option's help ends with its default.

`HelpParser` is an ArgumentParser whose help formatter appends `(default: X)` the way
argparse.ArgumentDefaultsHelpFormatter does, except where there is nothing to tell: a default of None, an
empty list, or a switch (`store_true` and friends: off unless given). Lists print comma-separated, as they
are typed. Subparsers inherit the class (argparse makes them with `type(parent)`), so one root is enough.
"""

from __future__ import annotations

import argparse
import copy


def shows_default(action: argparse.Action) -> bool:
    """Whether an option's help must state its default (the rule tests/test_help.py checks)."""
    if not action.option_strings or action.default in (None, argparse.SUPPRESS):
        return False
    if isinstance(action.default, (list, tuple)) and not action.default:
        return False
    return not (action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction))


def default_text(default: object) -> str:
    if isinstance(default, (list, tuple)):
        return ",".join(str(v) for v in default)
    return str(default)


class DefaultsFormatter(argparse.HelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or not shows_default(action):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"

    def _expand_help(self, action: argparse.Action) -> str:
        if isinstance(action.default, (list, tuple)):
            action = copy.copy(action)
            action.default = default_text(action.default)
        return super()._expand_help(action)


class HelpParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)
