"""compose.yaml and the Dockerfile describe the system the code really is.

Docker need not run here: the file is checked as data, and by `docker compose config` when
the compose plugin is installed."""

from __future__ import annotations

import fnmatch
import inspect
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import dramatiq.worker
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CONFIG_SOURCE = ROOT / "services" / "common" / "config.py"

SERVERS = {"postgres", "redis", "kafka"}
# Inside a container a server must listen on every interface to be reachable at all.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104
PROJECT_IMAGE = "orders-payments:latest"
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
SERVER_ENV = {
    "ORDERS_DATABASE_URL": "postgresql://postgres:postgres@postgres:5432/orders",
    "PAYMENTS_DATABASE_URL": "postgresql://postgres:postgres@postgres:5432/payments",
    "REDIS_URL": "redis://redis:6379/0",
    "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092",
}

# Every process of the system: how it starts, and the source file that start needs.
EXPECTED = {
    "migrate": (["python", "-m", "services.common.migrations"], "services/common/migrations.py"),
    "gateway": (
        ["uvicorn", "--factory", "services.gateway.app:create_app", "--host", ALL_INTERFACES],
        "services/gateway/app.py",
    ),
    "orders": (
        ["uvicorn", "--factory", "services.orders.app:create_app", "--host", ALL_INTERFACES],
        "services/orders/app.py",
    ),
    "payments": (
        ["uvicorn", "--factory", "services.payments.app:create_app", "--host", ALL_INTERFACES],
        "services/payments/app.py",
    ),
    "orders-worker": (
        ["dramatiq", "actors.orders", "--processes", "1", "--threads", "2"],
        "actors/orders.py",
    ),
    "payments-worker": (
        ["dramatiq", "actors.payments", "--processes", "1", "--threads", "2"],
        "actors/payments.py",
    ),
    "orders-consumer": (["python", "-m", "actors.consumer", "orders"], "actors/consumer.py"),
    "payments-consumer": (["python", "-m", "actors.consumer", "payments"], "actors/consumer.py"),
    "listener": (["python", "-m", "actors.listener"], "actors/listener.py"),
    "dashboard": (["python", "-m", "actors.dashboard"], "actors/dashboard.py"),
}
HTTP_PORTS = {"gateway": 8080, "orders": 8081, "payments": 8082, "dashboard": 8090}


@cache
def compose() -> dict[str, Any]:
    """compose.yaml with anchors and `<<` merges resolved, as Compose itself reads it."""
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def services() -> dict[str, dict[str, Any]]:
    result = compose()["services"]
    assert isinstance(result, dict)
    return result


def app_services() -> dict[str, dict[str, Any]]:
    return {name: spec for name, spec in services().items() if name not in SERVERS}


def depends_on(spec: dict[str, Any]) -> dict[str, str]:
    """A service's dependencies as {name: condition}, from either the list or the map form."""
    raw = spec.get("depends_on") or {}
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {
        name: (options or {}).get("condition", "service_started") for name, options in raw.items()
    }


def environment(spec: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping, from either the list or the map form."""
    raw = spec.get("environment") or {}
    if isinstance(raw, list):
        return dict(item.split("=", 1) for item in raw)
    return {name: str(value) for name, value in raw.items()}


def command(spec: dict[str, Any]) -> list[str]:
    raw = spec["command"]
    return raw.split() if isinstance(raw, str) else [str(part) for part in raw]


def published_ports(spec: dict[str, Any]) -> dict[int, int]:
    """{host port: container port} from the short ("8080:8080") or the long syntax."""
    ports: dict[int, int] = {}
    for entry in spec.get("ports", []):
        if isinstance(entry, dict):
            ports[int(entry["published"])] = int(entry["target"])
        else:
            *_, host, container = str(entry).split(":")
            ports[int(host)] = int(container.split("/")[0])
    return ports


def entry_module(argv: list[str]) -> str:
    """The dotted module a command runs: `-m X`, `uvicorn --factory X:f`, `dramatiq X`."""
    if argv[:2] == ["python", "-m"]:
        return argv[2]
    if argv[0] == "uvicorn":
        target = next(arg for arg in argv[1:] if ":" in arg)
        return target.split(":")[0]
    if argv[0] == "dramatiq":
        return argv[1]
    raise AssertionError(f"unknown kind of command: {argv}")


def module_file(module: str) -> Path:
    base = ROOT.joinpath(*module.split("."))
    return base / "__main__.py" if base.is_dir() else base.with_suffix(".py")


# --- the services and their images -------------------------------------------------------


def test_the_file_uses_the_compose_spec_without_a_version_key() -> None:
    assert "version" not in compose()
    assert set(services()) == SERVERS | set(EXPECTED)


def test_every_service_has_an_image_or_a_build() -> None:
    missing = [
        name for name, spec in services().items() if "image" not in spec and "build" not in spec
    ]
    assert missing == []


def test_every_project_process_runs_the_one_project_image_built_from_the_repo() -> None:
    images = {(spec.get("image"), repr(spec.get("build"))) for spec in app_services().values()}
    assert images == {(PROJECT_IMAGE, repr("."))}


def test_the_servers_run_the_official_images() -> None:
    assert services()["postgres"]["image"] == "postgres:16"
    assert services()["redis"]["image"] == "redis:7"
    assert services()["kafka"]["image"] == "apache/kafka:4.1.1"


# --- start-up order -----------------------------------------------------------------------


def test_every_dependency_exists_and_uses_a_valid_condition() -> None:
    for name, spec in services().items():
        for target, condition in depends_on(spec).items():
            assert target in services(), f"{name} depends on unknown service {target}"
            assert condition in CONDITIONS, f"{name} -> {target}: bad condition {condition}"
            if condition == "service_healthy":
                assert "healthcheck" in services()[target], f"{target} has no healthcheck"
            if condition == "service_completed_successfully":
                # A one-shot that restarts after exiting 0 would never count as completed.
                assert services()[target].get("restart", "no") == "no", target


def test_the_dependencies_have_no_cycle() -> None:
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"dependency cycle: {' -> '.join((*path, name))}"
        # Unknown names are the previous test's concern.
        if name in done or name not in services():
            return
        for target in depends_on(services()[name]):
            visit(target, (*path, name))
        done.add(name)

    for name in services():
        visit(name, ())


def test_migrations_run_once_postgres_is_healthy_and_are_not_restarted() -> None:
    migrate = services()["migrate"]
    assert depends_on(migrate) == {"postgres": "service_healthy"}
    assert migrate["restart"] == "no"


@pytest.mark.parametrize("name", sorted(set(EXPECTED) - {"migrate"}))
def test_a_process_starts_once_the_servers_are_healthy_and_the_schema_is_migrated(
    name: str,
) -> None:
    wanted = {server: "service_healthy" for server in SERVERS}
    wanted["migrate"] = "service_completed_successfully"
    deps = depends_on(services()[name])
    assert {target: deps.get(target) for target in wanted} == wanted
    assert services()[name]["restart"] == "unless-stopped"


def test_the_gateway_starts_after_the_services_it_forwards_to_are_healthy() -> None:
    deps = depends_on(services()["gateway"])
    assert deps["orders"] == "service_healthy"
    assert deps["payments"] == "service_healthy"


# --- commands -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_process_runs_its_expected_command(name: str) -> None:
    expected_prefix, _ = EXPECTED[name]
    argv = command(services()[name])
    assert argv[: len(expected_prefix)] == expected_prefix


HTTP_PROTOCOL = "services.common.http:CoalescingHttpToolsProtocol"
SUPERVISORD_CONF = ROOT / "stack" / "supervisord.conf"


def test_every_http_server_writes_its_answers_in_one_piece_here_and_under_supervisord() -> None:
    """compose.yaml, the image's default command and supervisord.conf all serve with the
    coalescing protocol (`services.common.http`), which exists where they name it."""
    servers = [name for name in EXPECTED if EXPECTED[name][0][0] == "uvicorn"]
    for name in servers:
        argv = command(services()[name])
        assert argv[argv.index("--http") + 1] == HTTP_PROTOCOL, name
    [cmd] = [args for keyword, args in dockerfile_instructions() if keyword == "CMD"]
    assert HTTP_PROTOCOL in cmd
    programs = re.findall(r"^command=.*/uvicorn (.*)$", SUPERVISORD_CONF.read_text(), re.M)
    assert len(programs) == len(servers)
    assert all(f"--http {HTTP_PROTOCOL}" in line for line in programs), programs
    module, name = HTTP_PROTOCOL.split(":")
    assert re.search(rf"^class {name}\(", module_file(module).read_text(), re.MULTILINE)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_command_runs_a_module_that_exists_in_the_repo(name: str) -> None:
    _, expected_file = EXPECTED[name]
    argv = command(services()[name])
    path = module_file(entry_module(argv))
    assert path == ROOT / expected_file
    assert path.is_file(), f"{name} runs {path.relative_to(ROOT)}, which does not exist"
    if argv[0] == "uvicorn":
        factory = next(arg for arg in argv if ":" in arg).split(":")[1]
        assert re.search(rf"^def {factory}\(", path.read_text(), re.MULTILINE), factory


# --- environment --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_process_is_told_where_the_servers_are(name: str) -> None:
    env = environment(services()[name])
    assert {key: env.get(key) for key in SERVER_ENV} == SERVER_ENV


def test_every_variable_set_for_a_process_is_one_the_code_reads() -> None:
    config_source = CONFIG_SOURCE.read_text()
    dramatiq_source = inspect.getsource(dramatiq.worker)
    for name, spec in app_services().items():
        for key in environment(spec):
            source = dramatiq_source if key.startswith("dramatiq_") else config_source
            assert f'"{key}"' in source, f"{name} sets {key}, which nothing reads"


def test_the_gateway_reaches_the_services_by_their_compose_names_and_ports() -> None:
    env = environment(services()["gateway"])
    assert env["ORDERS_URL"] == f"http://orders:{HTTP_PORTS['orders']}"
    assert env["PAYMENTS_URL"] == f"http://payments:{HTTP_PORTS['payments']}"


def test_kafka_advertises_the_address_the_processes_connect_to() -> None:
    kafka = environment(services()["kafka"])
    assert (
        kafka["KAFKA_ADVERTISED_LISTENERS"]
        == f"PLAINTEXT://{SERVER_ENV['KAFKA_BOOTSTRAP_SERVERS']}"
    )
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_postgres_creates_both_service_databases() -> None:
    postgres = services()["postgres"]
    assert environment(postgres)["POSTGRES_DB"] == "orders"
    [mount] = postgres["configs"]
    assert mount["target"].startswith("/docker-entrypoint-initdb.d/")
    assert mount["target"].endswith(".sql")
    content = compose()["configs"][mount["source"]]["content"]
    assert re.search(r"CREATE DATABASE payments\s*;", content)


# --- ports, health, data ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(HTTP_PORTS))
def test_each_http_process_publishes_its_port_and_checks_its_own_health(name: str) -> None:
    port = HTTP_PORTS[name]
    spec = services()[name]
    assert published_ports(spec) == {port: port}
    check = " ".join(str(part) for part in spec["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port}/" in check
    if name != "dashboard":
        argv = command(spec)
        assert argv[argv.index("--port") + 1] == str(port)


def test_the_gateway_is_published_on_8080() -> None:
    assert published_ports(services()["gateway"]).get(8080) == 8080


def test_postgres_and_kafka_keep_their_data_in_named_volumes() -> None:
    declared = set(compose()["volumes"])
    for name, data_dir in [
        ("postgres", "/var/lib/postgresql/data"),
        ("kafka", environment(services()["kafka"])["KAFKA_LOG_DIRS"]),
    ]:
        mounts = dict(str(volume).split(":", 1) for volume in services()[name]["volumes"])
        assert data_dir in mounts.values(), name
        assert {source for source, target in mounts.items() if target == data_dir} <= declared


# --- the image ----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; like Docker, drop comment lines, then join continuations."""
    lines = [
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_the_image_is_python_3_11_slim() -> None:
    froms = [args for keyword, args in dockerfile_instructions() if keyword == "FROM"]
    assert froms and froms[0].startswith("python:3.11-slim")


def test_the_image_runs_as_a_non_root_user() -> None:
    users = [args for keyword, args in dockerfile_instructions() if keyword == "USER"]
    assert users, "no USER: the processes would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_the_image_holds_the_migrations_and_installs_the_project() -> None:
    copies = [args.split() for keyword, args in dockerfile_instructions() if keyword == "COPY"]
    sources = {source for args in copies for source in args[:-1] if not source.startswith("--")}
    assert sources & {".", "db", "db/", "./db"}, "db/sql must be in the image"
    ignored = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in ["db/sql/common/001_pipeline.sql", "pyproject.toml", "services", "actors"]:
        hits = [pattern for pattern in ignored if fnmatch.fnmatch(needed, pattern.rstrip("/"))]
        hits += [p for p in ignored if needed.startswith(p.rstrip("/") + "/")]
        assert hits == [], f".dockerignore drops {needed} via {hits}"
    runs = " ".join(args for keyword, args in dockerfile_instructions() if keyword == "RUN")
    assert re.search(r"pip install (--\S+ )*\.(\s|$)", runs)
    assert re.search(r"pip install --no-deps dramatiq-dashboard", runs)


def test_the_image_runs_the_gateway_by_default() -> None:
    [cmd] = [args for keyword, args in dockerfile_instructions() if keyword == "CMD"]
    assert "services.gateway.app:create_app" in cmd


# --- Compose itself -----------------------------------------------------------------------


def compose_plugin_missing() -> str | None:
    """Why `docker compose` cannot run here, or None when it can."""
    if shutil.which("docker") is None:
        return "no docker CLI"
    probe = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        detail = (probe.stderr or probe.stdout).strip().splitlines()
        return f"docker CLI without the compose plugin ({detail[0] if detail else 'no output'})"
    return None


def test_docker_compose_accepts_the_file() -> None:
    reason = compose_plugin_missing()
    if reason:
        pytest.skip(reason)
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
