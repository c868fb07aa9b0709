"""PostgreSQL and an MLflow tracking server on loopback, as plain processes.

This is the start-up sequence of ``docker-compose.yml`` without Docker: a private PostgreSQL cluster (``initdb``
into a folder, databases ``optuna`` and ``mlflow``), then ``mlflow server`` with PostgreSQL as its backend store and
the artifacts served by the server, then the workers (``allconv search ... --storage postgresql+psycopg://...`` with
``MLFLOW_TRACKING_URI=http://...``). One module for three users: the test fixtures (``tests/conftest.py``),
``benchmarks/bench_storage.py`` and ``python scripts/services.py up`` (the same services by hand).

PostgreSQL refuses to run as root, so when started as root the cluster belongs to (and the server runs as) the
``postgres`` user that Debian's ``postgresql`` package creates (``nobody`` when there is none). Its binaries are
looked up in ``$PG_BIN``, on ``PATH``, then in ``/usr/lib/postgresql/<version>/bin`` (Debian does not put
``initdb`` on ``PATH``).

Secrets stay where only their owner reads them: the database password is generated (or given) per cluster, kept in
a 0600 libpq password file (``PGPASSFILE``), checked with scram-sha-256 on TCP and on a socket in a 0700 folder;
the MLflow server gets its backend URI through ``MLFLOW_BACKEND_STORE_URI``, never on its command line, and what
is printed or logged goes through ``allconv_cli.stores.safe_url``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

from allconv_cli.stores import safe_url

DB_USER = "allconv"
DATABASES = ("optuna", "mlflow")
MLFLOW_ADMIN = "admin"
AUTH_CONFIG = Path(__file__).resolve().parents[1] / "scripts" / "mlflow-auth.ini"  # as docker-compose.yml, deploy/k8s



class ServiceError(RuntimeError):
    """A service could not be started; the message says which and where its log is."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def find_pg_bin() -> Path:
    """The folder holding ``initdb`` and ``postgres``; raises :class:`ServiceError` with the install hint."""
    if os.environ.get("PG_BIN"):  # an explicit choice: no fallback
        pg_bin = Path(os.environ["PG_BIN"])
        if (pg_bin / "initdb").is_file() and (pg_bin / "postgres").is_file():
            return pg_bin
        raise ServiceError(f"PG_BIN={pg_bin} holds no initdb and postgres")
    candidates = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name or 0))
    candidates += [Path(p) for p in reversed(versions)]
    for c in candidates:
        if (c / "initdb").is_file() and (c / "postgres").is_file():
            return c
    raise ServiceError("PostgreSQL server binaries (initdb, postgres) not found: apt-get install -y postgresql "
                       "(or set PG_BIN to the folder holding them)")


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only, from the first byte (no window where others can)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a daemon's log, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Postgres:
    """A private PostgreSQL cluster under ``root`` listening on 127.0.0.1:``port`` (scram-sha-256 password logins).

    ``password`` is the superuser's. Without one a new cluster gets a generated one, and a cluster started again
    (``scripts/services.py up --dir`` on the same folder) the one in its ``passfile``: libpq's password file (0600,
    rewritten on every start), so clients given ``PGPASSFILE`` connect with a URL that holds no password."""

    def __init__(self, root: Path | None = None, port: int | None = None, *, durable: bool = False,
                 password: str | None = None) -> None:
        # Not under pytest's tmp_path: its folders are 0700 root, which the postgres user could not enter.
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="allconv-pg-"))
        self.port = port or free_port()
        self.durable = durable  # False: fsync off, fine for throw-away test clusters
        self.data = self.root / "pgdata"
        self.log = self.root / "postgres.log"
        self.passfile = self.root / "pgpass"
        self.password = password or self._stored_password() or secrets.token_urlsafe(24)
        self.proc: subprocess.Popen[bytes] | None = None
        self._as = self._run_as()

    @staticmethod
    def _run_as() -> dict[str, object]:
        if os.geteuid() != 0:
            return {}
        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(name)
                return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        raise ServiceError("running as root and there is no 'postgres' or 'nobody' user to run PostgreSQL as")

    def url(self, database: str = "optuna", driver: str = "postgresql+psycopg", *, password: bool = True) -> str:
        """The database's URL; ``password=False`` leaves the password out (for clients given ``PGPASSFILE``)."""
        secret = f":{quote(self.password, safe='')}" if password else ""
        return f"{driver}://{DB_USER}{secret}@127.0.0.1:{self.port}/{database}"

    def _stored_password(self) -> str | None:
        with contextlib.suppress(OSError, IndexError):
            line = self.passfile.read_text().splitlines()[0]
            fields = line.split(":", 4)  # host, port, database and user hold no ':'
            return re.sub(r"\\(.)", r"\1", fields[4]) or None
        return None

    def _write_passfile(self) -> None:
        """``host:port:database:user:password`` lines; libpq ignores a password file others can read."""
        escaped = self.password.replace("\\", "\\\\").replace(":", "\\:")
        text = "".join(f"{host}:{self.port}:*:{DB_USER}:{escaped}\n" for host in ("127.0.0.1", "localhost"))
        _write_private(self.passfile, text)

    def _chown(self, path: Path) -> None:
        if self._as:
            os.chown(path, self._as["user"], self._as["group"])  # type: ignore[arg-type]

    def start(self, timeout: float = 60.0) -> Postgres:
        pg_bin = find_pg_bin()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # the postgres user may enter; what is secret inside is 0600 / 0700
        socket_dir = self.root / "socket"  # only the server's user may connect through the socket
        socket_dir.mkdir(mode=0o700, exist_ok=True)
        socket_dir.chmod(0o700)
        self._chown(socket_dir)
        self._write_passfile()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        if not (self.data / "PG_VERSION").exists():
            self._initdb(pg_bin, env)
        settings = {
            "listen_addresses": "127.0.0.1", "port": str(self.port),
            "unix_socket_directories": str(socket_dir), "max_connections": "200",
        }
        if not self.durable:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        args = [str(pg_bin / "postgres"), "-D", str(self.data)]
        for k, v in settings.items():
            args += ["-c", f"{k}={v}"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root, start_new_session=True,
                **self._as,  # type: ignore[arg-type]
            )
        try:
            self._wait_ready(timeout)
            self._create_databases()
        except BaseException:
            self.stop()
            raise
        return self

    def _initdb(self, pg_bin: Path, env: dict[str, str]) -> None:
        """A new cluster whose every login (socket and TCP) needs the password; initdb reads it from a 0600 file
        that is removed right after."""
        self.data.mkdir(exist_ok=True)
        self._chown(self.data)
        pwfile = self.root / "initdb-password"
        _write_private(pwfile, self.password + "\n")
        self._chown(pwfile)
        try:
            out = subprocess.run(
                [str(pg_bin / "initdb"), "-D", str(self.data), "-U", DB_USER, f"--pwfile={pwfile}",
                 "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-instructions"],
                capture_output=True, text=True, env=env, cwd=self.root, **self._as,  # type: ignore[arg-type]
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if out.returncode:
            raise ServiceError(f"initdb failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")

    def _connect(self, database: str = "postgres"):  # -> psycopg.Connection (imported lazily)
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user=DB_USER, password=self.password,
                               dbname=database, autocommit=True, connect_timeout=3)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServiceError(f"postgres exited with {self.proc.returncode}; {self.log}:\n{tail(self.log)}")
            try:
                with self._connect():
                    return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise ServiceError(f"postgres not ready after {timeout:.0f}s ({exc}); {self.log}:\n"
                                       f"{tail(self.log)}") from None
                time.sleep(0.3)

    def _create_databases(self) -> None:
        with self._connect() as conn:
            have = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
            for db in DATABASES:
                if db not in have:
                    conn.execute(f'CREATE DATABASE "{db}"')

    def reset_database(self, database: str) -> None:
        """Drop and re-create a database (benchmarks start each configuration from an empty one)."""
        with self._connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{database}"')

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT)  # SIGINT = PostgreSQL's "fast shutdown"
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1:``port`` with ``backend_uri`` as its store and artifacts served by itself.

    The backend URI (it may hold a password) reaches the server through ``MLFLOW_BACKEND_STORE_URI``, never its
    command line. ``auth=True`` runs MLflow's basic-auth app, as docker-compose.yml and deploy/k8s do, with their
    settings (``AUTH_CONFIG``): the admin ``MLFLOW_ADMIN`` with a generated ``admin_password``, the users in
    ``basic_auth.db`` in ``root`` (the server's working folder); :meth:`add_user` creates the workers' user."""

    def __init__(self, backend_uri: str, root: Path, port: int | None = None, workers: int = 2, *,
                 auth: bool = False) -> None:
        self.backend_uri = backend_uri
        self.root = Path(root)
        self.artifacts = self.root / "artifacts"
        self.port = port or free_port()
        self.workers = workers
        self.auth = auth
        self.admin_password = secrets.token_urlsafe(24) if auth else None
        self._flask_key = secrets.token_urlsafe(32)  # kept across restart(): the UI's CSRF tokens stay valid
        self.log = self.root / "mlflow-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        args = [
            sys.executable, "-m", "mlflow", "server",
            "--artifacts-destination", str(self.artifacts), "--serve-artifacts",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
        ]
        return [*args, "--app-name", "basic-auth"] if self.auth else args

    def environment(self) -> dict[str, str]:
        """The settings the server reads from its environment: those holding secrets."""
        env = {"MLFLOW_BACKEND_STORE_URI": self.backend_uri}
        if self.auth:
            env.update(MLFLOW_AUTH_CONFIG_PATH=str(AUTH_CONFIG), MLFLOW_AUTH_ADMIN_USERNAME=MLFLOW_ADMIN,
                       MLFLOW_AUTH_ADMIN_PASSWORD=str(self.admin_password),
                       MLFLOW_FLASK_SERVER_SECRET_KEY=self._flask_key)
        return env

    def start(self, timeout: float = 180.0) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.artifacts.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(self.environment())
        with open(self.log, "ab") as log:
            auth = f", basic auth (admin {MLFLOW_ADMIN})" if self.auth else ""
            log.write(f"\n==== {time.strftime('%H:%M:%S')} {' '.join(self.command())} "
                      f"(backend {safe_url(self.backend_uri)}{auth})\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.root, start_new_session=True)
        try:
            wait_healthy(self.uri, timeout, self.proc)
        except ServiceError as exc:
            self.stop()
            raise ServiceError(f"{exc}; {self.log}:\n{tail(self.log)}") from None
        return self

    def add_user(self, username: str, password: str) -> str:
        """Create (or set the password of) a user with the admin's credentials, through ``scripts/services.py
        add-user``: the command docker-compose.yml and deploy/k8s run. Returns its one line of output."""
        if not self.auth:
            raise ServiceError("add_user needs a server started with auth=True")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(MLFLOW_TRACKING_URI=self.uri, MLFLOW_TRACKING_USERNAME=MLFLOW_ADMIN,
                   MLFLOW_TRACKING_PASSWORD=str(self.admin_password), ALLCONV_USER_PASSWORD=password)
        script = Path(__file__).resolve().parents[1] / "scripts" / "services.py"
        out = subprocess.run([sys.executable, str(script), "add-user", username], env=env, capture_output=True,
                             text=True, timeout=300)
        if out.returncode:
            raise ServiceError(f"add-user {username} exited with {out.returncode}: {out.stderr.strip()[-2000:]}")
        return out.stdout.strip()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        _stop(self.proc, sig, group=True, timeout=timeout)
        self.proc = None

    def restart(self, down_seconds: float = 0.0, timeout: float = 180.0) -> None:
        """Kill the server (SIGKILL, as a crash), stay down ``down_seconds``, start it again on the same port."""
        self.stop(signal.SIGKILL)
        time.sleep(down_seconds)
        self.start(timeout)


def wait_healthy(uri: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until the MLflow server at ``uri`` answers ``/health`` (open to all, also under basic auth), or raise."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"mlflow server exited with {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
            if resp.status == 200:
                return
        if time.monotonic() > deadline:
            raise ServiceError(f"mlflow server at {safe_url(uri)} not healthy after {timeout:.0f}s")
        time.sleep(0.5)


def add_mlflow_user(tracking_uri: str, username: str, password: str) -> str:
    """Create ``username`` on the basic-auth MLflow server at ``tracking_uri``, or set its password when it exists,
    so that the Secret / environment stays the one source of the password. MLflow's own client does it, with the
    admin's credentials from ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` as for any MLflow client.
    Returns ``"created"`` or ``"updated"``."""
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    client = get_app_client("basic-auth", tracking_uri=tracking_uri)
    try:
        client.create_user(username, password)
        return "created"
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    client.update_user_password(username, password)
    return "updated"


def _stop(proc: subprocess.Popen[bytes] | None, sig: int, group: bool = False, timeout: float = 20.0) -> None:
    """Signal a process we started (or its process group), then SIGKILL it if it is still there after ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
        proc.wait(10)
    if group:  # uvicorn's worker processes share the group; make sure none outlives the server
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def serve(root: Path, pg_port: int | None = None, mlflow_port: int = 5000, pg_password: str | None = None) -> None:
    """Start durable PostgreSQL and the MLflow server on it under ``root``, print the ``export`` lines (no secret in
    them: the password is in the 0600 ``PGPASSFILE``), and keep them up until the server exits or
    KeyboardInterrupt; both are stopped on the way out."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # the postgres user must be able to enter it
    pg = Postgres(root / "postgres", pg_port, durable=True, password=pg_password).start()
    try:
        server = MlflowServer(pg.url("mlflow"), root / "mlflow", mlflow_port).start()
        try:
            print(f"export MLFLOW_TRACKING_URI={server.uri}")
            print(f"export ALLCONV_STORAGE={pg.url('optuna', password=False)}  # read by allconv search as --storage")
            print(f"export PGPASSFILE={pg.passfile}  # the database password, readable by you only")
            print(f"# logs: {pg.log} {server.log}", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while server.proc is not None and server.proc.poll() is None:
                    time.sleep(1)
        finally:
            server.stop()
    finally:
        pg.stop()
