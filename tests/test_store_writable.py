"""A working folder that cannot be written (in Docker: a read-only or foreign-owned mount on /work) is a user error.

MLflow's default store is ``sqlite:///mlflow.db`` in the working folder; without the check, MLflow retries opening it
for about two minutes and ends in a 200-line traceback. `make docker-test` checks the same through the image.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ALLCONV = str(Path(sys.executable).parent / "allconv")
TINY = ["--model", "A", "--branch", "strided", "--dataset", "fake", "--subset", "100", "--val-size", "50",
        "--preprocess", "standardize", "--device", "cpu", "--epochs", "1"]


@pytest.mark.e2e
def test_read_only_working_folder_is_one_line_and_exit_2(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(ALLCONV_CACHE_DIR=str(tmp_path / "cache"), ALLCONV_FAKE_SIZES="200,50")
    # A read-only tmpfs over the folder, in a mount namespace of its own (nothing to unmount, nothing else sees it).
    unshare = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    script = 'mount -t tmpfs -o size=1m,mode=0777,ro allconv-ro "$0" && cd "$0" && exec "$@"'
    started = time.monotonic()
    out = subprocess.run([*unshare, "sh", "-c", script, str(work), ALLCONV, "train", *TINY], env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("Error: cannot write the MLflow database in ") and str(work) in lines[0]
    assert "MLFLOW_TRACKING_URI" in lines[0] and "--user $(id -u):$(id -g)" in lines[0]
    assert time.monotonic() - started < 90, "must not go through MLflow's connection retries"
    assert not list(work.iterdir()), "nothing is created"
