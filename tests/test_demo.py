"""`make demo`, the README's first command: its search learns, and the report after it opens with the study.

The search is the Makefile's own (``DEMO_SEARCH``, read from the Makefile, so the two cannot drift apart), run in a
fresh folder with MLflow's and Optuna's default stores, as `make demo` runs it. The demo then runs ``allconv report``,
which this test runs too.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


def demo_search_args() -> list[str]:
    """The options of `make demo`'s search, from the Makefile's ``DEMO_SEARCH := ...`` (continuation lines joined)."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    (line,) = re.findall(r"^DEMO_SEARCH\s*:?=(.*)$", text, re.M)
    return shlex.split(line)


def test_make_demo_runs_this_search_then_the_report() -> None:
    recipe = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "allconv search $(DEMO_SEARCH)" in recipe and recipe.rstrip().endswith("allconv report")


def test_demo_search_learns_and_the_report_shows_the_study_first(tmp_path: Path) -> None:
    args = demo_search_args()
    assert "--dataset" in args and args[args.index("--dataset") + 1] == "fake", "the demo downloads nothing"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ALLCONV_"))}
    # one torch thread, as the other tests' CLI processes: on a busy machine two threads wait on each other (the
    # search took 4 min instead of 99 s at load 6); the arguments, and so the trials, are the demo's
    env.update(ALLCONV_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cli = [sys.executable, "-m", "allconv_cli"]
    started = time.monotonic()
    search = subprocess.run([*cli, "search", *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=900)
    seconds = time.monotonic() - started
    assert search.returncode == 0, search.stdout[-3000:] + search.stderr[-3000:]
    ignored = re.findall(r".*\bignor(?:e|es|ed)\b.*", search.stdout + search.stderr)
    assert not ignored, f"the demo passes no option the tool then ignores: {ignored}"

    (summary,) = optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == int(args[args.index("--trials") + 1]), "every grid point trained to the end"
    print(f"demo search: {seconds:.0f} s, best validation accuracy {study.best_value:.3f} "
          f"({study.best_params}), all: {sorted(round(t.value, 3) for t in trials)}")
    assert study.best_value >= 0.6, f"the best trial did not learn: {study.best_value:.3f}"

    # the report as `make demo` runs it: a process of its own in the same folder, on MLflow's default store. Not in
    # this process: MLflow keeps one store per URI string, and SQLite opens the relative `sqlite:///mlflow.db`
    # against the working folder of the moment, so a later test in another folder would write into this one's file
    report = subprocess.run([*cli, "report"], cwd=tmp_path, env={**env, "COLUMNS": "120"}, capture_output=True,
                            text=True, timeout=300)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    assert not re.findall(r".*\bignor(?:e|es|ed)\b.*", report.stdout + report.stderr)
    lines = [line for line in report.stdout.splitlines() if line.strip()]
    assert lines[0].startswith("allconv search studies"), lines[:3]
    assert summary.study_name in lines[1]
    (fill,) = [line for line in lines if "Table 3" in line and "allconv reproduce" in line]
    assert fill.startswith("note: Table 3 is empty")
