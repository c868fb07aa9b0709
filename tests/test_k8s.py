"""deploy/k8s, checked offline: every manifest strictly valid against a pinned Kubernetes schema (kubernetes-validate
ships the schemas, so no cluster and no network are needed), wired to itself (Secret keys, ConfigMaps, volumes,
Services, probes), the MLflow server's command parsed by MLflow's own CLI, and the workers running the same command
as docker-compose.yml and deploy/slurm/worker.sbatch. What only a cluster can show (pods scheduled, a GPU granted)
is not claimed here.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import click
import kubernetes_validate
import pytest
import yaml

from test_docker_files import COMPOSE_SECRETS, instructions, load_compose, option_value, parse_allconv, search_command

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "k8s"
SBATCH = ROOT / "deploy" / "slurm" / "worker.sbatch"
# The oldest Kubernetes in which every field the manifests use is GA (Job.spec.backoffLimitPerIndex: 1.33).
KUBERNETES = "1.33.0"
FILES = ["data.yaml", "mlflow.yaml", "postgres.yaml", "prepare-job.yaml", "secret.yaml", "study.yaml",
         "worker-job.yaml"]
STUDY_SETTINGS = ("MODEL", "BRANCH", "DATASET", "TRIALS", "EPOCHS", "STUDY")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN", re.I)


# ---------------------------------------------------------------------------------------------------------------
# helpers


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def resources() -> list[tuple[str, dict]]:
    return [(f.name, r) for f in sorted(DEPLOY.glob("*.yaml")) for r in load(f.name)]


def one(kind: str, name: str) -> dict:
    (found,) = [r for _, r in resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def pod_spec(resource: dict) -> dict:
    return resource["spec"]["template"]["spec"]


def containers(resource: dict) -> list[dict]:
    spec = pod_spec(resource)
    return spec.get("initContainers", []) + spec["containers"]


def workloads() -> list[dict]:
    return [r for _, r in resources() if r["kind"] in ("Deployment", "StatefulSet", "Job")]


def container(kind: str, name: str, container_name: str) -> dict:
    (found,) = [c for c in containers(one(kind, name)) if c["name"] == container_name]
    return found


def environment(c: dict) -> dict[str, str]:
    """A container's environment as its process sees it: ConfigMaps first, then `env` (literal values; a secret
    shows as ``secret:<key>``)."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(one("ConfigMap", source["configMapRef"]["name"])["data"])
    for var in c.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        env[var["name"]] = f"secret:{ref['key']}" if ref else var["value"]
    return env


def normalized(args: list[str]) -> list[str]:
    """An argument list with every variable reference written ``{NAME}``: Compose's ``${NAME:-default}``,
    Kubernetes' ``$(NAME)`` and the shell's ``$NAME`` / ``${NAME}`` / ``${NAME:-default}``."""
    pattern = r"\$\((\w+)\)|\$\{(\w+)(?::[-?][^}]*)?\}|\$(\w+)"
    return [re.sub(pattern, lambda m: "{" + next(g for g in m.groups() if g) + "}", a) for a in args]


def k8s_worker_args() -> list[str]:
    return container("Job", "allconv-workers", "worker")["args"]


def substituted(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' ``$(VAR)`` expansion in command and args, from the container's environment."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


# ---------------------------------------------------------------------------------------------------------------
# schema


def test_every_manifest_is_strictly_valid_for_the_pinned_kubernetes() -> None:
    assert sorted(f.name for f in DEPLOY.glob("*.yaml")) == FILES
    found = resources()
    assert len(found) == 12, [(f, r["kind"]) for f, r in found]
    for name, resource in found:
        try:  # strict: an unknown or misplaced field fails; a kind without a schema raises SchemaNotFoundError
            version = kubernetes_validate.validate(resource, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {resource['kind']}/{resource['metadata']['name']} at "
                        f"{'.'.join(map(str, exc.path))}: {exc.message}")
        assert version == "1.33"


def test_the_strict_validation_rejects_a_typo_and_a_wrong_type() -> None:
    job = one("Job", "allconv-workers")
    typo = copy.deepcopy(job)
    typo["spec"]["template"]["spec"]["containers"][0]["resource"] = {"limits": {"nvidia.com/gpu": 1}}
    with pytest.raises(kubernetes_validate.ValidationError, match="'resource' was unexpected"):
        kubernetes_validate.validate(typo, KUBERNETES, strict=True)
    wrong = copy.deepcopy(job)
    wrong["spec"]["parallelism"] = "four"
    with pytest.raises(kubernetes_validate.ValidationError, match="is not of type 'integer'"):
        kubernetes_validate.validate(wrong, KUBERNETES, strict=True)


def test_each_manifest_fits_a_screen() -> None:
    for name in FILES:
        lines = (DEPLOY / name).read_text().splitlines()
        assert len(lines) <= 100 and max(map(len, lines)) <= 120, f"{name}: {len(lines)} lines"
        assert lines[0].startswith("# "), f"{name} starts with a comment saying what it is"


# ---------------------------------------------------------------------------------------------------------------
# wiring


def test_secrets_live_in_the_secret_only_and_are_all_used() -> None:
    secret = one("Secret", "allconv-passwords")
    keys = set(secret["stringData"])
    assert all(v == "" for v in secret["stringData"].values()), "secret.yaml must hold no password"
    used = set()
    for resource in workloads():
        for c in containers(resource):
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "allconv-passwords" and ref["key"] in keys, (c["name"], ref)
                    used.add(ref["key"])
                else:
                    assert not SECRET_NAME.search(var["name"]), f"{c['name']}: {var['name']} is a literal"
    assert used == keys
    for _, resource in resources():
        if resource["kind"] == "ConfigMap":
            assert not any(SECRET_NAME.search(k) for k in resource["data"]), resource["metadata"]["name"]
            assert not any(urlsplit(v).password for v in resource["data"].values() if "://" in v)


def test_references_resolve_and_nothing_listens_outside_the_cluster() -> None:
    claims = {r["metadata"]["name"] for _, r in resources() if r["kind"] == "PersistentVolumeClaim"}
    config_maps = {r["metadata"]["name"] for _, r in resources() if r["kind"] == "ConfigMap"}
    for resource in workloads():
        spec, template = pod_spec(resource), resource["spec"]["template"]
        labels = template.get("metadata", {}).get("labels", {})
        if resource["kind"] != "Job":
            assert resource["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert not spec.get("hostNetwork") and not spec.get("hostPID")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        templates = {t["metadata"]["name"] for t in resource["spec"].get("volumeClaimTemplates", [])}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims
            if "configMap" in v:
                assert v["configMap"]["name"] in config_maps
        for c in containers(resource):
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in templates, (c["name"], mount)
            assert not any("hostPort" in p for p in c.get("ports", [])), c["name"]
            env = environment(c)
            for arg in c.get("command", []) + c.get("args", []):
                for var in re.findall(r"\$\((\w+)\)", arg):
                    assert var in env, f"{c['name']}: $({var}) is not in its environment"
    for _, service in resources():
        if service["kind"] != "Service":
            continue
        spec = service["spec"]
        assert spec.get("type", "ClusterIP") == "ClusterIP" and "externalIPs" not in spec, "cluster network only"
        (target,) = [w for w in workloads() if w["kind"] != "Job"
                     and spec["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        ports = {p.get("name"): p["containerPort"] for c in containers(target) for p in c.get("ports", [])}
        for port in spec["ports"]:
            assert port.get("targetPort", port["port"]) in (*ports, *ports.values()), port
    statefulset = one("StatefulSet", "postgres")
    assert one("Service", statefulset["spec"]["serviceName"])["spec"]["clusterIP"] == "None", "a headless Service"


def test_postgres_matches_the_compose_service() -> None:
    compose = load_compose(COMPOSE_SECRETS)["services"]["postgres"]
    pg = container("StatefulSet", "postgres", "postgres")
    env = environment(pg)
    assert pg["image"] == compose["image"]
    assert pg["args"] == compose["command"]
    for name in ("POSTGRES_USER", "POSTGRES_DB"):
        assert env[name] == compose["environment"][name]
    assert env["POSTGRES_PASSWORD"] == "secret:postgres-password"
    init = one("ConfigMap", "postgres-init")["data"]
    sql = (ROOT / "scripts" / "postgres-init.sql").read_text()
    statements = [s.strip() for s in re.sub(r"--.*", "", sql).split(";") if s.strip()]
    assert [s.strip() for s in "".join(init.values()).split(";") if s.strip()] == statements
    assert any(m["mountPath"] == "/docker-entrypoint-initdb.d" for m in pg["volumeMounts"])
    data = next(m for m in pg["volumeMounts"] if m["name"] == "data")["mountPath"]
    assert env["PGDATA"].startswith(data + "/"), "PGDATA in a folder of the volume (its root holds lost+found)"
    claim = one("StatefulSet", "postgres")["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"]
    assert all(p["exec"]["command"][0] == "pg_isready" for p in (pg["readinessProbe"], pg["livenessProbe"]))


def test_mlflow_server_parses_with_mlflow_and_answers_the_workers() -> None:
    from mlflow import environment_variables as mlflow_env
    from mlflow.cli import server as server_command

    mlflow = container("Deployment", "mlflow", "mlflow")
    assert mlflow["command"] == ["mlflow"] and mlflow["args"][0] == "server"
    ctx = server_command.make_context("mlflow server", list(mlflow["args"][1:]))
    assert ctx.params["app_name"] == "basic-auth" and ctx.params["serve_artifacts"]
    assert ctx.params["host"] == "0.0.0.0"
    service = one("Service", "mlflow")["spec"]["ports"][0]
    assert ctx.params["port"] == mlflow["ports"][0]["containerPort"] == service["port"]
    tracking = urlsplit(one("ConfigMap", "allconv-study")["data"]["MLFLOW_TRACKING_URI"])
    assert (tracking.hostname, tracking.port) == ("mlflow", service["port"])
    allowed = ctx.params["allowed_hosts"].split(",")
    for host in (tracking.netloc, f"mlflow.allconv.svc.cluster.local:{service['port']}", "localhost:5000"):
        assert any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed), f"{host} would get 403"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert mlflow[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    # Artifacts on the volume; MLflow's user store (basic_auth.db in the working folder) on it too, but not served.
    mount = mlflow["volumeMounts"][0]["mountPath"]
    assert mlflow["workingDir"] == mount and ctx.params["artifacts_destination"].startswith(mount + "/")
    known = {v.name for v in vars(mlflow_env).values() if isinstance(v, mlflow_env._EnvironmentVariable)}
    known |= {p.envvar for p in server_command.params if p.envvar}
    env = environment(mlflow)
    assert set(env) - {"PGPASSWORD"} <= known, "unknown MLflow variables"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "secret:mlflow-admin-password"
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == "secret:mlflow-flask-secret-key"
    assert env["PGPASSWORD"] == "secret:postgres-password"
    assert urlsplit(env["MLFLOW_BACKEND_STORE_URI"]).path == "/mlflow"
    # The same server as docker-compose.yml's, but for the address the artifacts are kept at.
    compose = load_compose(COMPOSE_SECRETS)["services"]["mlflow"]
    flags = {a for a in mlflow["args"] if a.startswith("--")}
    assert flags == {a for a in compose["command"] if a.startswith("--")}
    assert set(env) == set(compose["environment"])
    for key, value in env.items():
        if not value.startswith("secret:"):
            assert value == compose["environment"][key], key


def test_prepare_job_creates_the_workers_user_first() -> None:
    user = container("Job", "allconv-prepare", "mlflow-user")
    assert [c["name"] for c in pod_spec(one("Job", "allconv-prepare"))["initContainers"]] == ["mlflow-user"]
    env, study = environment(user), one("ConfigMap", "allconv-study")["data"]
    assert user["command"][:4] == ["python", "/opt/allconv/scripts/services.py", "add-user",
                                   study["MLFLOW_TRACKING_USERNAME"]]
    assert instructions("WORKDIR")[0] == "/opt/allconv" and ". ." in instructions("COPY"), "the repository is there"
    assert env["MLFLOW_TRACKING_URI"] == study["MLFLOW_TRACKING_URI"]
    server = environment(container("Deployment", "mlflow", "mlflow"))
    assert env["MLFLOW_TRACKING_USERNAME"] == server["MLFLOW_AUTH_ADMIN_USERNAME"]
    assert env["MLFLOW_TRACKING_PASSWORD"] == server["MLFLOW_AUTH_ADMIN_PASSWORD"]
    worker = environment(container("Job", "allconv-workers", "worker"))
    assert env["ALLCONV_USER_PASSWORD"] == worker["MLFLOW_TRACKING_PASSWORD"] == "secret:mlflow-worker-password"


def test_worker_job_is_an_indexed_gpu_job_that_retries_crashes_but_not_user_errors() -> None:
    job = one("Job", "allconv-workers")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"] >= 1
    worker = container("Job", "allconv-workers", "worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod_spec(job)["restartPolicy"] == "Never" and spec["backoffLimitPerIndex"] >= 1
    rules = spec["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailJob"]
    assert fail and fail[0]["onExitCodes"] == {"containerName": "worker", "operator": "In",
                                               "values": [click.UsageError.exit_code]}, "a user error: exit 2"
    assert any(r["action"] == "Ignore" and r["onPodConditions"][0]["type"] == "DisruptionTarget" for r in rules)
    # A stop is the image's stop signal, so the running trial is checkpointed and re-queued within the grace period.
    assert instructions("STOPSIGNAL") == ["SIGINT"]
    for kind, name, c in (("Job", "allconv-workers", "worker"), ("Deployment", "mlflow", "mlflow")):
        assert "kill -INT 1" in " ".join(container(kind, name, c)["lifecycle"]["preStop"]["exec"]["command"])
    assert pod_spec(job)["terminationGracePeriodSeconds"] >= 60
    # Every allconv container runs the image of our Dockerfile, as docker-compose.yml names it.
    image = load_compose(COMPOSE_SECRETS)["services"]["worker"]["image"]
    for resource in workloads():
        for c in containers(resource):
            if resource["metadata"]["name"] != "postgres":
                assert c["image"] == image, (c["name"], c["image"])
    data = container("Job", "allconv-data", "data")
    assert data["command"] + data["args"] == load_compose(COMPOSE_SECRETS)["services"]["data"]["entrypoint"] + \
        load_compose(COMPOSE_SECRETS)["services"]["data"]["command"]


def test_workers_have_the_compose_workers_environment() -> None:
    compose = load_compose(COMPOSE_SECRETS)["services"]["worker"]["environment"]
    for name in ("allconv-workers", "allconv-prepare"):
        env = environment(container("Job", name, "worker" if name == "allconv-workers" else "prepare"))
        settings = {k: v for k, v in env.items() if k not in STUDY_SETTINGS}
        assert set(settings) == set(compose)
        for key, value in settings.items():
            if not value.startswith("secret:"):
                assert value == compose[key], key
        assert settings["PGPASSWORD"] == "secret:postgres-password"
    mounts = {m["mountPath"]: m for m in container("Job", "allconv-workers", "worker")["volumeMounts"]}
    assert mounts[env["ALLCONV_DATA_DIR"]]["readOnly"] and env["ALLCONV_CACHE_DIR"] in mounts


# ---------------------------------------------------------------------------------------------------------------
# the one worker command


def test_compose_and_k8s_run_the_same_worker_command() -> None:
    compose = load_compose(COMPOSE_SECRETS, keep_variables=True)["services"]
    worker = normalized(compose["worker"]["command"])
    assert worker == normalized(k8s_worker_args()), "docker-compose.yml and worker-job.yaml differ"
    assert normalized(compose["prepare"]["command"]) == [*worker, "--prepare"]
    assert normalized(container("Job", "allconv-prepare", "prepare")["args"]) == [*worker, "--prepare"]
    assert [w.strip("{}") for w in worker if w.startswith("{")] == list(STUDY_SETTINGS)
    # The defaults are the same study: compose's ${MODEL:-C} ... and study.yaml's values.
    study = one("ConfigMap", "allconv-study")["data"]
    defaults = load_compose(COMPOSE_SECRETS)["services"]["worker"]["command"]
    assert substituted(k8s_worker_args(), study) == defaults


def test_k8s_worker_command_parses_with_the_real_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = container("Job", "allconv-workers", "worker")
    env = {k: v for k, v in environment(worker).items() if not v.startswith("secret:")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ctx = parse_allconv(substituted(worker["args"], env))
    assert ctx.params["storage_url"] == env["ALLCONV_STORAGE"] and ctx.params["trials"] == int(env["TRIALS"])
    assert ctx.params["study_name"] == env["STUDY"]


def test_prepare_command_parses_with_the_real_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    help_text = search_command().get_help(click.Context(search_command(), info_name="search"))
    if "--prepare" not in help_text:
        pytest.skip("`allconv search` has no --prepare yet (issue 19, the lead's part): only compared, not parsed")
    prepare = container("Job", "allconv-prepare", "prepare")
    env = {k: v for k, v in environment(prepare).items() if not v.startswith("secret:")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ctx = parse_allconv(substituted(prepare["args"], env))
    (flag,) = [p for p in search_command().params if "--prepare" in p.opts]
    assert ctx.params[flag.name] is True and ctx.params["study_name"] == env["STUDY"]


def sbatch_search_args(text: str) -> list[str]:
    """The arguments after ``allconv`` of the one ``allconv search`` line without --prepare (continuations
    joined; a trailing ``"$@"`` passes the sbatch command line's extra options and is not part of the command)."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        if line.strip().startswith("#") or "allconv" not in line:
            continue
        words = shlex.split(line, comments=True)
        starts = [i for i, w in enumerate(words[:-1]) if w.split("/")[-1] == "allconv" and words[i + 1] == "search"]
        for i in starts:
            args = words[i + 1:]
            if args and args[-1] == "$@":
                args = args[:-1]
            if "--prepare" not in args:
                found.append(args)
    assert len(found) == 1, f"expected one `allconv search` worker line in {SBATCH}, found {found}"
    return found[0]


def test_slurm_runs_the_same_worker_command() -> None:
    if not SBATCH.is_file():
        pytest.skip(f"{SBATCH.relative_to(ROOT)} is missing in this branch: the SLURM comparison is not made")
    compose = load_compose(COMPOSE_SECRETS, keep_variables=True)["services"]["worker"]["command"]
    assert normalized(sbatch_search_args(SBATCH.read_text())) == normalized(compose)


def test_sbatch_parsing_finds_the_worker_line() -> None:
    """The parser the SLURM comparison uses, on the shapes an sbatch file has."""
    text = """#!/bin/bash
#SBATCH --array=0-3%2
# allconv search --model X (a comment)
srun --kill-on-bad-exit allconv search --model "${MODEL:-C}" --branch "$BRANCH" \\
    --trials ${TRIALS} "$@"
"""
    assert normalized(sbatch_search_args(text)) == ["search", "--model", "{MODEL}", "--branch", "{BRANCH}",
                                                    "--trials", "{TRIALS}"]


# ---------------------------------------------------------------------------------------------------------------
# README


def readme_commands() -> list[str]:
    text = (DEPLOY / "README.md").read_text()
    (block,) = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_readme_applies_every_manifest_in_order() -> None:
    commands = readme_commands()
    applied = [f for c in commands if c.startswith("kubectl apply") for f in re.findall(r"-f (\S+)", c)]
    assert sorted(Path(f).name for f in applied) == sorted(set(FILES) - {"secret.yaml"})
    assert all((ROOT / f).is_file() for f in applied)

    def index(pattern: str) -> int:
        return next(i for i, c in enumerate(commands) if re.search(pattern, c))

    assert index(r"create secret") < index(r"apply.*postgres\.yaml") < index(r"apply.*prepare-job")
    assert index(r"wait .*job/allconv-data") < index(r"apply.*prepare-job")
    assert index(r"apply.*prepare-job") < index(r"wait --for=condition=complete job/allconv-prepare") \
        < index(r"apply.*worker-job")
    (create,) = [c for c in commands if "create secret" in c]
    keys = re.findall(r"--from-literal=([\w-]+)=", create)
    assert sorted(keys) == sorted(one("Secret", "allconv-passwords")["stringData"])
    assert "create secret generic allconv-passwords" in create
    (sed,) = [c for c in commands if c.startswith("sed ")]
    old = shlex.split(sed)[2].split("#")[1]
    ours = [c for r in workloads() if r["metadata"]["name"] != "postgres" for c in containers(r)]
    assert sum((DEPLOY / f).read_text().count(old) for f in FILES) == len(ours), f"`{old}` names every allconv image"
    text = (DEPLOY / "README.md").read_text()
    assert "oci://ghcr.io/mlflow/charts/mlflow" in text, "the pointer to MLflow's official Helm chart"
    assert f"{KUBERNETES[:4]} or newer" in text, "the README names the Kubernetes the manifests are checked for"
    assert option_value(k8s_worker_args(), "--study-name") == "$(STUDY)"
