"""``python scripts/services.py up``, as the README documents it: both services come up, the two printed ``export``
lines point at working services, and Ctrl-C stops both."""

from __future__ import annotations

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

pytestmark = [pytest.mark.services, pytest.mark.slow]


def _lines(stream, out: queue.Queue[str]) -> None:
    for line in stream:
        out.put(line)


def test_services_up_prints_working_urls_and_stops_on_ctrl_c() -> None:
    root = Path(tempfile.mkdtemp(prefix="allconv-up-"))  # not pytest's tmp_path: the postgres user must enter it
    mlflow_port = services.free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "services.py"), "up", "--dir", str(root),
                             "--mlflow-port", str(mlflow_port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    exports: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 300
        while "# logs" not in exports and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
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
        with psycopg.connect(storage.replace("postgresql+psycopg", "postgresql"), connect_timeout=5) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("optuna",)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(120)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    assert code == 0, proc.stderr.read()[-2000:]
    assert not services.port_open(mlflow_port) and not services.port_open(pg_port), "Ctrl-C stops both services"
