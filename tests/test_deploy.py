"""deploy/ against the code it deploys: the CLI's own flags, the proxy's endpoints and its metrics.

No container engine or cluster runs here, so nothing is built, pulled or applied. What is checked
for real: every YAML file parses; every ``RELAY_IDEM_*`` name in deploy/ is one click reads for
``relay-idem proxy`` (or ``demo``), and each file's settings parse into a valid proxy config;
probe paths answer 200 on a running ``relay-idem proxy``, and the image's and compose file's
healthcheck commands pass against it; the Dockerfile's entrypoint is an installed console script;
the systemd unit's ``ExecStart`` runs ``--help`` from this venv; every metric the Grafana
dashboard queries is in ``/_relay/metrics`` after traffic through the proxy to ``demo --bare``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points, requires
from pathlib import Path
from typing import Any, TextIO
from unittest import mock

import click
import httpx
import pytest
import yaml
from packaging.requirements import Requirement
from prometheus_client.parser import text_string_to_metric_families

from relay_idem import cli, proxy
from relay_idem.config import Config
from tests.servers import free_port, stop_process_group, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
UNIT = DEPLOY / "systemd" / "relay-idem.service"
UNIT_ENV = DEPLOY / "systemd" / "env.example"
DASHBOARD = DEPLOY / "grafana" / "relay-idem.json"
SCRIPTS = Path(sysconfig.get_path("scripts"))

ENV_NAME = re.compile(rf"\b{cli.ENV_PREFIX}_[A-Z0-9_]+\b")
METRIC_NAME = re.compile(r"\brelay_idem_[a-z0-9_]+\b")
MATCHER = re.compile(r'\b([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
# Labels Prometheus attaches to every scraped series; the proxy cannot expose them itself.
TARGET_LABELS = {"job", "instance"}
MESSAGE = {"to": "+5511999998888", "template": "lembrete_consulta", "language": "pt_BR", "variables": {"1": "João"}}


# --- what the CLI accepts: click's own parsing, as main() sets it up ----------------------------


@contextmanager
def cli_environment(env: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with exactly ``env`` for its ``RELAY_IDEM_*`` variables, restored afterwards."""
    with mock.patch.dict(os.environ):
        for name in [name for name in os.environ if name.startswith(cli.ENV_PREFIX)]:
            del os.environ[name]
        os.environ.update(env)
        yield


def command_context(command: str, args: Sequence[str] = ()) -> click.Context:
    """The context ``relay-idem <command> <args>`` gets from ``main()`` (auto_envvar_prefix included)."""
    parent = click.Context(cli.cli, info_name="relay-idem", auto_envvar_prefix=cli.ENV_PREFIX)
    return cli.cli.commands[command].make_context(command, list(args), parent=parent)


def reads(command: str, name: str) -> bool:
    """Does some flag of ``relay-idem <command>`` take its value from the variable ``name``?"""
    value = f"probe-{uuid.uuid4().hex}"
    with cli_environment({name: value}):
        parent = click.Context(cli.cli, info_name="relay-idem", auto_envvar_prefix=cli.ENV_PREFIX)
        context = click.Context(cli.cli.commands[command], parent=parent, info_name=command)
        return any(param.resolve_envvar_value(context) == value for param in context.command.params)


def parse(command: str, env: Mapping[str, str], args: Sequence[str] = ()) -> dict[str, Any]:
    """The keyword arguments ``relay-idem <command> <args>`` runs with under ``env``."""
    unread = [name for name in env if name.startswith(cli.ENV_PREFIX) and not reads(command, name)]
    assert not unread, f"`relay-idem {command}` reads no flag from {unread}"
    with cli_environment(env):
        return dict(command_context(command, args).params)


def proxy_config(env: Mapping[str, str]) -> Config:
    """The Config ``relay-idem proxy`` builds from ``env``, validated as at start-up."""
    params = parse("proxy", env)
    assert params.pop("config") is None  # --config FILE is read by the command, into the other flags
    return Config(**params)


def clean_environ(**extra: str) -> dict[str, str]:
    """This process's environment without any ``RELAY_IDEM_*`` variable, plus ``extra``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(cli.ENV_PREFIX)}
    env.update(extra)
    return env


# --- deploy files ---------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object in deploy/kubernetes, by kind."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert document["kind"] not in found, f"two {document['kind']} objects"
            found[document["kind"]] = document
    return found


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {name: str(value) for name, value in environment.items()}


@dataclass
class Dockerfile:
    args: dict[str, str]
    stages: list[list[tuple[str, str]]]  # instructions of each stage, FROM first

    def runtime(self, instruction: str) -> list[str]:
        return [rest for name, rest in self.stages[-1] if name == instruction]

    def env(self) -> dict[str, str]:
        return {
            name: value
            for rest in self.runtime("ENV")
            for name, _, value in (item.partition("=") for item in shlex.split(rest))
        }

    def exec_form(self, instruction: str) -> list[str]:
        (rest,) = self.runtime(instruction)
        # HEALTHCHECK's options come before "CMD [...]"; ENTRYPOINT's list starts at once.
        words: list[str] = json.loads(rest[rest.index("[", rest.find("CMD") + 1) :])
        return words


def dockerfile() -> Dockerfile:
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        name, _, rest = (pending + stripped).partition(" ")
        instructions.append((name.upper(), rest.strip()))
        pending = ""
    args = {}
    stages: list[list[tuple[str, str]]] = []
    for name, rest in instructions:
        if name == "ARG" and not stages:
            key, _, default = rest.partition("=")
            args[key] = default
        elif name == "FROM":
            stages.append([(name, re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest))])
        else:
            stages[-1].append((name, rest))
    return Dockerfile(args, stages)


def unit_file() -> dict[str, dict[str, list[str]]]:
    """A systemd unit: section -> key -> values (a key may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("["):
            current = sections.setdefault(stripped.strip("[]"), {})
            continue
        key, _, value = stripped.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def env_file(path: Path) -> dict[str, str]:
    """A systemd ``EnvironmentFile``: ``NAME=value`` lines, ``#`` comments."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and line[0] != "#")
    return {name.strip(): value.strip() for name, value in pairs}


def seconds(duration: str | int | float) -> float:
    """``45``, ``45s``, ``1m30s`` (compose and systemd durations)."""
    if isinstance(duration, int | float):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|min|m|s|h)?", duration)
    units = {"ms": 0.001, "s": 1, "": 1, "m": 60, "min": 60, "h": 3600}
    assert parts and "".join(n + u for n, u in parts) == duration.replace(" ", ""), duration
    return sum(float(number) * units[unit] for number, unit in parts)


def healthcheck_command(words: Sequence[str]) -> list[str]:
    """An exec-form healthcheck (``["CMD", "python", ...]`` or ``["python", ...]``) run with this Python."""
    words = list(words[1:] if words[0] == "CMD" else words)
    assert words[0] == "python", f"healthchecks use the image's own Python (no curl in slim images): {words}"
    return [sys.executable, *words[1:]]


def test_every_yaml_file_parses() -> None:
    paths = yaml_files()
    assert {path.name for path in paths} >= {
        "docker-compose.yml",
        "deployment.yaml",
        "service.yaml",
        "configmap.yaml",
        "pdb.yaml",
        "hpa.yaml",
    }
    for path in paths:
        documents = list(yaml.safe_load_all(path.read_text()))
        assert documents, path
        assert all(isinstance(document, dict) for document in documents), path
    json.loads(DASHBOARD.read_text())


def test_env_probe_reads_exactly_the_cli_flags() -> None:
    """``reads`` is click's own resolution: each flag's RELAY_IDEM_<FLAG> (SPEC §2) yes, others no."""
    for name, command in cli.cli.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                flag = param.opts[0].removeprefix("--")
                assert reads(name, f"RELAY_IDEM_{flag.upper().replace('-', '_')}"), (name, flag)
    assert not reads("proxy", f"{cli.ENV_PREFIX}_NOT_A_FLAG")
    assert not reads("proxy", f"_{cli.ENV_PREFIX}_WORKER_CONFIG")


@pytest.mark.parametrize(
    "path",
    [DOCKERFILE, COMPOSE, UNIT, UNIT_ENV, DEPLOY / "README.md", *sorted(KUBERNETES.glob("*.yaml"))],
    ids=lambda path: str(path.relative_to(DEPLOY)),
)
def test_every_relay_idem_variable_in_deploy_is_a_cli_flag(path: Path) -> None:
    names = set(ENV_NAME.findall(path.read_text()))
    unknown = sorted(name for name in names if not (reads("proxy", name) or reads("demo", name)))
    assert not unknown, f"{path.name} names variables no relay-idem command reads: {unknown}"


# --- Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_builds_wheels_then_runs_them_as_a_non_root_user() -> None:
    image = dockerfile()
    builder, runtime = image.stages
    assert builder[0][1].endswith(" AS builder")
    assert any(name == "RUN" and "pip wheel" in rest for name, rest in builder)
    assert runtime[0][1].split()[0] == "python:3.11-slim"
    install = next(rest for rest in image.runtime("RUN") if "from=builder" in rest)
    assert "--no-index" in install
    for package in ("relay-idem", "uvloop", "httptools", "hiredis"):
        assert f" {package}" in install
    (user,) = image.runtime("USER")
    assert int(user.split(":")[0]) > 0
    # Each COPY source exists and is not left out of the build context.
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for rest in (rest for name, rest in builder if name == "COPY"):
        for source in shlex.split(rest)[:-1]:
            assert (ROOT / source).exists() and source not in ignored, source


def test_the_builder_wheels_include_uvloop_httptools_and_hiredis() -> None:
    """``pip wheel .`` resolves the project's dependencies; their extras must bring the fast paths."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted: dict[str, set[str]] = {}
    for line in pyproject["project"]["dependencies"]:
        requirement = Requirement(line)
        if requirement.extras:
            wanted[requirement.name] = requirement.extras
    brought: set[str] = set()
    for name, extras in wanted.items():
        for line in requires(name) or []:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker and any(marker.evaluate({"extra": extra, "sys_platform": "linux"}) for extra in extras):
                brought.add(requirement.name)
    assert {"uvloop", "httptools", "hiredis"} <= brought


def test_dockerfile_entrypoint_is_the_installed_console_script_running_proxy() -> None:
    image = dockerfile()
    script, command, *rest = image.exec_form("ENTRYPOINT")
    scripts = {ep.name: ep for ep in entry_points(group="console_scripts")}
    assert script in scripts and scripts[script].value == f"{cli.__name__}:main"
    assert (SCRIPTS / script).exists()
    assert command == "proxy" and command in cli.cli.commands
    assert rest == [], "configured by RELAY_IDEM_* variables only"


def test_dockerfile_env_is_a_valid_proxy_config_and_its_port_is_exposed() -> None:
    image = dockerfile()
    env = {name: value for name, value in image.env().items() if name.startswith(cli.ENV_PREFIX)}
    config = proxy_config({**env, "RELAY_IDEM_UPSTREAM": "http://api:8000"})
    assert config.host == "0.0.0.0"
    assert image.runtime("EXPOSE") == [str(config.port)]
    assert image.runtime("STOPSIGNAL") == ["SIGTERM"]
    (healthcheck,) = image.runtime("HEALTHCHECK")
    assert "/_relay/healthz" in healthcheck


# --- docker compose ---------------------------------------------------------------------------


def test_compose_wires_redis_demo_and_proxy_together() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "demo", "proxy"}
    image_env = {name: value for name, value in dockerfile().env().items() if name.startswith(cli.ENV_PREFIX)}
    for name in ("demo", "proxy"):
        build = services[name]["build"]
        assert (DEPLOY / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE

    script, command, *args = services["demo"]["entrypoint"]
    assert script == dockerfile().exec_form("ENTRYPOINT")[0] and command == "demo"
    demo = parse("demo", {**image_env, **compose_env(services["demo"])}, args)
    assert demo["bare"] is True and demo["host"] == "0.0.0.0"

    config = proxy_config({**image_env, **compose_env(services["proxy"])})
    upstream = httpx.URL(config.upstream)
    assert upstream.host == "demo" and upstream.port == demo["port"]
    assert config.redis is not None and httpx.URL(config.redis).host == "redis"
    assert config.host == "0.0.0.0"
    published = [str(mapping).rsplit(":", 1)[-1] for mapping in services["proxy"]["ports"]]
    assert published == [str(config.port)]
    for dependency, condition in services["proxy"]["depends_on"].items():
        assert condition == {"condition": "service_healthy"}
        assert "healthcheck" in services[dependency]
    assert seconds(services["proxy"]["stop_grace_period"]) > config.upstream_timeout


# --- Kubernetes -------------------------------------------------------------------------------


def test_kubernetes_objects_refer_to_each_other() -> None:
    objects = manifests()
    assert set(objects) == {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    deployment = objects["Deployment"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert objects["Service"]["spec"]["selector"].items() <= labels.items()
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = objects["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] >= 2, "one pod may be disrupted (pdb.yaml) while another serves"
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    (container,) = pod["spec"]["containers"]
    sources = container["envFrom"]
    assert sources[0]["configMapRef"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    # Kubernetes takes only strings as ConfigMap values ("8080", not 8080).
    assert all(isinstance(value, str) for value in objects["ConfigMap"]["data"].values())
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    (service_port,) = objects["Service"]["spec"]["ports"]
    assert service_port["targetPort"] in ports


def deployment_config() -> tuple[dict[str, Any], Config]:
    objects = manifests()
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    explicit = {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}
    return container, proxy_config({**objects["ConfigMap"]["data"], **explicit})


def test_kubernetes_probes_ports_and_shutdown_match_the_proxy() -> None:
    container, config = deployment_config()
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == f"{proxy.RELAY_PATH}readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == f"{proxy.RELAY_PATH}healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert ports[container[probe]["httpGet"]["port"]] == config.port, probe
    # readyz gives up on the store after READY_TIMEOUT; the probe must wait for that answer.
    assert container["readinessProbe"]["timeoutSeconds"] > proxy.READY_TIMEOUT
    assert config.host == "0.0.0.0"
    pause = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > config.upstream_timeout + pause
    # A Service named relay-idem would inject RELAY_IDEM_PORT=tcp://... into the pod.
    assert pod["enableServiceLinks"] is False


def test_kubernetes_security_context_is_restrictive() -> None:
    container, config = deployment_config()
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (user,) = dockerfile().runtime("USER")
    assert pod["securityContext"]["runAsUser"] == int(user.split(":")[0])
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]
    assert "add" not in context["capabilities"]
    resources = container["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
    if config.workers > 1:
        # Workers share metrics through files in PROMETHEUS_MULTIPROC_DIR, which the CLI creates in
        # the temp dir unless it is set: with a read-only root, an emptyDir must hold it.
        env = {
            **manifests()["ConfigMap"]["data"],
            **{item["name"]: item.get("value") for item in container.get("env", [])},
        }
        multiproc = Path(env.get("PROMETHEUS_MULTIPROC_DIR") or env.get("TMPDIR") or "/tmp")
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        writable = [
            Path(mount["mountPath"])
            for mount in container["volumeMounts"]
            if "emptyDir" in volumes[mount["name"]] and not mount.get("readOnly", False)
        ]
        assert any(multiproc == path or path in multiproc.parents for path in writable), multiproc


# --- systemd ----------------------------------------------------------------------------------


def unit_for_this_venv(directory: Path) -> tuple[Path, list[str]]:
    """The unit with its venv replaced by this one and its EnvironmentFile by env.example."""
    service = unit_file()["Service"]
    (exec_start,) = service["ExecStart"]
    program, *args = shlex.split(exec_start)
    venv = Path(program).parent.parent
    assert Path(program).relative_to(venv) == Path("bin", "relay-idem")
    local = SCRIPTS / Path(program).name
    (environment_file,) = service["EnvironmentFile"]
    text = UNIT.read_text().replace(f"{venv}/", f"{SCRIPTS.parent}/").replace(environment_file, str(UNIT_ENV))
    path = directory / UNIT.name
    path.write_text(text)
    return path, [str(local), *args]


def test_systemd_exec_start_runs_from_a_venv(tmp_path: Path) -> None:
    _, command = unit_for_this_venv(tmp_path)
    assert command[1:] == ["proxy"]
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, env=clean_environ(), timeout=30)
    assert result.returncode == 0, result.stderr
    assert "Usage: relay-idem proxy" in result.stdout


def test_systemd_unit_stops_gracefully_and_reads_a_valid_env_file() -> None:
    service = unit_file()["Service"]
    assert service["EnvironmentFile"] == ["/etc/relay-idem/env"]
    assert service["KillSignal"] == ["SIGTERM"]
    config = proxy_config(env_file(UNIT_ENV))
    (timeout,) = service["TimeoutStopSec"]
    assert seconds(timeout) > config.upstream_timeout
    for option in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "ProtectHome"):
        assert option in service, option


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    path, _ = unit_for_this_venv(tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stderr == "", result.stderr


# --- a running proxy in front of `relay-idem demo --bare` -------------------------------------


@dataclass
class Running:
    proxy: str
    demo: str
    demo_port: int
    proxy_port: int


@contextmanager
def started(args: Sequence[str], env: Mapping[str, str], log: TextIO) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [str(SCRIPTS / "relay-idem"), *args], env=dict(env), stdout=log, stderr=log, start_new_session=True
    )
    try:
        yield process
    finally:
        stop_process_group(process)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """demo --bare and a memory-store proxy with the compose file's proxy settings, on loopback."""
    demo_port, proxy_port = free_port(), free_port()
    demo_url, proxy_url = f"http://127.0.0.1:{demo_port}", f"http://127.0.0.1:{proxy_port}"
    settings = compose_env(compose()["services"]["proxy"])
    # One process on the memory store: no Redis, no workers; loopback only.
    for name in ("RELAY_IDEM_REDIS", "RELAY_IDEM_WORKERS", "RELAY_IDEM_ACCESS_LOG"):
        settings.pop(name, None)
    proxy_env = clean_environ(**settings, RELAY_IDEM_HOST="127.0.0.1", RELAY_IDEM_LOG_LEVEL="warning")
    demo_args = ["demo", "--bare", "--host", "127.0.0.1", "--port", str(demo_port), "--log-level", "warning"]
    proxy_args = ["proxy", "--upstream", demo_url, "--port", str(proxy_port)]
    logs = tmp_path_factory.mktemp("deploy")
    with (
        (logs / "demo.log").open("w") as demo_log,
        (logs / "proxy.log").open("w") as proxy_log,
        started(demo_args, clean_environ(), demo_log) as demo,
        started(proxy_args, proxy_env, proxy_log) as relay,
    ):
        try:
            wait_until_ready(f"{demo_url}/v1/stats", demo)
            wait_until_ready(f"{proxy_url}/_relay/healthz", relay)
        except RuntimeError:
            demo_log.flush()
            proxy_log.flush()
            pytest.fail(f"{(logs / 'demo.log').read_text()}\n{(logs / 'proxy.log').read_text()}")
        yield Running(proxy_url, demo_url, demo_port, proxy_port)


def probe_paths() -> set[str]:
    container, _ = deployment_config()
    paths = {container[probe]["httpGet"]["path"] for probe in ("readinessProbe", "livenessProbe", "startupProbe")}
    for words in (dockerfile().exec_form("HEALTHCHECK"),):
        paths.update(re.findall(r"/_relay/\w+", " ".join(words)))
    return paths


def test_probe_paths_answer_200_on_a_running_proxy(running: Running) -> None:
    paths = probe_paths()
    assert paths == {f"{proxy.RELAY_PATH}healthz", f"{proxy.RELAY_PATH}readyz"}
    for path in sorted(paths):
        response = httpx.get(f"{running.proxy}{path}", timeout=5)
        assert response.status_code == 200, (path, response.text)
    assert httpx.get(f"{running.proxy}{proxy.RELAY_PATH}nope", timeout=5).status_code == 404


def run_healthcheck(words: Sequence[str], port: int) -> int:
    command = healthcheck_command(words)
    env = clean_environ(RELAY_IDEM_PORT=str(port))
    return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode


def test_image_healthcheck_passes_on_a_running_proxy_and_fails_without_one(running: Running) -> None:
    words = dockerfile().exec_form("HEALTHCHECK")
    assert run_healthcheck(words, running.proxy_port) == 0
    assert run_healthcheck(words, free_port()) != 0


def test_compose_demo_healthcheck_passes_on_a_running_demo(running: Running) -> None:
    words = compose()["services"]["demo"]["healthcheck"]["test"]
    assert run_healthcheck(words, running.demo_port) == 0
    assert run_healthcheck(words, free_port()) != 0


def readme_curls() -> list[list[str]]:
    text = (DEPLOY / "README.md").read_text()
    commands = [" ".join(block.split("\\\n")) for block in re.findall(r"^curl .*?(?<!\\)$", text, re.M | re.S)]
    return [shlex.split(command) for command in commands]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_commands_show_a_replay(running: Running) -> None:
    post, stats = readme_curls()[:2]
    key = f"readme-{uuid.uuid4().hex[:8]}"

    def run(words: list[str]) -> str:
        words = [word.replace("http://localhost:8080", running.proxy) for word in words]
        words = [re.sub(r"^Idempotency-Key: .*", f"Idempotency-Key: {key}", word) for word in words]
        env = {name: value for name, value in clean_environ().items() if "proxy" not in name.lower()}
        result = subprocess.run(words, capture_output=True, text=True, env=env, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout

    before = json.loads(run(stats))["dispatched"]
    first, second = run(post), run(post)
    assert " 202" in first.splitlines()[0] and " 202" in second.splitlines()[0]
    assert "idempotent-replayed: true" in second.lower() and "idempotent-replayed" not in first.lower()
    assert first.split("\n\n", 1)[1] == second.split("\n\n", 1)[1]  # text mode reads \r\n as \n
    assert json.loads(run(stats))["dispatched"] == before + 1


def dashboard_queries() -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and templating queries."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                # A variable's "query" is PromQL, or for the datasource variable its plugin type.
                query = key in ("expr", "definition") or (key == "query" and METRIC_NAME.search(str(value)))
                if isinstance(value, str) and query:
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text()))
    return found


def send_traffic(base: str) -> None:
    with httpx.Client(base_url=base, timeout=10) as client:
        key = {"Idempotency-Key": f"dash-{uuid.uuid4().hex}"}
        assert client.post("/v1/messages", json=MESSAGE, headers=key).status_code == 202  # executed
        replay = client.post("/v1/messages", json=MESSAGE, headers=key)  # replayed
        assert replay.headers["idempotent-replayed"] == "true"
        assert client.post("/v1/messages", json={**MESSAGE, "to": "+1"}, headers=key).status_code == 422  # mismatch
        assert client.post("/v1/messages", json=MESSAGE).status_code == 400  # invalid: key required
        assert client.post("/v1/messages", json=MESSAGE, headers={"Idempotency-Key": "a b"}).status_code == 400
        client.post("/v1/unprotected", json=MESSAGE)  # bypass: no key where none is required
        assert client.get("/v1/stats").status_code == 200  # GET: not counted


def test_every_metric_the_dashboard_queries_is_exposed_after_traffic(running: Running) -> None:
    send_traffic(running.proxy)
    text = httpx.get(f"{running.proxy}{proxy.RELAY_PATH}metrics", timeout=5).text
    labels: dict[str, set[str]] = {}
    values: dict[tuple[str, str], set[str]] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
            for label, value in sample.labels.items():
                values.setdefault((sample.name, label), set()).add(value)
            if sample.name == "relay_idem_requests_total":
                counts[sample.labels["outcome"]] = sample.value
    for outcome in ("executed", "replayed", "mismatch", "invalid", "bypass"):
        assert counts.get(outcome, 0) >= 1, (outcome, counts)

    queries = dashboard_queries()
    used = {name for query in queries for name in METRIC_NAME.findall(query)}
    assert used >= {"relay_idem_requests_total", "relay_idem_store_seconds_bucket", "relay_idem_lease_lost_total"}
    missing = sorted(used - set(labels))
    assert not missing, f"the dashboard queries metrics /_relay/metrics does not expose: {missing}"
    for query in queries:
        names = METRIC_NAME.findall(query)
        exposed = set().union(*(labels[name] for name in names)) | TARGET_LABELS
        for grouping in GROUPING.findall(query):
            for label in filter(None, (part.strip() for part in grouping.split(","))):
                assert label in exposed, (label, query)
        for label, operator, value in MATCHER.findall(query):
            assert label in exposed, (label, query)
            if label in TARGET_LABELS or value.startswith("$"):
                continue
            known = set().union(*(values.get((name, label), set()) for name in names))
            wanted = value.split("|") if operator.endswith("~") else [value]
            assert set(wanted) <= known, (label, sorted(set(wanted) - known), query)
    # SPEC §5 outcomes an operator needs at a glance, each one a series of the outcome panels.
    assert values[("relay_idem_requests_total", "outcome")] >= {
        "executed",
        "replayed",
        "conflict",
        "mismatch",
        "store_error",
    }
    quantiles = [query for query in queries if "histogram_quantile" in query]
    assert quantiles and all("op" in re.split(r"\s*,\s*", GROUPING.findall(query)[0]) for query in quantiles)


def test_dashboard_panels_use_the_datasource_variable() -> None:
    board = json.loads(DASHBOARD.read_text())
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
