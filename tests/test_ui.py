"""What a user sees: the address `allconv search` prints opens the study in MLflow's UI, checked in a real browser.

An MLflow server on loopback holds a finished tiny study; headless Chromium (Debian's ``chromium``, installed by
scripts/test-deps.sh) loads the printed address and renders MLflow's JavaScript app; the test reads the rendered page.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services import MlflowServer, free_port

pytestmark = pytest.mark.services

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render(url: str, profile: Path, screenshot: Path | None = None) -> str:
    """The page's DOM after MLflow's app has run (virtual time lets its requests and renders finish)."""
    assert CHROMIUM, "chromium is not installed (bash scripts/test-deps.sh installs it)"
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--window-size=1400,900"]
    if screenshot is not None:
        subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    return subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout


def test_printed_address_opens_the_study_in_the_training_runs_view(tmp_path: Path) -> None:
    server = MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts", port=free_port(), workers=1)
    server.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(MLFLOW_TRACKING_URI=server.uri, ALLCONV_FAKE_SIZES="60,20", ALLCONV_CACHE_DIR=str(tmp_path / "c"))
        search = subprocess.run(
            [sys.executable, "-m", "allconv_cli", "search", "--model", "B", "--branch", "convpool", "--dataset",
             "fake", "--subset", "40", "--val-size", "20", "--preprocess", "standardize", "--epochs", "1",
             "--trials", "2", "--pruner", "none", "--study-name", "ui-check"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert search.returncode == 0, search.stderr[-3000:]
        match = re.search(r"Open the study: (\S+)", search.stdout)
        assert match, search.stdout[-2000:]
        url = match.group(1)
        assert url.startswith(server.uri) and "workflowType=machine_learning" in url
        shot = tmp_path / "study.png"
        dom = render(url, tmp_path / "profile", screenshot=shot)
        assert shot.stat().st_size > 10_000
        # the run page of the study in the training-runs view: its name, its description, its trials as child runs
        assert "ui-check" in dom and "Child runs" in dom, dom[:2000]
        assert "trial-000" in dom and "trial-001" in dom
        assert "Optuna study" in dom and "Model training" in dom
        assert "Traces 0" not in dom  # not the GenAI overview
    finally:
        server.stop(timeout=3)
