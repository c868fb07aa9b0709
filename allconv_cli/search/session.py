"""One study session, the same for ``allconv search`` and for each network of ``allconv reproduce``.

Check the storage URL, load the data (its errors come before a SQLite storage, a study or a parent run exists), open
the storage, create or resume the study, find its MLflow parent run, re-queue interrupted trials, run what is left,
close the parent (also when that ends in an error or Ctrl-C), and log the summary.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from rich.console import Console

from allconv_cli import runtime
from allconv_cli.search.budget import Counts, count_trials, host_lock, requeue_interrupted
from allconv_cli.search.launcher import run_trials
from allconv_cli.search.parent_run import close_parent, ensure_parent_run, experiment_of, open_parent, summarize
from allconv_cli.search.settings import SearchSettings, StudyRun, safe_url
from allconv_cli.search.storage import create_or_load_study, is_local_file, load_study, open_settings_storage
from allconv_cli.search.worker import DataCache, Worker, preload_data


def quiet_libraries() -> None:
    """Silence what would tear the live view: Optuna's warnings about the experimental features we use knowingly
    (heartbeats, retries, the sampler's options), its per-trial INFO log; and MLflow's settings (runtime.configure),
    also when a study runs without the CLI."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # We drive heartbeats ourselves around ask/tell (see worker.Heartbeat), which Optuna warns about on every ask().
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runtime.configure()


@dataclass(frozen=True)
class StudyOutcome:
    """How a session ended. ``status``: done, timeout, interrupted, pending (the remaining trials are running in
    other processes, and ``wait_for_others`` was off), or prepared (``prepare_only``: nothing was trained)."""

    run: StudyRun
    study: optuna.Study
    status: str
    counts: Counts
    ran: bool  # this session ran trials (False: there was nothing left for it)
    summary: dict[str, Any] | None  # what was logged to the parent run (None: no summary for this study)
    trials_seconds: float = 0.0
    summary_seconds: float = 0.0


def run_study(settings: SearchSettings, console: Console, *, summarize_only: bool = False,
              prepare_only: bool = False, data: DataCache | None = None) -> StudyOutcome:
    """Create or resume the study of ``settings`` and run its trials to the target; see :class:`StudyOutcome`.

    ``summarize_only`` runs no trial and creates nothing: it loads the study and logs its summary. ``prepare_only``
    creates what workers share (storage tables, study, MLflow experiment, parent run) and stops there: a cluster runs
    it once before its workers, so they never race to create them. ``data`` lets sessions of one process share the
    loaded dataset.
    """
    quiet_libraries()
    data = data if data is not None else DataCache()
    # The data before a SQLite file is created (a data error leaves no empty optuna.db), but after a server
    # database answered (an unreachable one is reported at once, not after loading the data).
    file_storage = is_local_file(settings.storage_url)
    if not summarize_only and file_storage:
        preload_data(settings, data)
    storage = open_settings_storage(settings)
    if summarize_only:  # only reads: it must not create an empty study under a mistyped name
        study, creator = load_study(settings, storage), True
    else:
        if not file_storage:
            preload_data(settings, data)
        study, creator = create_or_load_study(settings, storage)
    parent = ensure_parent_run(study, settings, creator=creator)
    run = StudyRun(settings, parent, experiment_of(parent, settings.experiment, console))
    if prepare_only:  # the parent waits, not RUNNING, until a worker opens it
        close_parent(parent, "pending", settings)
        return StudyOutcome(run, study, "prepared", count_trials(study.get_trials(deepcopy=False)), False, None)
    started = time.perf_counter()
    status, ran = "done", False
    if not summarize_only:
        status, ran = _run_trials(run, study, storage, console, data)
    trials_done = time.perf_counter()
    summary = None
    if status != "pending" and settings.objective == "val_accuracy":  # its labels say val accuracy
        summary = summarize(study, run, console)
    return StudyOutcome(run, study, status, count_trials(study.get_trials(deepcopy=False)), ran, summary,
                        trials_done - started, time.perf_counter() - trials_done)


def _run_trials(run: StudyRun, study: optuna.Study, storage: RDBStorage, console: Console,
                data: DataCache) -> tuple[str, bool]:
    """Re-queue, count, say what happens, run the trials between opening and closing the parent run."""
    settings, target = run.settings, run.settings.trials
    with host_lock(settings):
        requeued = requeue_interrupted(study)
    c = count_trials(study.get_trials(deepcopy=False))
    shown = safe_url(settings.storage_url)
    if c.finished or c.running or c.waiting:
        extra = f"; re-queued interrupted trial(s) {', '.join(map(str, requeued))}" if requeued else ""
        console.print(f"Resuming study {settings.study_name} in {shown}: {c.finished} of {target} trials "
                      f"finished{extra}", highlight=False)
    else:
        console.print(f"Study {settings.study_name} in {shown}, space {settings.space_source}: {target} trials, "
                      f"{settings.pruner} pruner, {settings.workers} worker(s)", highlight=False)
    if c.complete_for(target):
        console.print(f"Study {settings.study_name} is already done ({c.finished} of {target} trials finished): "
                      "nothing to run.", highlight=False)
        return "done", False
    if not settings.wait_for_others and c.waiting == 0 and c.reserved >= target:
        return "pending", False  # every remaining trial is taken by another process
    if settings.timeout is not None:
        run = dataclasses.replace(run, deadline=time.time() + settings.timeout)
    open_parent(run.parent_run_id)
    status = "failed"
    try:
        status = run_trials(run, study, storage, console, data)
        c = count_trials(study.get_trials(deepcopy=False))
        if status not in ("interrupted", "exhausted"):
            status = "done" if c.finished >= target else "timeout" if settings.wait_for_others else "pending"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:  # a user error in a trial, Ctrl-C, a broken pipe: the parent run is never left RUNNING
        close_parent(run.parent_run_id, status, settings)
    return status, True


def run_worker_process(plan_path: str, index: int) -> int:
    """Entry point of ``allconv search --worker PLAN``: one worker process of a ``--workers N`` session."""
    # The launcher forwards Ctrl-C as SIGINT; a launcher started in the background (SIGINT ignored) must not pass
    # that on to its workers, or they could never be interrupted cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    quiet_libraries()
    run = StudyRun.from_json(Path(plan_path).read_text())
    settings = run.settings
    storage = open_settings_storage(settings)
    study = load_study(settings, storage)
    console = Console(width=160)
    status = Worker(run, study, storage, console).run()
    console.print(f"worker {index} (pid {os.getpid()}): {status}")
    return 130 if status == "interrupted" else 0
