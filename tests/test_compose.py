"""compose.yaml and the Dockerfile, checked without a Docker engine.

Every command is a real entry point (it imports and answers --help), every DRAFTWIRE_* variable set in the
file is one the code reads, and the ports and URLs agree with each other. tests/test_compose_docker.py
(marker `docker`) runs the stack on a Docker engine.
"""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
DRAFTWIRE = ("scheduler", "verifier", "draft", "telemetry", "gateway")


def _env(name: str) -> dict:
    """The service's environment as compose resolves it when no override is set (`${VAR:-default}`)."""
    return {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v))
            for k, v in SERVICES[name].get("environment", {}).items()}


def test_compose_has_the_whole_system() -> None:
    assert set(SERVICES) >= {"nats", *DRAFTWIRE, "jaeger"}
    for name in (*DRAFTWIRE, "nats"):
        assert "healthcheck" in SERVICES[name], name


@pytest.mark.parametrize("name", DRAFTWIRE)
def test_service_command_is_a_real_entry_point(name: str) -> None:
    cmd = SERVICES[name]["command"]
    assert cmd[:3] == ["python", "-m", f"draftwire.services.{name}"]
    out = subprocess.run([sys.executable, *cmd[1:], "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    probe = SERVICES[name]["healthcheck"]["test"]
    if name == "gateway":  # a client identity (no NATS service to ping): its own HTTP API, on its port
        port = _env(name)["DRAFTWIRE_GATEWAY_PORT"]
        assert probe[1:3] == ["python", "-c"] and f"http://localhost:{port}/v1/models" in probe[3]
        return
    assert probe[1:] == ["python", "-m", "draftwire.services.probe", name]
    out = subprocess.run([sys.executable, *probe[2:-1], "--help"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 0 and name in out.stdout


_OTHER_CHOICE = {"tkslt": "full", "fp32": "bf16", "int8": "fp32"}


def _sentinel(value: str) -> str:
    if value.isdigit():
        return str(int(value) + 1)
    return _OTHER_CHOICE.get(value, f"sentinel-{value.replace('/', '_')}")


def test_link_service_is_a_real_entry_point_behind_a_profile() -> None:
    link = SERVICES["link"]
    assert link["profiles"] == ["radio"] and link["command"] == ["python", "-m", "draftwire.services.link_emulator"]
    out = subprocess.run([sys.executable, "-m", "draftwire.services.link_emulator", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0 and "--link" in out.stdout
    env = _env("link")
    assert env["DRAFTWIRE_NATS_URL"] == "nats://nats:4222" and env["DRAFTWIRE_LINK_LISTEN"].endswith(":4223")
    assert "4223" in str(link["healthcheck"]["test"])
    assert "nats://link:4223" in (ROOT / "compose.yaml").read_text()  # how the draft is put behind it


@pytest.mark.parametrize("name", [*DRAFTWIRE, "link"])
def test_every_environment_variable_is_read_by_the_code(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Setting each variable the compose file sets changes what the service's own parser ends up with."""
    module = "link_emulator" if name == "link" else name
    build_parser = importlib.import_module(f"draftwire.services.{module}.service").build_parser
    for var, value in _env(name).items():
        if var == "DRAFTWIRE_CACHE":
            from draftwire.shared.models.cache import cache_root

            monkeypatch.setenv(var, value)
            assert str(cache_root()) == value
            continue
        if not var.startswith("DRAFTWIRE_"):
            assert var.startswith("OTEL_"), var  # read by the OpenTelemetry SDK (shared/tracing.py)
            continue
        sentinel = "lan" if var == "DRAFTWIRE_LINK" else _sentinel(value)
        monkeypatch.setenv(var, sentinel)
        parsed = {str(v) for v in vars(build_parser().parse_args([])).values()}
        monkeypatch.delenv(var)
        assert sentinel in parsed or str(float(sentinel)) in parsed, f"{name} ignores {var}"


def test_ports_and_urls_agree() -> None:
    nats_ports = {p.split(":")[1] for p in SERVICES["nats"]["ports"]}
    jaeger_ports = {p.split(":")[1] for p in SERVICES["jaeger"]["ports"]}
    assert "16686" in jaeger_ports and "4318" in jaeger_ports
    conf = (ROOT / "deploy" / "nats.conf").read_text()
    assert "jetstream" in conf and re.search(r"^port: 4222$", conf, re.MULTILINE) and re.search(r"http_port: 8222", conf)
    assert "8222" in SERVICES["nats"]["healthcheck"]["test"][-1]
    for name in DRAFTWIRE:
        env = _env(name)
        assert env["DRAFTWIRE_NATS_URL"] == "nats://nats:4222" and "4222" in nats_ports
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
        assert SERVICES[name]["volumes"] == ["models:/cache"] and env["DRAFTWIRE_CACHE"] == "/cache"
    telemetry_port = _env("telemetry")["DRAFTWIRE_TELEMETRY_PORT"]
    assert SERVICES["telemetry"]["ports"] == [f"{telemetry_port}:{telemetry_port}"]


def test_dockerfile_installs_pinned_cpu_torch_and_the_package() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "torch==2.13.0" in text and "whl/cpu" in text
    assert re.search(r"COPY shared", text) and re.search(r"COPY services", text)
    assert SERVICES["scheduler"]["build"]["dockerfile"] == "deploy/Dockerfile"
    # dependencies in a layer of their own, before the code; no test extras; not root
    assert text.index("pip install -r") < text.index("COPY shared") and "[test]" not in text
    assert "--no-deps ." in text and re.search(r"^USER (?!root)\w+", text, re.MULTILINE)


def test_the_dockerfile_s_dependency_list_is_pyproject_s(tmp_path: Path) -> None:
    """What the Dockerfile's one-liner writes is exactly the runtime dependencies (run here, not in Docker)."""
    import tomllib

    text = (ROOT / "deploy" / "Dockerfile").read_text()
    one_liner = re.search(r'python -c "(.+?)"', text).group(1)  # as the shell passes it (\n stays for Python)
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    out = subprocess.run([sys.executable, "-c", one_liner], cwd=tmp_path, capture_output=True, text=True, check=True)
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert out.stdout.split("\n")[:-1] == expected


# --- secured by default -------------------------------------------------------------------------------------

ROLE_OF = {"scheduler": "scheduler", "verifier": "edge", "draft": "device", "telemetry": "telemetry",
           "gateway": "gateway"}


@pytest.mark.parametrize("name", DRAFTWIRE)
def test_each_service_gets_its_own_identity_and_the_ca_as_secrets(name: str) -> None:
    """The seed file keeps its identity's name where it is mounted: the name is who the service signs in as
    (its inbox prefix and, for a device, its subjects), so a file mounted as `creds` is refused by NATS."""
    from draftwire.shared.io.credentials import Identity

    env = _env(name)
    role = ROLE_OF[name]
    assert env["DRAFTWIRE_CREDS"] == f"/run/secrets/{role}.nk" and env["DRAFTWIRE_TLS_CA"] == "/run/secrets/ca.pem"
    assert Identity(Path(env["DRAFTWIRE_CREDS"])).name == role
    mounted = {s["target"]: s["source"] for s in SERVICES[name]["secrets"]}
    assert mounted == {f"{role}.nk": f"{role}_identity", "ca.pem": "nats_ca"}
    assert COMPOSE["secrets"][f"{ROLE_OF[name]}_identity"]["file"] == f"./deploy/secrets/{ROLE_OF[name]}.nk"


def test_the_keys_service_writes_every_secret_and_a_config_nats_server_accepts(tmp_path: Path) -> None:
    """Run the keys service's command, then check nats.conf with the real nats-server (`-t`)."""
    from draftwire.shared.io.nats_server import nats_server_binary

    keys = SERVICES["keys"]
    assert SERVICES["nats"]["depends_on"]["keys"]["condition"] == "service_completed_successfully"
    assert "./deploy/secrets:/secrets" in keys["volumes"] and "./deploy/secrets:/etc/nats/secrets:ro" in \
        SERVICES["nats"]["volumes"]
    secrets = tmp_path / "secrets"
    assert keys["command"][:2] == ["sh", "-c"]
    init, *owners = keys["command"][2].split(" && ")  # then chown: each service's seed to the image's user
    cmd = shlex.split(init)
    assert cmd[:3] == ["draftwire", "auth", "init"] and cmd[3] == "/secrets"
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    uid = re.search(r"useradd .*--uid (\d+)", dockerfile).group(1)
    assert f"chown {uid} {' '.join(f'{r}.nk' for r in ROLE_OF.values())}" in owners
    out = subprocess.run([sys.executable, "-m", "draftwire.services.cli", *cmd[1:3], str(secrets), *cmd[4:]], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    for secret in COMPOSE["secrets"].values():
        assert (secrets / secret["file"].removeprefix("./deploy/secrets/")).is_file(), secret
    conf = (ROOT / "deploy" / "nats.conf").read_text().replace("/etc/nats/", f"{tmp_path}/")
    conf = conf.replace("store_dir: /data", f"store_dir: {tmp_path / 'js'}")
    (tmp_path / "nats.conf").write_text(conf)
    check = subprocess.run([str(nats_server_binary()), "-t", "-c", str(tmp_path / "nats.conf")],
                           capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "authorization" in (secrets / "auth.conf").read_text()
    assert not (ROOT / ".dockerignore").exists() or "deploy/secrets/" in (ROOT / ".dockerignore").read_text()


# --- the NATS cluster profile ---------------------------------------------------------------------------------

CLUSTER_DIR = ROOT / "deploy" / "nats-cluster"
CLUSTER_NODES = ("nats", "nats-2", "nats-3")  # compose services; `nats` is node 1 under the profile


def _cluster_env() -> dict[str, str]:
    lines = (CLUSTER_DIR / "cluster.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def _resolved(value: str, settings: dict[str, str]) -> str:
    """`${VAR:-default}` as compose resolves it with `settings` in its environment."""
    return re.sub(r"\$\{([A-Z_]+):-([^}]*)\}", lambda m: settings.get(m.group(1), m.group(2)), str(value))


def _node_config(name: str, settings: dict[str, str]) -> Path:
    """The config file a node runs with: its `-c` path inside the container, mapped back through its volumes."""
    command = [_resolved(part, settings) for part in SERVICES[name]["command"]]
    assert command[0] == "-c", command
    for volume in SERVICES[name]["volumes"]:
        host, container = volume.split(":")[:2]
        if command[1] == container or command[1].startswith(container + "/"):
            return ROOT / host / command[1].removeprefix(container).lstrip("/")
    raise AssertionError(f"{name}: {command[1]} is not mounted")


def test_the_cluster_profile_runs_three_routed_nodes_and_points_every_service_at_all_three() -> None:
    """`docker compose --env-file deploy/nats-cluster/cluster.env up`: `nats` runs node 1's config, the profile
    adds nodes 2 and 3, each with its own name, store and health check, routed to each other; every draftwire
    service gets the three URLs (and without the env file nothing changes: one server, one URL)."""
    from draftwire.shared.io.nats_server import split_urls

    settings = _cluster_env()
    assert settings["COMPOSE_PROFILES"] == "cluster"
    assert "profiles" not in SERVICES["nats"]
    assert all(SERVICES[n]["profiles"] == ["cluster"] for n in CLUSTER_NODES[1:])
    assert _node_config("nats", {}) == ROOT / "deploy" / "nats.conf"  # the default: the single server
    configs = {n: _node_config(n, settings) for n in CLUSTER_NODES}
    names = [re.search(r"^server_name: (\S+)$", c.read_text(), re.MULTILINE).group(1) for c in configs.values()]
    assert names == ["nats-1", "nats-2", "nats-3"] and all(c.parent == CLUSTER_DIR for c in configs.values())
    shared = (CLUSTER_DIR / "cluster.conf").read_text()
    assert all('include "cluster.conf"' in c.read_text() for c in configs.values())
    routes = re.findall(r"nats-route://([\w-]+):(\d+)", shared)
    block = re.search(r"cluster \{.*?\n\}", shared, re.DOTALL).group(0)
    listen = re.search(r"listen: 0\.0\.0\.0:(\d+)", block).group(1)
    assert sorted(routes) == sorted((n, listen) for n in CLUSTER_NODES)  # every node, on its route port
    assert "jetstream" in shared and "store_dir: /data" in shared
    assert re.search(r"^http_port: 8222$", shared, re.MULTILINE)
    stores = [next(v for v in SERVICES[n]["volumes"] if v.endswith(":/data")) for n in CLUSTER_NODES]
    assert len(set(stores)) == 3 and all(v.split(":")[0] in COMPOSE["volumes"] for v in stores)
    for node in CLUSTER_NODES:
        assert SERVICES[node]["healthcheck"]["test"] == SERVICES["nats"]["healthcheck"]["test"]
        assert "./deploy/secrets:/etc/nats/secrets:ro" in SERVICES[node]["volumes"]
        assert SERVICES[node]["depends_on"]["keys"]["condition"] == "service_completed_successfully"
    client_port = re.search(r"^port: (\d+)$", shared, re.MULTILINE).group(1)
    for name in DRAFTWIRE:
        url = _resolved(SERVICES[name]["environment"]["DRAFTWIRE_NATS_URL"], settings)
        assert split_urls(url) == [f"nats://{n}:{client_port}" for n in CLUSTER_NODES], name
        assert split_urls(_env(name)["DRAFTWIRE_NATS_URL"]) == ["nats://nats:4222"], name
    init = shlex.split(SERVICES["keys"]["command"][2].split(" && ")[0])
    hosts = {init[i + 1] for i, a in enumerate(init) if a == "--host"}
    assert set(CLUSTER_NODES[1:]) <= hosts, "TLS: the server certificate must name every node"


def test_every_cluster_node_config_is_one_nats_server_accepts(tmp_path: Path) -> None:
    """Each node's config, with its includes (cluster.conf, the keys service's auth.conf) and TLS files laid out
    as in the container, passes `nats-server -t`."""
    from draftwire.shared.io.nats_server import nats_server_binary

    out = subprocess.run([sys.executable, "-m", "draftwire.services.cli", "auth", "init", str(tmp_path / "secrets")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    (tmp_path / "cluster").mkdir()
    for conf in CLUSTER_DIR.glob("*.conf"):
        text = conf.read_text().replace("/etc/nats/", f"{tmp_path}/").replace("store_dir: /data",
                                                                               f"store_dir: {tmp_path / 'js'}")
        (tmp_path / "cluster" / conf.name).write_text(text)
    for node in ("nats-1", "nats-2", "nats-3"):
        check = subprocess.run([str(nats_server_binary()), "-t", "-c", str(tmp_path / "cluster" / f"{node}.conf")],
                               capture_output=True, text=True, timeout=30, check=False)
        assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("name", ["verifier", "draft", "scheduler"])
def test_the_replicated_services_can_be_scaled(name: str) -> None:
    """`docker compose up --scale verifier=2 ...` (README, Scale-out): a replica may not need a fixed name or host
    port, and each names itself (the default instance is service-hostname-pid, unique per container)."""
    service = SERVICES[name]
    assert "container_name" not in service and "ports" not in service and "hostname" not in service
    assert "DRAFTWIRE_INSTANCE" not in service.get("environment", {})
    assert "--instance" not in " ".join(map(str, service.get("command", [])))
