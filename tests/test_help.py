"""Every flag of every draftwire parser (the CLI with all its subcommands, each service, the probe, the link
emulator) has help text, and its --help shows the flag's default (shared/io/help_format.py's rule)."""

from __future__ import annotations

import argparse
import importlib

import pytest

from draftwire.shared.io.help_format import default_text, shows_default

SERVICE_MODULES = ("draft", "gateway", "scheduler", "telemetry", "verifier", "link_emulator")


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    from draftwire.services import probe
    from draftwire.services.cli.main import build_parser

    roots = [("draftwire", build_parser()), ("probe", probe.build_parser())]
    roots += [(name, importlib.import_module(f"draftwire.services.{name}.service").build_parser())
              for name in SERVICE_MODULES]
    found = []
    while roots:
        name, parser = roots.pop()
        found.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                roots += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
    return found


PARSERS = _parsers()


def _problems(name: str, parser: argparse.ArgumentParser) -> list[str]:
    parser.format_help()  # renders: a stray % in a help string would raise here
    formatter = parser._get_formatter()
    out = []
    for action in parser._actions:
        if not action.option_strings:
            continue
        flag = "/".join(action.option_strings)
        if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
            out.append(f"{name} {flag}: no help text")
            continue
        shown = " ".join(formatter._expand_help(action).split())
        if shows_default(action) and default_text(action.default) not in shown:
            out.append(f"{name} {flag}: help does not show its default {action.default!r}: {shown!r}")
    return out


def test_every_parser_is_walked():
    names = {name for name, _ in PARSERS}
    assert {"draftwire generate", "draftwire bench", "draftwire loadtest", "draftwire faults", "draftwire certs",
            "draftwire auth init", "draftwire models pull", "probe", "verifier", "link_emulator"} <= names


@pytest.mark.parametrize(("name", "parser"), PARSERS, ids=[name for name, _ in PARSERS])
def test_every_flag_has_help_with_its_default(name, parser):
    assert _problems(name, parser) == []


def test_the_rendered_help_shows_defaults():
    """The real --help text, not only the formatter's pieces: a list default comma-separated, a switch without one."""
    text = " ".join(dict(PARSERS)["draftwire bench"].format_help().split())
    assert "(default: 1,2,3,4,6,8)" in text
    assert "(default: bench)" in text
    assert "(default: False)" not in text


def test_the_rule_catches_a_missing_help_and_a_hidden_default():
    from draftwire.shared.io.help_format import HelpParser

    p = HelpParser(prog="x", formatter_class=argparse.HelpFormatter)  # the plain formatter hides defaults
    p.add_argument("--rate", type=float, default=2.5, help="a rate")
    p.add_argument("--bare", default="x")
    assert _problems("x", p) == ["x --rate: help does not show its default 2.5: 'a rate'", "x --bare: no help text"]
