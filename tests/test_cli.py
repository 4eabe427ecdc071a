"""The `draftwire` command line as a user runs it: clear errors, and `up` + `generate` + Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "draftwire.services.cli"]
TINY = ["--draft-model", "tiny-random", "--target-model", "tiny-random"]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--k", "0"], "k must be"),
        (["--gamma", "0"], "gamma must be"),
        (["--temperature", "-1"], "temperature must be"),
        (["--top-p", "1.5"], "top_p must be"),
        (["--min-new-tokens", "9", "--max-new-tokens", "8"], "min_new_tokens"),
        (["--target-model", "no-such-model"], "unknown model name"),
        (["--target-model", "/nonexistent/model.gguf"], "no such file"),
        (["--policy", "magic"], "invalid choice"),
        (["--confidence", "2"], "confidence must be"),
        (["--link", "wifi7"], "unknown link profile"),
        (["--link", "up=2M"], "needs up=, down= and rtt="),
        (["--link", "lan,rtt=soon"], "bad duration"),
    ],
)
def test_generate_bad_input_is_a_clear_error(flags: list[str], message: str) -> None:
    out = run_cli("generate", "--local", "hello", *TINY, *flags)
    assert out.returncode == 2, out.stderr
    assert "error:" in out.stderr and message in out.stderr
    assert "Traceback" not in out.stderr


def test_link_belongs_to_the_stack_not_to_a_remote_generate() -> None:
    out = run_cli("generate", "hello", "--link", "cell-edge")
    assert out.returncode == 2 and "draftwire up" in out.stderr


def test_flags_a_request_over_nats_cannot_carry_are_refused_not_ignored() -> None:
    out = run_cli("generate", "--quant", "u8", "--target-model", "qwen2.5-coder-1.5b", "hi")
    assert out.returncode != 0 and "--target-model, --quant only apply with --local" in out.stderr


def test_version() -> None:
    out = run_cli("--version")
    assert out.returncode == 0 and re.fullmatch(r"draftwire \d+\.\d+\.\d+\n", out.stdout)


def test_generate_local_json_over_an_emulated_link_with_policies() -> None:
    out = run_cli("generate", "--local", "hello", *TINY, "--draft-dtype", "fp32", "--json", "--link",
                  "up=1M,down=4M,rtt=20ms", "--mode", "dssd", "--policy", "adaptive", "--pipeline",
                  "--max-new-tokens", "8", "--min-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert len(res["token_ids"]) == 8 and res["stats"]["policy"] == "adaptive" and res["stats"]["pipeline"]
    assert res["stats"]["wall_s"] >= 0.02 * res["stats"]["rounds"]  # every round paid the emulated RTT


def test_generate_local_json() -> None:
    out = run_cli("generate", "--local", "hello", *TINY, "--json", "--max-new-tokens", "12",
                  "--min-new-tokens", "12", "--seed", "3", "--temperature", "0.8")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["token_ids"]) == 12 and result["stats"]["new_tokens"] == 12
    assert result["stats"]["seed"] == 3


def test_up_generate_and_sigterm_leave_no_orphans(tmp_path: Path) -> None:
    env = {**os.environ, "DRAFTWIRE_CACHE": str(tmp_path)}
    up = subprocess.Popen(
        [*CLI, "up", *TINY, "--draft-dtype", "fp32", "--nats-port", "0", "--telemetry-port", "0",
         "--gateway-port", "0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        url = None
        deadline = time.monotonic() + 120
        for line in up.stdout:
            if m := re.search(r"NATS at (nats://\S+)", line):
                url = m.group(1)
            if "draftwire: ready" in line or time.monotonic() > deadline:
                break
        assert url, "up never printed its NATS URL"
        children = _children(up.pid)
        assert len(children) >= 5  # nats-server + four services
        out = run_cli("generate", "hello", "--nats", url, "--json", "--max-new-tokens", "6",
                      "--min-new-tokens", "6")
        assert out.returncode == 0, out.stderr
        assert len(json.loads(out.stdout)["token_ids"]) == 6
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
    time.sleep(0.5)
    alive = [pid for pid in children if _alive(pid)]
    assert not alive, f"orphans left behind: {alive}"


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"
