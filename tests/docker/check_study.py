"""Checks the compose stack's study after `make docker-test` ran it (scripts/docker-test.sh).

Runs in a container of the project image on the stack's network, as a client would: Optuna through
``ALLCONV_STORAGE`` (PostgreSQL), MLflow through ``MLFLOW_TRACKING_URI`` (the server, which also serves the artifacts).
Uses only Optuna's and MLflow's public APIs, so it checks what a user would see. Prints one line per check and exits 1
when any failed.

usage: python check_study.py STUDY_NAME EXPECTED_TRIALS [EXPERIMENT]   the finished study
       python check_study.py --training STUDY_NAME    prints how many running trials have reported an epoch
       python check_study.py --interrupted STUDY_NAME  a stopped worker's trial is failed as interrupted (re-queued
                                                      when a worker starts again)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
SURPLUS = "allconv.surplus"  # a trial created past the target by a racing worker, told FAIL before it trained


def main(study_name: str, expected: int, experiment: str = "allconv") -> int:
    failures: list[str] = []
    checked = 0

    def check(ok: bool, what: str) -> None:
        nonlocal checked
        checked += 1
        print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            failures.append(what)

    study = optuna.load_study(study_name=study_name, storage=os.environ["ALLCONV_STORAGE"])
    trials = study.get_trials(deepcopy=False)
    counted = [t for t in trials if not t.user_attrs.get(SURPLUS)]
    states = sorted({t.state.name for t in counted})
    check(len(counted) == expected and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in counted),
          f"{expected} trials finished in Optuna: {len(counted)} counted ({', '.join(states)}), "
          f"{len(trials) - len(counted)} surplus")
    workers = {t.user_attrs.get("worker") for t in counted}
    check(len(workers) > 1, f"the trials were shared by the workers: {len(workers)} worker(s) ran them")
    configs: dict[str, list[int]] = {}
    for t in counted:
        configs.setdefault(json.dumps(t.params, sort_keys=True), []).append(t.number)
    check(len(configs) == len(counted), f"{len(counted)} distinct configurations sampled: {len(configs)} distinct "
          f"(trials with the same parameters: {[n for n in configs.values() if len(n) > 1]})")

    mlc = MlflowClient()
    exp = mlc.get_experiment_by_name(experiment)
    runs = mlc.search_runs([exp.experiment_id]) if exp else []
    parents = [r for r in runs if r.data.tags.get("allconv.role") == "study"
               and r.data.tags.get("allconv.study_name") == study_name]
    check(len(parents) == 1, f"1 parent run for the study in MLflow: {len(parents)}")
    parent_id = parents[0].info.run_id if parents else None
    children = [r for r in runs if parent_id and r.data.tags.get("mlflow.parentRunId") == parent_id]
    numbers = sorted(int(r.data.tags.get("allconv.trial_number", -1)) for r in children)
    check(numbers == sorted(t.number for t in counted),
          f"{expected} child runs, one per trial: trial numbers {numbers}")
    check(all(r.info.status == "FINISHED" for r in children),
          f"child runs finished: {sorted({r.info.status for r in children})}")
    check(all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in children),
          "artifacts are stored by the server (mlflow-artifacts: URIs)")

    downloaded = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in children:
            files = [f.path for f in mlc.list_artifacts(r.info.run_id, "checkpoints")]
            for path in files:
                local = Path(mlc.download_artifacts(r.info.run_id, path, tmp))
                downloaded += local.is_file() and local.stat().st_size > 0
            if not files:
                print(f"     run {r.info.run_id} has no checkpoints/ artifact", flush=True)
    check(bool(children) and downloaded >= len(children),
          f"checkpoints downloaded through the server: {downloaded} files from {len(children)} runs")

    print(f"study checks: {checked - len(failures)} of {checked} hold")
    return 1 if failures else 0


def training(study_name: str) -> int:
    study = optuna.load_study(study_name=study_name, storage=os.environ["ALLCONV_STORAGE"])
    print(sum(1 for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING and t.intermediate_values))
    return 0


def interrupted(study_name: str) -> int:
    study = optuna.load_study(study_name=study_name, storage=os.environ["ALLCONV_STORAGE"])
    trials = [(t.number, t.state.name, t.user_attrs.get("reason")) for t in study.get_trials(deepcopy=False)]
    ok = any(state == "FAIL" and reason == "interrupted" for _, state, reason in trials) and not any(
        state in ("RUNNING", "COMPLETE") for _, state, _ in trials)
    print(f"{'ok  ' if ok else 'FAIL'} the stopped worker's trial is marked interrupted: {trials}")
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1] == "--training":
        sys.exit(training(sys.argv[2]))
    if sys.argv[1] == "--interrupted":
        sys.exit(interrupted(sys.argv[2]))
    sys.exit(main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:4]))
