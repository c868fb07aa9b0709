"""Checks the MLflow runs that `allconv train` left in a mounted folder (scripts/docker-test.sh, step 4).

Runs in a container of the project image with the folder on /work, reading MLflow's local store there
(``sqlite:///mlflow.db`` + ``mlruns/``) as `mlflow ui` would. Prints one line per run; exits 1 when the runs are not
the expected ones.

usage: python check_run.py STATUS [STATUS ...]   (one MLflow run status per expected run, in start order)
"""

from __future__ import annotations

import sys

from mlflow import MlflowClient


def main(expected: list[str]) -> int:
    mlc = MlflowClient()
    runs = sorted((r for e in mlc.search_experiments() for r in mlc.search_runs([e.experiment_id])),
                  key=lambda r: r.info.start_time)
    problems = []
    for r in runs:
        checkpoints = sorted(a.path for a in mlc.list_artifacts(r.info.run_id, "checkpoints"))
        print(f"run {r.info.run_id}: {r.info.status}, {r.data.tags.get('allconv.epochs_completed')} epoch(s), "
              f"test accuracy {r.data.metrics.get('test_accuracy')}, artifacts {checkpoints}", flush=True)
        if "checkpoints/last.pt" not in checkpoints:
            problems.append(f"run {r.info.run_id} has no checkpoints/last.pt")
        if r.info.status == "FINISHED" and "test_accuracy" not in r.data.metrics:
            problems.append(f"finished run {r.info.run_id} has no test_accuracy")
    statuses = [r.info.status for r in runs]
    if statuses != expected:
        problems.append(f"runs {statuses}, expected {expected}")
    for p in problems:
        print(f"FAIL {p}", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
