"""``python scripts/services.py up``, as the README documents it: both services come up, the printed ``export``
lines point at working services, and Ctrl-C stops both. Its secrets stay secret: the database password (given here
through POSTGRES_PASSWORD, else generated) is printed nowhere, is in a password file only its owner reads, is needed
on TCP and on the socket (in a folder only the server's user enters), and reaches the MLflow server through its
environment, not its command line or log."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

import services

ROOT = Path(__file__).resolve().parents[1]


def _lines(stream, out: queue.Queue[str]) -> None:
    for line in stream:
        out.put(line)


def _command_lines() -> str:
    """Every process's command line on this machine, as `ps` shows them to any user."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            out.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # the process ended meanwhile
            continue
    return "\n".join(out)


def _check_secrets(exports: dict[str, str], password: str, printed: str, root: Path) -> None:
    storage, passfile = exports["ALLCONV_STORAGE"], Path(exports["PGPASSFILE"])
    assert password not in printed and urlsplit(storage).password is None, "no password is printed"
    assert passfile.stat().st_mode & 0o777 == 0o600 and passfile.stat().st_uid == os.geteuid()
    socket_dir = root / "postgres" / "socket"
    assert socket_dir.stat().st_mode & 0o777 == 0o700, "only the server's user may reach the socket"
    conninfo = storage.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(conninfo, connect_timeout=5, passfile=str(passfile)) as conn:  # = PGPASSFILE
        assert conn.execute("SELECT current_database()").fetchone() == ("optuna",)
    with pytest.raises(psycopg.OperationalError, match="password"):  # no trust: TCP needs the password
        psycopg.connect(conninfo, connect_timeout=5, passfile="/nonexistent").close()
    port = urlsplit(storage).port
    with pytest.raises(psycopg.OperationalError, match="password"):  # and so does the socket
        psycopg.connect(host=str(socket_dir), port=port, user=services.DB_USER, dbname="optuna", connect_timeout=5,
                        passfile="/nonexistent").close()
    assert password not in _command_lines(), "the password is on a command line"
    for log in (root / "postgres" / "postgres.log", root / "mlflow" / "mlflow-server.log"):
        assert password not in log.read_text(errors="replace"), f"{log} holds the password"
    assert "allconv:***@127.0.0.1" in (root / "mlflow" / "mlflow-server.log").read_text(), "the masked backend URL"


@pytest.mark.services
@pytest.mark.slow
def test_services_up_prints_working_urls_and_stops_on_ctrl_c() -> None:
    root = Path(tempfile.mkdtemp(prefix="allconv-up-"))  # not pytest's tmp_path: the postgres user must enter it
    mlflow_port = services.free_port()
    password = "given:pw/with@odd chars\\1"  # a user's: libpq's password file and the URL escaping are exercised
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"POSTGRES_PASSWORD": password}
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "services.py"), "up", "--dir", str(root),
                             "--mlflow-port", str(mlflow_port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    exports: dict[str, str] = {}
    printed = ""
    try:
        deadline = time.monotonic() + 300
        while "# logs" not in exports and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            printed += line
            if line.startswith("export "):
                key, _, value = line.removeprefix("export ").partition("=")
                exports[key] = value.split("#")[0].strip()
            elif line.startswith("# logs"):
                exports["# logs"] = line
        assert "# logs" in exports, f"no start-up within 300 s (exit {proc.poll()}): {proc.stderr.read()[-2000:]}"
        uri, storage = exports["MLFLOW_TRACKING_URI"], exports["ALLCONV_STORAGE"]
        assert uri == f"http://127.0.0.1:{mlflow_port}"
        with urllib.request.urlopen(f"{uri}/health", timeout=10) as resp:
            assert resp.status == 200
        pg_port = urlsplit(storage).port
        _check_secrets(exports, password, printed, root)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(120)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    assert code == 0, proc.stderr.read()[-2000:]
    assert not services.port_open(mlflow_port) and not services.port_open(pg_port), "Ctrl-C stops both services"


@pytest.mark.unit
def test_each_cluster_gets_its_own_password_kept_for_its_restart(tmp_path: Path) -> None:
    """A generated password per cluster (no fixed one), kept in the cluster's 0600 password file so that `up` on the
    same folder finds it again; a given one wins."""
    one, two = services.Postgres(tmp_path / "a", 5001), services.Postgres(tmp_path / "b", 5002)
    assert one.password != two.password and len(one.password) >= 24
    (tmp_path / "a").mkdir()
    one._write_passfile()
    assert one.passfile.stat().st_mode & 0o777 == 0o600
    assert services.Postgres(tmp_path / "a", 5003).password == one.password
    odd = services.Postgres(tmp_path / "c", 5004, password="p:w\\x@y")
    (tmp_path / "c").mkdir()
    odd._write_passfile()
    assert services.Postgres(tmp_path / "c", 5004).password == "p:w\\x@y"
    assert odd.url("optuna") == "postgresql+psycopg://allconv:p%3Aw%5Cx%40y@127.0.0.1:5004/optuna"
    assert odd.url("optuna", password=False) == "postgresql+psycopg://allconv@127.0.0.1:5004/optuna"
    assert services.safe_url(odd.url("mlflow")) == "postgresql+psycopg://allconv:***@127.0.0.1:5004/mlflow"
