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
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

DB_USER = "allconv"
DB_PASSWORD = "allconv-secret"
DATABASES = ("optuna", "mlflow")


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


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Postgres:
    """A private PostgreSQL cluster under ``root`` listening on 127.0.0.1:``port`` (password authentication)."""

    def __init__(self, root: Path | None = None, port: int | None = None, *, durable: bool = False) -> None:
        # Not under pytest's tmp_path: its folders are 0700 root, which the postgres user could not enter.
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="allconv-pg-"))
        self.port = port or free_port()
        self.durable = durable  # False: fsync off, fine for throw-away test clusters
        self.data = self.root / "pgdata"
        self.log = self.root / "postgres.log"
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

    def url(self, database: str = "optuna", driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{self.port}/{database}"

    def _chown(self, path: Path) -> None:
        if self._as:
            os.chown(path, self._as["user"], self._as["group"])  # type: ignore[arg-type]

    def start(self, timeout: float = 60.0) -> Postgres:
        pg_bin = find_pg_bin()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        (self.root / "socket").mkdir(exist_ok=True)
        self._chown(self.root / "socket")
        pwfile = self.root / "pwfile"
        pwfile.write_text(DB_PASSWORD + "\n")
        self._chown(pwfile)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        if not (self.data / "PG_VERSION").exists():
            self.data.mkdir(exist_ok=True)
            self._chown(self.data)
            out = subprocess.run(
                [str(pg_bin / "initdb"), "-D", str(self.data), "-U", DB_USER, f"--pwfile={pwfile}",
                 "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-instructions"],
                capture_output=True, text=True, env=env, cwd=self.root, **self._as,  # type: ignore[arg-type]
            )
            if out.returncode:
                raise ServiceError(f"initdb failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
        settings = {
            "listen_addresses": "127.0.0.1", "port": str(self.port),
            "unix_socket_directories": str(self.root / "socket"), "max_connections": "200",
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

    def _connect(self, database: str = "postgres"):  # -> psycopg.Connection (imported lazily)
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user=DB_USER, password=DB_PASSWORD,
                               dbname=database, autocommit=True, connect_timeout=3)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServiceError(f"postgres exited with {self.proc.returncode}; {self.log}:\n{_tail(self.log)}")
            try:
                with self._connect():
                    return
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise ServiceError(f"postgres not ready after {timeout:.0f}s ({exc}); {self.log}:\n"
                                       f"{_tail(self.log)}") from None
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
    """``mlflow server`` on 127.0.0.1:``port`` with ``backend_uri`` as its store and artifacts served by itself."""

    def __init__(self, backend_uri: str, root: Path, port: int | None = None, workers: int = 2) -> None:
        self.backend_uri = backend_uri
        self.root = Path(root)
        self.artifacts = self.root / "artifacts"
        self.port = port or free_port()
        self.workers = workers
        self.log = self.root / "mlflow-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", str(self.artifacts), "--serve-artifacts",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
        ]

    def start(self, timeout: float = 180.0) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.artifacts.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        with open(self.log, "ab") as log:
            log.write(f"\n==== {time.strftime('%H:%M:%S')} {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.root, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServiceError(f"mlflow server exited with {self.proc.returncode}; {self.log}:\n"
                                   f"{_tail(self.log)}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                if resp.status == 200:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceError(f"mlflow server not healthy after {timeout:.0f}s; {self.log}:\n{_tail(self.log)}")
            time.sleep(0.5)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        _stop(self.proc, sig, group=True, timeout=timeout)
        self.proc = None

    def restart(self, down_seconds: float = 0.0, timeout: float = 180.0) -> None:
        """Kill the server (SIGKILL, as a crash), stay down ``down_seconds``, start it again on the same port."""
        self.stop(signal.SIGKILL)
        time.sleep(down_seconds)
        self.start(timeout)


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


def serve(root: Path, pg_port: int | None = None, mlflow_port: int = 5000) -> None:
    """Start durable PostgreSQL and the MLflow server on it under ``root``, print the two ``export`` lines, and keep
    them up until the server exits or KeyboardInterrupt; both are stopped on the way out."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # the postgres user must be able to enter it
    pg = Postgres(root / "postgres", pg_port, durable=True).start()
    try:
        server = MlflowServer(pg.url("mlflow"), root / "mlflow", mlflow_port).start()
        try:
            print(f"export MLFLOW_TRACKING_URI={server.uri}")
            print(f"export ALLCONV_STORAGE={pg.url('optuna')}  # read by allconv search as --storage")
            print(f"# logs: {pg.log} {server.log}", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while server.proc is not None and server.proc.poll() is None:
                    time.sleep(1)
        finally:
            server.stop()
    finally:
        pg.stop()
