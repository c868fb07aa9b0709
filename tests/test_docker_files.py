"""The Docker image and the compose file, checked without a Docker engine.

What can be checked here is checked against the real thing: the image's entrypoint against the package's console
script, its dependency step against pyproject.toml, the compose commands against the real ``allconv`` and
``mlflow server`` click parsers, the compose wiring (URLs, ports, databases, volumes) against itself and against
``scripts/services.py`` (the same start-up sequence as plain processes, which tests/test_services.py runs), and the
worker entrypoint script by running it. Building the image and running containers is `make docker-test`
(scripts/docker-test.sh), which needs a Docker engine.
"""

from __future__ import annotations

import configparser
import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import click
import pytest
import yaml

from allconv_cli.cli import main as allconv_main

pytestmark = pytest.mark.unit

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# ---------------------------------------------------------------------------------------------------------------
# helpers


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines, out, current = (ROOT / "Dockerfile").read_text().splitlines(), [], ""
    for line in lines:
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + "\n"
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def instructions(name: str) -> list[str]:
    return [rest for word, rest in dockerfile() if word == name]


# The secrets docker-compose.yml requires (``${VAR:?message}``: no default), with test values.
COMPOSE_SECRETS = {"POSTGRES_PASSWORD": "pg-Secret-123", "MLFLOW_ADMIN_PASSWORD": "admin-Secret-123",
                   "MLFLOW_WORKER_PASSWORD": "worker-Secret-123", "MLFLOW_SECRET_KEY": "flask-Secret-123"}


class MissingVariable(ValueError):
    """Compose refuses the file: a ``${VAR:?message}`` variable is not set."""


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR:?message}`` / ``${VAR}`` substitution (the subset the file uses)."""
    env = env or {}

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if op == ":?":
            if not env.get(name):
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return env[name]
        assert op is not None or name in env, f"${{{name}}} has no default in docker-compose.yml"
        return env.get(name) or (arg or "")

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", sub, text)


def load_compose(env: dict[str, str] | None = None, *, keep_variables: bool = False) -> dict:
    """docker-compose.yml as Compose reads it: YAML first, then ``${...}`` substituted in string values
    (``keep_variables``: left as written, to compare commands across deployments)."""

    def walk(node: object) -> object:
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return interpolate(node, env) if isinstance(node, str) and not keep_variables else node

    return walk(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(COMPOSE_SECRETS)


def option_value(args: list[str], name: str) -> str:
    i = args.index(name)
    return args[i + 1]


def search_command() -> click.Command:
    with click.Context(allconv_main) as ctx:
        cmd = allconv_main.get_command(ctx, "search")
    assert cmd is not None, "allconv has no `search` command"
    return cmd


def parse_allconv(args: list[str]) -> click.Context:
    """Parse ``allconv <args>`` with the real CLI (types, choices, required options) without running it."""
    assert args, "empty allconv command"
    with click.Context(allconv_main) as ctx:
        cmd = allconv_main.get_command(ctx, args[0])
        assert cmd is not None, f"allconv has no command {args[0]!r}"
        return cmd.make_context(f"allconv {args[0]}", list(args[1:]), parent=ctx)


def _docker_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker reads it: relative to the context root, ``*`` within one path element,
    ``**`` across any number of them."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(path: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context (a folder's match covers what is inside it)."""
    patterns = [p.strip().strip("/") for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "exceptions are not modelled here"
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(_docker_pattern(pat).match(prefix) for pat in patterns for prefix in prefixes)


# ---------------------------------------------------------------------------------------------------------------
# Dockerfile


def test_entrypoint_is_the_console_script() -> None:
    (entrypoint,) = instructions("ENTRYPOINT")
    assert json.loads(entrypoint) == ["allconv"]
    assert PYPROJECT["project"]["scripts"]["allconv"] == "allconv_cli.cli:main"
    assert isinstance(allconv_main, click.Group)


def pin(name: str) -> str:
    (version,) = [d.split("==")[1] for d in PYPROJECT["project"]["dependencies"] if d.startswith(f"{name}==")]
    return version


def test_base_image_is_cuda_pytorch_and_user_is_not_root() -> None:
    args = dict(a.split("=", 1) for a in instructions("ARG") if "=" in a)
    base = args["BASE_IMAGE"]
    assert re.fullmatch(r"pytorch/pytorch:2\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", base), base
    # The official image's tag is its torch version: the one pyproject.toml pins, so the build installs no other.
    assert base.split(":")[1].split("-")[0] == pin("torch"), f"{base} does not ship torch=={pin('torch')}"
    assert instructions("FROM") == ["${BASE_IMAGE}"]
    users = instructions("USER")
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    assert any("useradd" in r and users[-1] in r for r in instructions("RUN"))
    assert instructions("WORKDIR")[-1] == "/work"
    assert "/work" in json.loads(instructions("VOLUME")[-1])


def test_image_installs_the_package_with_its_pinned_dependencies(tmp_path: Path) -> None:
    runs = instructions("RUN")
    assert any(re.search(r"pip install --no-deps \.(\s|$)", r) for r in runs), \
        "the package is installed with `pip install --no-deps .` after its dependency layer"
    assert any("allconv --version" in r for r in runs), "the build checks that the console script runs"
    # The dependency layer: run its requirements one-liner for real and compare with pyproject.toml.
    (step,) = [r for r in runs if "requirements.txt" in r and "pyproject.toml" in r]
    generate = step.split(" > /tmp/requirements.txt")[0].replace("\n", "")
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    out = subprocess.run(["sh", "-c", generate.replace("python ", f"{sys.executable} ", 1)], cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == PYPROJECT["project"]["dependencies"]
    assert "torch==" in out.stdout, "torch is pinned through the package's dependencies"


def test_image_keeps_the_base_images_torch(tmp_path: Path) -> None:
    """The dependency step pins the torch and torchvision that the base image has (a constraints file), so pip keeps
    them instead of downloading another build; run that one-liner here and compare with this environment."""
    from importlib import metadata

    (step,) = [r for r in instructions("RUN") if "requirements.txt" in r and "pyproject.toml" in r]
    commands = [c.strip() for c in step.replace("\n", "").split(" && ")]  # Docker drops the "\\<newline>"s
    (generate,) = [c for c in commands if c.endswith("> /tmp/constraints.txt")]
    generate = generate.removesuffix("> /tmp/constraints.txt").replace("python ", f"{sys.executable} ", 1)
    out = subprocess.run(["sh", "-c", generate], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [f"{d}=={metadata.version(d)}" for d in ("torch", "torchvision")]
    (install,) = [c for c in commands if c.startswith("pip install")]
    assert install.split() == ["pip", "install", "-c", "/tmp/constraints.txt", "-r", "/tmp/requirements.txt"]


def test_dockerignore_keeps_local_state_out_and_sources_in() -> None:
    for path in (".env", ".venv", ".venv/bin/python", "mlruns", "mlruns/0/meta.yaml", "mlflow.db", "optuna.db",
                 "mlartifacts", ".git", ".pytest_cache", ".ruff_cache", "allconv_cli/__pycache__",
                 "allconv_cli/__pycache__/x.cpython-311.pyc"):
        assert dockerignored(path), f"{path} would be sent into the image build"
    copied = ["pyproject.toml", "allconv_cli/cli/__init__.py", "scripts/worker-entrypoint.sh", "scripts/services.py",
              "tests/services.py"]  # `scripts/services.py add-user` runs in the image (compose, deploy/k8s)
    if (ROOT / "README.md").exists() or PYPROJECT["project"].get("readme"):
        copied.append(PYPROJECT["project"].get("readme", "README.md"))
    for path in copied:
        assert not dockerignored(path), f"{path} is needed by the build but .dockerignore excludes it"


# ---------------------------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_wires_postgres_mlflow_and_workers(compose: dict) -> None:
    services = compose["services"]
    assert {"postgres", "mlflow", "mlflow-user", "prepare", "worker"} <= set(services)
    pg_env = services["postgres"]["environment"]
    pg_user, pg_password, pg_db = pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"], pg_env["POSTGRES_DB"]

    # The init script creates the MLflow database; POSTGRES_DB is the Optuna one.
    init = [v for v in services["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in v]
    assert init, "postgres needs the init script that creates the mlflow database"
    script = ROOT / init[0].split(":")[0]
    assert script.is_file()
    created = set(re.findall(r"CREATE DATABASE (\w+)", script.read_text(), re.I)) | {pg_db}

    def check_pg_url(url: str, env: dict[str, str]) -> str:
        """No password in the URL (it would be printed and stored): libpq reads it from PGPASSWORD."""
        parts = urlsplit(url)
        assert parts.scheme == "postgresql+psycopg", url
        assert (parts.hostname, parts.port or 5432) == ("postgres", 5432), url
        assert (parts.username, parts.password) == (pg_user, None), url
        assert env["PGPASSWORD"] == pg_password
        db = parts.path.lstrip("/")
        assert db in created, f"{url}: database {db} is never created"
        return db

    mlflow_args = services["mlflow"]["command"]
    mlflow_env = services["mlflow"]["environment"]
    mlflow_db = check_pg_url(mlflow_env["MLFLOW_BACKEND_STORE_URI"], mlflow_env)
    mlflow_port = int(option_value(mlflow_args, "--port"))
    assert option_value(mlflow_args, "--host") == "0.0.0.0"
    assert "--serve-artifacts" in mlflow_args
    artifacts = option_value(mlflow_args, "--artifacts-destination")
    assert any(v.split(":")[1] == artifacts for v in services["mlflow"]["volumes"]), "artifacts not on a volume"
    allowed = option_value(mlflow_args, "--allowed-hosts").split(",")
    assert any(fnmatch.fnmatch(f"mlflow:{mlflow_port}", a) for a in allowed), "workers' Host header is refused"
    # Basic auth: MLflow keeps its users in basic_auth.db in the server's working folder (the image's WORKDIR), which
    # is a volume of its own, not the artifacts that the server hands out.
    assert option_value(mlflow_args, "--app-name") == "basic-auth"
    assert any(v.split(":")[1] == instructions("WORKDIR")[-1] for v in services["mlflow"]["volumes"])
    assert not instructions("WORKDIR")[-1].startswith(artifacts)
    # Its settings: the repository's scripts/mlflow-auth.ini, in the image (COPY . . into /opt/allconv).
    auth_ini = Path(mlflow_env["MLFLOW_AUTH_CONFIG_PATH"])
    assert auth_ini.parent.parent == Path("/opt/allconv") and not dockerignored(f"scripts/{auth_ini.name}")
    settings = configparser.ConfigParser()
    settings.read(ROOT / "scripts" / auth_ini.name)
    assert settings["mlflow"]["admin_username"] == mlflow_env["MLFLOW_AUTH_ADMIN_USERNAME"]
    assert settings["mlflow"]["database_uri"] == "sqlite:///basic_auth.db", "in the working folder, on its volume"
    assert "admin_password" not in settings["mlflow"] and int(settings["mlflow"]["auth_cache_ttl_seconds"]) > 0

    worker = services["worker"]
    args = worker["command"]
    assert args[0] == "search"
    optuna_db = check_pg_url(worker["environment"]["ALLCONV_STORAGE"], worker["environment"])
    assert optuna_db != mlflow_db
    tracking = urlsplit(worker["environment"]["MLFLOW_TRACKING_URI"])
    assert (tracking.scheme, tracking.hostname, tracking.port) == ("http", "mlflow", mlflow_port)
    for dep in ("postgres", "mlflow"):
        assert worker["depends_on"][dep]["condition"] == "service_healthy"
        assert "healthcheck" in services[dep]
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # Before the workers: the workers' MLflow user (with the admin's credentials), then the study prepared once.
    assert worker["depends_on"]["prepare"]["condition"] == "service_completed_successfully"
    assert services["prepare"]["depends_on"]["mlflow-user"]["condition"] == "service_completed_successfully"
    assert services["mlflow-user"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    user = services["mlflow-user"]
    assert user["entrypoint"] == ["python", "/opt/allconv/scripts/services.py"]
    assert user["command"] == ["add-user", worker["environment"]["MLFLOW_TRACKING_USERNAME"]]
    assert user["environment"]["MLFLOW_TRACKING_URI"] == worker["environment"]["MLFLOW_TRACKING_URI"]
    assert user["environment"]["MLFLOW_TRACKING_USERNAME"] == mlflow_env["MLFLOW_AUTH_ADMIN_USERNAME"]
    assert user["environment"]["MLFLOW_TRACKING_PASSWORD"] == mlflow_env["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert user["environment"]["ALLCONV_USER_PASSWORD"] == worker["environment"]["MLFLOW_TRACKING_PASSWORD"]
    assert instructions("WORKDIR")[0] == "/opt/allconv" and ". ." in instructions("COPY")
    for name in ("mlflow-user", "prepare"):
        assert services[name]["restart"] == "no", f"{name} runs once"
    assert services["prepare"]["environment"] == worker["environment"]
    assert services["prepare"]["command"] == [*args, "--prepare"], "prepare = the workers' command + --prepare"

    # GPU workers: replicas reserve NVIDIA devices; `--scale worker=N` multiplies them. `worker-cpu` (profile cpu) is
    # the same service without the reservation (an override file cannot remove one), for CPU hosts and the CPU test.
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    cpu = services["worker-cpu"]
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu
    assert {k: v for k, v in cpu.items() if k != "profiles"} == {k: v for k, v in worker.items() if k != "deploy"}
    assert [n for n, svc in services.items() if "deploy" in svc] == ["worker"], "GPU reservations only in `worker`"
    assert "container_name" not in worker, "a fixed container name would break --scale"
    assert "ports" not in worker, "published ports would clash between replicas"

    # Every named volume is declared, and mounted over a folder the image's non-root user owns.
    owned = " ".join(r for r in instructions("RUN") if "chown" in r)
    for name in ("mlflow", "worker", "worker-cpu"):
        for vol in services[name].get("volumes", []):
            source, target = vol.split(":")[:2]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"volume {source} is not declared"
                assert target in owned, f"{target} is not created and chowned in the Dockerfile"


def test_compose_images_come_from_this_dockerfile(compose: dict) -> None:
    for name in ("mlflow", "mlflow-user", "prepare", "worker", "worker-cpu", "data"):
        service = compose["services"][name]
        assert service["build"] == "." and service["image"] == compose["services"]["worker"]["image"]
    assert compose["services"]["mlflow"]["entrypoint"] == ["mlflow"]
    assert compose["services"]["worker"]["entrypoint"] == ["allconv-worker"]
    assert any("/usr/local/bin/allconv-worker" in r and "scripts/worker-entrypoint.sh" in r
               for r in instructions("RUN"))


def test_compose_worker_command_parses_with_the_real_cli(compose: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    worker = compose["services"]["worker"]
    args = worker["command"]
    for name, value in worker["environment"].items():
        monkeypatch.setenv(name, value)
    ctx = parse_allconv(args)
    assert ctx.params["storage_url"] == worker["environment"]["ALLCONV_STORAGE"], "--storage from ALLCONV_STORAGE"
    assert "@postgres:5432/" in ctx.params["storage_url"]
    help_text = search_command().get_help(click.Context(search_command(), info_name="search"))
    for arg in args:
        if arg.startswith("--"):
            assert arg.split("=")[0] in help_text, f"{arg} is not an option of `allconv search`"
    # Other settings of the compose file (.env overrides) parse too.
    other = load_compose({**COMPOSE_SECRETS, "MODEL": "A", "BRANCH": "strided", "DATASET": "fake", "TRIALS": "8",
                          "EPOCHS": "3", "STUDY": "s", "POSTGRES_PASSWORD": "p@ss:/word"})
    parse_allconv(other["services"]["worker"]["command"])


def test_compose_commands_are_lists_of_strings(compose: dict) -> None:
    """Compose wants strings in command/entrypoint lists: a bare YAML number (- 5000) is a type error there."""
    for name, service in compose["services"].items():
        for key in ("command", "entrypoint"):
            value = service.get(key)
            if value is not None:
                assert isinstance(value, list) and all(isinstance(v, str) for v in value), (name, key, value)


def test_compose_mlflow_command_parses_with_mlflow_and_matches_the_ci_sequence(compose: dict) -> None:
    from mlflow import environment_variables as mlflow_env
    from mlflow.cli import server as mlflow_server_command

    mlflow = compose["services"]["mlflow"]
    args = mlflow["command"]
    assert args[0] == "server"
    ctx = mlflow_server_command.make_context("mlflow server", list(args[1:]))
    # Options the server reads from its environment (the backend URI) count as given.
    given = {a for a in args if a.startswith("--")}
    for param in mlflow_server_command.params:
        if param.envvar and param.envvar in mlflow.get("environment", {}):
            given.update(o for o in param.opts if o.startswith("--"))
    known = {v.name for v in vars(mlflow_env).values() if isinstance(v, mlflow_env._EnvironmentVariable)}
    known |= {p.envvar for p in mlflow_server_command.params if p.envvar}
    assert set(mlflow["environment"]) - {"PGPASSWORD"} <= known, "unknown server variables"
    # scripts/services.py (what CI runs) starts the server with the same options, PostgreSQL-backed, with basic auth.
    from conftest import services

    ci_server = services.MlflowServer("postgresql+psycopg://u:p@127.0.0.1:1/mlflow", Path("/tmp/x"), auth=True)
    ci = ci_server.command()
    ci_args = ci[ci.index("server") + 1:]
    mlflow_server_command.make_context("mlflow server", list(ci_args))
    ci_flags = {a for a in ci_args if a.startswith("--")}
    assert {"--artifacts-destination", "--serve-artifacts", "--host", "--port", "--app-name"} <= ci_flags
    assert "--backend-store-uri" not in ci_flags, "the backend URI (it holds the password) is in the environment"
    assert ci_flags - {"--workers"} <= given
    assert set(ci_server.environment()) <= set(mlflow["environment"])
    ci_ini = Path(ci_server.environment()["MLFLOW_AUTH_CONFIG_PATH"])
    image_ini = Path(mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"])
    assert ci_ini.relative_to(ROOT) == image_ini.relative_to("/opt/allconv"), "the same auth settings as compose"
    assert urlsplit(ci_server.environment()["MLFLOW_BACKEND_STORE_URI"]).scheme == "postgresql+psycopg"
    assert option_value(ci_args, "--app-name") == option_value(args, "--app-name") == "basic-auth"
    assert ctx.params["host"] == "0.0.0.0"


def test_compose_data_service_fills_the_workers_data_volume(compose: dict) -> None:
    services = compose["services"]
    data, worker = services["data"], services["worker"]
    assert data.get("profiles") == ["data"], "the download must not run on every `up`"
    data_dir = worker["environment"]["ALLCONV_DATA_DIR"]
    source = next(v.split(":")[0] for v in worker["volumes"] if v.split(":")[1] == data_dir)
    assert f"{source}:{data_dir}" in data["volumes"]
    assert f"'{data_dir}'" in " ".join(data["command"]) and "CIFAR10" in " ".join(data["command"])


def test_compose_keeps_the_secrets_off_command_lines() -> None:
    """`ps` on the host shows every container's command line: the secrets live in the environment only."""
    services = load_compose(COMPOSE_SECRETS)["services"]
    for name, service in services.items():
        for key in ("command", "entrypoint", "healthcheck"):
            for secret in COMPOSE_SECRETS.values():
                assert secret not in json.dumps(service.get(key)), f"{name}.{key} holds a secret"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == COMPOSE_SECRETS["POSTGRES_PASSWORD"]
    assert services["mlflow"]["environment"]["PGPASSWORD"] == COMPOSE_SECRETS["POSTGRES_PASSWORD"]
    assert services["worker"]["environment"]["PGPASSWORD"] == COMPOSE_SECRETS["POSTGRES_PASSWORD"]
    assert services["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == COMPOSE_SECRETS["MLFLOW_ADMIN_PASSWORD"]
    assert services["mlflow"]["environment"]["MLFLOW_FLASK_SERVER_SECRET_KEY"] == COMPOSE_SECRETS["MLFLOW_SECRET_KEY"]
    assert services["worker"]["environment"]["MLFLOW_TRACKING_PASSWORD"] == COMPOSE_SECRETS["MLFLOW_WORKER_PASSWORD"]


def test_compose_refuses_to_start_without_each_secret() -> None:
    """No silent default: Compose stops with the variable's name (``${VAR:?...}``); `make docker-test` checks the
    real Compose does."""
    for name in COMPOSE_SECRETS:
        env = {k: v for k, v in COMPOSE_SECRETS.items() if k != name}
        with pytest.raises(MissingVariable, match=f"{name} is missing a value: set {name}"):
            load_compose(env)


def test_compose_workers_stop_on_a_user_error_and_everything_stops_promptly(compose: dict) -> None:
    """A user error (exit 2) fails the same way on every start: the restarts are bounded. The image's stop signal is
    SIGINT, which allconv and `mlflow server` act on even as PID 1 (SIGTERM would wait for the kill), and docker-init
    forwards it in the services."""
    assert instructions("STOPSIGNAL") == ["SIGINT"]
    services = compose["services"]
    for name in ("worker", "worker-cpu"):
        policy = services[name]["restart"]
        m = re.fullmatch(r"on-failure:(\d+)", policy)
        assert policy == "no" or (m and 1 <= int(m.group(1)) <= 5), f"{name}: restart {policy!r} is unbounded"
        assert services[name]["stop_grace_period"], "a trial needs time to checkpoint and re-queue"
    for name in ("mlflow", "worker", "worker-cpu", "data"):
        assert services[name]["init"] is True, f"{name}: no init to forward the stop signal"


def test_compose_file_suits_compose_v1_and_v2(compose: dict) -> None:
    """docker-compose 1.29 (Debian's) rejects a top-level `name:`; the file's other keys are in both."""
    assert set(compose) <= {"services", "volumes", "x-allconv", "x-study", "x-worker"}, set(compose)


def test_compose_publishes_only_the_mlflow_ui_and_on_this_host_unless_told(compose: dict) -> None:
    """MLFLOW_BIND (default 127.0.0.1: this host only) and MLFLOW_PORT; PostgreSQL and the workers publish nothing."""
    assert [n for n, svc in compose["services"].items() if "ports" in svc] == ["mlflow"]
    assert compose["services"]["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]
    published = load_compose({**COMPOSE_SECRETS, "MLFLOW_PORT": "0"})["services"]["mlflow"]["ports"]
    assert published == ["127.0.0.1:0:5000"], "MLFLOW_PORT picks the host port"
    everywhere = load_compose({**COMPOSE_SECRETS, "MLFLOW_BIND": "0.0.0.0"})["services"]["mlflow"]["ports"]
    assert everywhere == ["0.0.0.0:5000:5000"], "MLFLOW_BIND picks the host address"


def test_docker_test_override_changes_only_images_and_the_study(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make docker-test` runs docker-compose.yml with tests/docker/compose.test.yml: local images and a tiny study,
    everything else (wiring, environment, auth, restart and stop settings) as shipped."""
    override = yaml.safe_load((ROOT / "tests" / "docker" / "compose.test.yml").read_text())
    allowed = {"postgres": {"image"}, "mlflow": {"image"}, "mlflow-user": {"image"},
               "worker-cpu": {"image", "command", "environment"}, "prepare": {"image", "command", "environment"}}
    for name, service in override["services"].items():
        assert set(service) <= allowed.get(name, set()), (name, set(service))
    services = override["services"]
    assert services["prepare"]["command"] == [*services["worker-cpu"]["command"], "--prepare"]
    assert services["prepare"]["environment"].items() <= services["worker-cpu"]["environment"].items()
    args = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", a) for a in services["worker-cpu"]["command"]]
    worker_env = load_compose(COMPOSE_SECRETS)["services"]["worker-cpu"]["environment"]
    for name, value in worker_env.items():
        monkeypatch.setenv(name, value)
    ctx = parse_allconv(args)
    assert (ctx.params["dataset"], ctx.params["trials"], ctx.params["workers"]) == ("fake", 6, 1)
    assert (ROOT / "scripts" / "docker-test.sh").is_file()
    assert re.search(r"^docker-test:.*\n\t.*scripts/docker-test\.sh", (ROOT / "Makefile").read_text(), re.M)


# ---------------------------------------------------------------------------------------------------------------
# documentation


def _doc_commands(text: str) -> list[str]:
    """Commands in the shell code blocks (```bash, ```sh or plain ```), continuation lines joined."""
    out, block, lang = [], None, ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            if block is None:
                block, lang = [], line.strip()[3:].strip()
            else:
                if lang in ("", "bash", "sh", "shell", "console"):
                    for cmd in "\n".join(block).replace("\\\n", " ").splitlines():
                        cmd = cmd.strip().removeprefix("$ ")
                        if cmd and not cmd.startswith("#"):
                            out.append(cmd.split(" #")[0])
                block = None
        elif block is not None:
            block.append(line)
    return out


def _scaling_docs() -> list[tuple[str, str]]:
    docs = [("docs/scaling.md", (ROOT / "docs" / "scaling.md").read_text())]
    readme = ROOT / "README.md"
    if readme.exists():
        m = re.search(r"^#+ Scaling out\n(.*?)(?=^#{1,2} |\Z)", readme.read_text(), re.S | re.M)
        if m:
            docs.append(("README.md#scaling-out", m.group(1)))
    return docs


def test_documented_search_commands_parse_with_the_real_cli() -> None:
    seen = 0
    for _name, text in _scaling_docs():
        for cmd in _doc_commands(text):
            words = shlex.split(cmd)
            while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):  # VAR=value prefixes
                words.pop(0)
            if not words:
                continue
            if words[0] == "allconv" or words[0].endswith("/allconv"):
                parse_allconv(words[1:])
                seen += 1
            elif words[:2] == ["docker", "run"] and "allconv" in words:
                parse_allconv(words[words.index("allconv") + 1:])
                seen += 1
    assert seen >= 3, "docs/scaling.md shows the one-host, many-host and Docker commands"


def test_docs_use_the_compose_services_and_scale_command(compose: dict) -> None:
    text = (ROOT / "docs" / "scaling.md").read_text()
    assert "docker compose up --scale worker=" in text
    for service in ("postgres", "mlflow", "worker", "data"):
        assert service in compose["services"] and f"`{service}`" in text


# ---------------------------------------------------------------------------------------------------------------
# scripts/worker-entrypoint.sh


def _stub_allconv(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "allconv"
    stub.write_text('#!/bin/sh\necho "gpu=${CUDA_VISIBLE_DEVICES:-none} args=$*"\nsleep "${STUB_SLEEP:-0}"\n')
    stub.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ALLCONV_GPU_LOCK_DIR": str(tmp_path / "locks")}


def test_worker_entrypoint_gives_each_replica_its_own_gpu(tmp_path: Path) -> None:
    env = _stub_allconv(tmp_path)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    script = str(ROOT / "scripts" / "worker-entrypoint.sh")
    env_locked = {**env, "ALLCONV_GPU_COUNT": "2", "STUB_SLEEP": "5"}
    procs = []
    for _ in range(3):  # 3 replicas on a 2-GPU host
        procs.append(subprocess.Popen([script, "search", "--trials", "3"], env=env_locked, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
        time.sleep(0.5)
    outs = [p.communicate(timeout=30)[0].strip() for p in procs]
    gpus = [o.split()[0] for o in outs]
    assert sorted(gpus[:2]) == ["gpu=0", "gpu=1"], outs
    assert gpus[2] in ("gpu=0", "gpu=1"), outs  # more replicas than GPUs: shares one
    assert all(o.endswith("args=search --trials 3") for o in outs), outs
    # Locks die with their holder: a new replica gets GPU 0 again.
    out = subprocess.run([script, "x"], env={**env, "ALLCONV_GPU_COUNT": "2"}, capture_output=True, text=True)
    assert out.stdout.split()[0] == "gpu=0"
    # A user's CUDA_VISIBLE_DEVICES wins; one GPU or none: nothing to choose.
    out = subprocess.run([script, "x"], env={**env, "ALLCONV_GPU_COUNT": "2", "CUDA_VISIBLE_DEVICES": "3"},
                         capture_output=True, text=True)
    assert out.stdout.split()[0] == "gpu=3"
    out = subprocess.run([script, "x"], env={**env, "ALLCONV_GPU_COUNT": "1"}, capture_output=True, text=True)
    assert out.stdout.split()[0] == "gpu=none"
