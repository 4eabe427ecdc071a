"""compose.yaml run on a real Docker engine and checked from the host, as a user would (marker `docker`).

`deploy/compose-offline.sh up` builds what is missing and starts compose.yaml with deploy/compose.offline.yaml
(local base images, and an OTLP receiver that answers Jaeger's query API in Jaeger's place); with
DRAFTWIRE_ONLINE=1 the same script runs compose.yaml alone, with Docker Hub's images. Then, from the host:
every service healthy through its own health check; a greedy prompt on NATS (TLS, the client identity the
keys service wrote) equal to the in-process engine, its trace at the trace store with spans of >= 3
services; /metrics on its published port; a verifier that crashes mid-request restarted by the restart
policy with the request still completing identically; `down` leaving no containers; a second `up`
reusing the model cache volume. Slow (minutes: images, model loading); deselected by default.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import nats
import pytest
import yaml

from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.speculation import LocalEngine
from draftwire.shared.models.runtime import load_model

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "compose-offline.sh"
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES = ("nats", "jaeger", "scheduler", "verifier", "draft", "telemetry", "gateway")
PROJECT = os.environ.get("COMPOSE_PROJECT_NAME", "draftwire")
SECRETS = ROOT / "deploy" / "secrets"
PROMPT = "def fibonacci(n):"
N = 64


def run(*args: str, timeout: float = 120, env: dict | None = None) -> str:
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    assert out.returncode == 0, f"{' '.join(args)}: {out.stdout[-2000:]}{out.stderr[-3000:]}"
    return out.stdout


def script(*args: str, timeout: float = 1800) -> str:
    return run(str(SCRIPT), *args, timeout=timeout)


def container(service: str) -> str:
    ids = script("ps", "-q", service, timeout=60).split()
    assert len(ids) == 1, (service, ids)
    return ids[0]


def inspect(cid: str) -> dict:
    return json.loads(run("docker", "inspect", cid))[0]


def project_containers() -> list[str]:
    return run("docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}").split()


def up(**env: str) -> float:
    t0 = time.monotonic()
    run(str(SCRIPT), "up", timeout=1800, env={**os.environ, **env})
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def stack():
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True,
                                                                           check=False).returncode:
        pytest.fail("the docker marker needs a running Docker engine (`docker info` fails)")
    try:
        seconds = up()
        print(f"\nup (builds included) to healthy: {seconds:.0f} s")
        yield
    finally:
        script("down")  # nothing left running, whatever happened


@pytest.fixture(scope="module")
def reference() -> list[int]:
    """Greedy tokens of the in-process engine, with the pair and settings compose.yaml gives the services."""
    env = {s: {k: str(v) for k, v in COMPOSE["services"][s]["environment"].items()} for s in ("verifier", "draft")}
    target = load_model(env["verifier"]["DRAFTWIRE_TARGET_MODEL"], env["verifier"]["DRAFTWIRE_TARGET_DTYPE"],
                        progress=False)
    draft = load_model(env["draft"]["DRAFTWIRE_DRAFT_MODEL"], env["draft"]["DRAFTWIRE_DRAFT_DTYPE"], progress=False)
    ids = target.encode(PROMPT)
    return LocalEngine(target, draft).generate(ids, SamplingParams(max_new_tokens=N, min_new_tokens=N),
                                               SpecParams()).token_ids


async def _client() -> nats.NATS:
    """As README's compose section says: the client identity and the CA from deploy/secrets, TLS on :4222."""
    tls = ssl.create_default_context(cafile=str(SECRETS / "tls" / "ca.pem"))
    return await nats.connect("tls://localhost:4222", nkeys_seed=str(SECRETS / "client.nk"),
                              inbox_prefix="_INBOX.client", tls=tls, connect_timeout=5)


def _prompt(request_id: str, n: int, **extra) -> bytes:
    return json.dumps({"id": request_id, "prompt": PROMPT, "max_new_tokens": n, "min_new_tokens": n,
                       "temperature": 0, **extra}).encode()


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read()


def _ask(request_id: str, n: int) -> dict:
    async def ask() -> dict:
        nc = await _client()
        try:
            return json.loads((await nc.request("draftwire.prompts.client", _prompt(request_id, n), timeout=300)).data)
        finally:
            await nc.close()

    return asyncio.run(ask())


def test_every_service_is_healthy_through_its_own_health_check(stack):
    for service in SERVICES:
        state = inspect(container(service))
        health = state["State"].get("Health")
        declared = COMPOSE["services"][service].get("healthcheck")
        if health is None:  # only Jaeger's own image, which compose.yaml gives no check (its stand-in has one)
            assert declared is None and state["State"]["Status"] == "running", (service, state["State"])
            continue
        assert health["Status"] == "healthy", (service, state["State"])
        assert health["Log"] and health["Log"][-1]["ExitCode"] == 0, (service, health["Log"][-1:])
        if declared:  # the check that ran is the one compose.yaml declares
            assert state["Config"]["Healthcheck"]["Test"] == declared["test"], service
    keys = inspect(container("keys"))["State"]
    assert keys["Status"] == "exited" and keys["ExitCode"] == 0


def test_the_image_runs_as_a_non_root_user_without_test_dependencies(stack):
    image = inspect(container("verifier"))["Config"]["Image"]
    config = json.loads(run("docker", "image", "inspect", image))[0]
    assert config["Config"]["User"] not in ("", "0", "root")
    out = run("docker", "run", "--rm", "--entrypoint", "python", image, "-c",
              "import importlib.util as u, os; print(os.getuid(), [m for m in ('pytest', 'hypothesis', 'scipy',"
              " 'openai', 'ruff') if u.find_spec(m)])")
    uid, missing = out.split(" ", 1)
    assert uid != "0" and missing.strip() == "[]", out
    print(f"\nimage {image}: {config['Size'] / 1e9:.2f} GB")


def test_a_greedy_prompt_on_nats_equals_the_engine_and_its_trace_spans_three_services(stack, reference):
    trace_id = os.urandom(16).hex()

    async def ask() -> dict:
        nc = await _client()
        try:
            msg = await nc.request("draftwire.prompts.client", _prompt("greedy", N), timeout=300,
                                   headers={"traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01"})
            return json.loads(msg.data)
        finally:
            await nc.close()

    result = asyncio.run(ask())
    assert "error" not in result, result
    assert result["token_ids"] == reference

    # Jaeger's query API (the offline receiver answers the same one): the services export in batches
    jaeger = COMPOSE["services"]["jaeger"]["ports"]
    query_port = next(p.split(":")[0] for p in jaeger if p.endswith(":16686"))
    services: set[str] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            _, body = _get(f"http://localhost:{query_port}/api/traces/{trace_id}")
            trace = json.loads(body)["data"][0]
            services = {p["serviceName"] for p in trace["processes"].values()}
            if len(services) >= 3:
                break
        except OSError:  # 404 until the first span of the trace arrives
            pass
        time.sleep(1)
    assert {"draftwire-scheduler", "draftwire-draft", "draftwire-verifier"} <= services, services


def test_metrics_answer_on_their_published_port(stack):
    port = COMPOSE["services"]["telemetry"]["ports"][0].split(":")[0]
    deadline = time.monotonic() + 30
    while True:  # the request of the test before is counted once its event reaches telemetry
        status, body = _get(f"http://localhost:{port}/metrics")
        text = body.decode()
        counted = [line for line in text.splitlines() if line.startswith("draftwire_requests_total")]
        if counted and sum(float(line.rsplit(" ", 1)[1]) for line in counted) >= 1 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert status == 200 and "draftwire_spec_decode_num_drafts_total" in text
    assert counted and sum(float(line.rsplit(" ", 1)[1]) for line in counted) >= 1, counted


def test_a_crashed_verifier_is_restarted_by_its_policy_and_the_request_in_flight_completes(stack, reference):
    """The crash is the verifier's process SIGKILLed from the host (as the OOM killer would). `docker kill`
    itself is a deliberate stop for Docker: no restart policy restarts a container stopped by it."""
    cid = container("verifier")
    before = inspect(cid)
    assert before["HostConfig"]["RestartPolicy"]["Name"] == COMPOSE["services"]["verifier"]["restart"]

    async def ask_and_crash() -> dict:
        nc = await _client()
        try:
            streaming = asyncio.Event()

            async def on_chunk(_msg) -> None:
                streaming.set()

            await nc.subscribe("draftwire.stream.client.crash", cb=on_chunk)
            pending = asyncio.ensure_future(nc.request("draftwire.prompts.client",
                                                       _prompt("crash", N, stream=True), timeout=300))
            await asyncio.wait_for(streaming.wait(), 120)  # in flight: a round is verified
            os.kill(before["State"]["Pid"], signal.SIGKILL)
            return json.loads((await pending).data)
        finally:
            await nc.close()

    result = asyncio.run(ask_and_crash())
    after = inspect(cid)
    assert after["RestartCount"] == before["RestartCount"] + 1 and after["State"]["Pid"] != before["State"]["Pid"]
    assert "error" not in result, result
    assert result["token_ids"] == reference
    assert result["stats"]["failovers"] >= 1
    deadline = time.monotonic() + 300
    while inspect(cid)["State"]["Health"]["Status"] != "healthy":
        assert time.monotonic() < deadline, "the restarted verifier never became healthy"
        time.sleep(2)


def _model_markers() -> str:
    """The converted models' markers in the model cache volume (`converted_at` says when each was made)."""
    return run("docker", "exec", container("verifier"), "sh", "-c", "cat /cache/models/*/draftwire.json")


def test_down_leaves_no_containers_and_a_second_up_reuses_the_model_cache(stack, reference):
    markers = _model_markers()
    assert "smollm2-135m" in markers
    script("down")
    assert project_containers() == []
    seconds = up()
    print(f"\nsecond up to healthy: {seconds:.0f} s")
    assert _model_markers() == markers  # not downloaded and converted again

    assert _ask("again", 16)["token_ids"] == reference[:16]


def test_the_gateway_and_the_nats_monitor_answer_on_their_published_ports(stack, reference):
    port = COMPOSE["services"]["gateway"]["ports"][0].split(":")[0]
    body = json.dumps({"model": "smollm2-135m", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://localhost:{port}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        completion = json.loads(r.read())
    assert completion["usage"]["completion_tokens"] == 8
    target = load_model("smollm2-135m", "fp32", progress=False)
    assert completion["choices"][0]["text"] == target.decode(reference[:8])
    monitor = next(p.split(":")[0] for p in COMPOSE["services"]["nats"]["ports"] if p.endswith(":8222"))
    assert _get(f"http://localhost:{monitor}/healthz?js-enabled-only=true")[0] == 200


def test_the_radio_profile_puts_the_draft_behind_the_emulated_link(stack, reference):
    """`DRAFTWIRE_DRAFT_NATS=nats://link:4223 docker compose --profile radio up`, as compose.yaml says."""
    radio = {"COMPOSE_PROFILES": "radio", "DRAFTWIRE_DRAFT_NATS": "nats://link:4223"}
    up(**radio)
    link = inspect(container("link"))
    assert link["State"]["Health"]["Status"] == "healthy"
    assert "DRAFTWIRE_NATS_URL=nats://link:4223" in inspect(container("draft"))["Config"]["Env"]
    assert _ask("radio", 16)["token_ids"] == reference[:16]  # drafted through the link (the only draft)
    run(str(SCRIPT), "down", env={**os.environ, **radio})
    assert project_containers() == []
