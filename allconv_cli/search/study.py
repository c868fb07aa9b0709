"""One study session, the same for ``allconv search``, each network of ``allconv reproduce`` and each worker process.

:func:`run_study` opens the storage and the study, finds its MLflow parent run and runs trials until the study holds
``--trials`` counted trials. A :class:`Worker` runs one trial at a time through Optuna's ``study.optimize`` (it asks,
a re-queued trial first, beats the trial's heartbeat and fails lost workers' trials); the :class:`Objective` samples,
skips repeats and surplus trials, and trains the config as an MLflow child run. The trial's path:
``Worker.run -> study.optimize -> Objective.__call__ -> tracking.run.run_tracked -> engine.train``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from allconv_cli import runtime
from allconv_cli.config import TrainConfig
from allconv_cli.data import DataCache, Dataset
from allconv_cli.engine import EpochMetrics, Hooks, TrainResult, resolve_device
from allconv_cli.errors import AllconvError, StoreUnavailable, first_line
from allconv_cli.search import budget, launcher, parent, storage
from allconv_cli.search.distinct import repeated
from allconv_cli.search.plan import SearchSettings, StudyRun
from allconv_cli.search.view import SearchView
from allconv_cli.stores import safe_url
from allconv_cli.tracking import store
from allconv_cli.tracking.run import run_tracked
from allconv_cli.tracking.schema import RESTARTED, Role, Status, StudyAttr, StudyState, Tag, TrialAttr, trial_state_name

MAX_REPEATS = 20  # draws in a row that repeat tried values, after which a worker stops: the space is used up


class Skipped(Exception):
    """The trial is never trained (a repeat, a surplus trial): FAIL in Optuna, not counted; the worker goes on."""


class TrialFailed(Exception):
    """The trial's own training failed (out of memory, no objective value): FAIL and counted; the study goes on."""


@dataclass(frozen=True)
class StudyOutcome:
    """How a session ended."""

    run: StudyRun
    study: optuna.Study
    state: StudyState
    counts: budget.Counts
    ran: bool  # this session ran trials (False: there was nothing left for it)
    summary: dict[str, Any] | None  # what was logged to the parent run (None: no summary for this study)
    trials_seconds: float = 0.0
    summary_seconds: float = 0.0


def run_study(settings: SearchSettings, console: Console, *, summarize_only: bool = False,
              prepare_only: bool = False, data: DataCache | None = None) -> StudyOutcome:
    """Create or resume the study of ``settings`` and run its trials to the target.

    ``prepare_only`` creates the storage, the study, the MLflow experiment and parent run, and trains nothing (a
    cluster's one-off job before its workers). ``summarize_only`` runs no trial and creates nothing: it logs the
    summary of an existing study. ``data`` lets the sessions of one process share the loaded dataset.
    """
    runtime.quiet_optuna()
    runtime.configure()
    data = data if data is not None else DataCache()
    trains = not (summarize_only or prepare_only)
    view = SearchView(console, settings, plain=None if trains else True)
    with view:  # stages, the estimate and the trials as they happen
        # the data before a SQLite file is created (a data error leaves no empty optuna.db), after a server
        # database answered (an unreachable one is reported at once, not after loading the data)
        file_storage = storage.is_local_file(settings.storage_url)
        if trains and file_storage:
            preload_data(settings, data, view.stage)
        if trains:
            view.stage("opening the Optuna study and its MLflow parent run")
        rdb = storage.open_storage(settings)
        if summarize_only:  # only reads: it must not create an empty study under a mistyped name
            study, creator = storage.load_study(settings, rdb), True
        else:
            if trains and not file_storage:
                preload_data(settings, data, view.stage)
            study, creator = storage.create_or_load_study(settings, rdb)
        parent_id = parent.ensure_parent_run(study, settings, creator=creator)
        run = StudyRun(settings, parent_id, parent.experiment_of(parent_id, settings.experiment, console))
        started = time.perf_counter()
        state, ran = StudyState.PENDING, False
        if prepare_only:  # not left RUNNING if no worker ever starts; a rerun while workers train changes nothing
            if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                parent.set_state(parent_id, StudyState.PENDING, settings)
            console.print(f"Prepared study {settings.study_name} in {safe_url(settings.storage_url)} (MLflow parent "
                          f"run {parent_id}); start the workers with the same command without --prepare",
                          highlight=False)
        elif not summarize_only:
            state, ran = _run_trials(run, study, console, data, view)
    trials_done = time.perf_counter()
    summary = None
    summarized = summarize_only or (trains and state != StudyState.PENDING)
    if summarized and settings.objective == "val_accuracy":  # its labels say val accuracy
        summary = parent.summarize(study, run, console, view.estimate_line)
    return StudyOutcome(run, study, state, budget.count_trials(study.get_trials(deepcopy=False)), ran, summary,
                        trials_done - started, time.perf_counter() - trials_done)


def _run_trials(run: StudyRun, study: optuna.Study, console: Console, data: DataCache,
                view: SearchView) -> tuple[StudyState, bool]:
    """Re-queue stopped trials, say what happens, run the trials between opening and closing the parent run."""
    settings, target = run.settings, run.settings.trials
    c = view.attach(study, storage.requeue_stopped(study))
    if c.complete_for(target):
        console.print(f"Study {settings.study_name} is already done ({c.finished} of {target} trials finished): "
                      "nothing to run.", highlight=False)
        return StudyState.COMPLETE, False
    if not settings.wait_for_others and c.waiting == 0 and c.reserved >= target:
        return StudyState.PENDING, False  # every remaining trial is taken by another process
    parent.note_estimate(study, run, view.measure(data))  # before the first trial, on the parent run's page too
    if settings.timeout is not None:
        run = dataclasses.replace(run, deadline=time.time() + settings.timeout)
    parent.set_state(run.parent_run_id, StudyState.RUNNING, settings)
    state = StudyState.FAILED
    try:
        state = _run_workers(run, study, console, data, view)
        if state not in (StudyState.INTERRUPTED, StudyState.EXHAUSTED):
            done = budget.count_trials(study.get_trials(deepcopy=False)).finished >= target
            state = StudyState.COMPLETE if done else StudyState.TIMEOUT if settings.wait_for_others \
                else StudyState.PENDING
    except KeyboardInterrupt:
        state = StudyState.INTERRUPTED
        raise
    finally:  # a user error in a trial, Ctrl-C, a broken pipe: the parent run is never left RUNNING
        parent.set_state(run.parent_run_id, state, settings)
    return state, True


def _run_workers(run: StudyRun, study: optuna.Study, console: Console, data: DataCache,
                 view: SearchView) -> StudyState:
    """Trials in this process (with their progress inside each epoch), or in ``--workers`` processes."""
    if run.settings.workers <= 1:
        return Worker(run, study, console, view, data).run()
    return launcher.run_processes(run, study, view, console)


def run_worker_process(plan_path: str, index: int) -> int:
    """Entry point of ``allconv search --worker PLAN``: one worker process of a ``--workers N`` session."""
    # The launcher forwards Ctrl-C as SIGINT; a launcher started in the background (SIGINT ignored) must not pass
    # that on to its workers, or they could never be interrupted cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    runtime.quiet_optuna()
    runtime.configure()
    run = StudyRun.from_json(Path(plan_path).read_text())
    study = storage.load_study(run.settings, storage.open_storage(run.settings))
    console = Console(width=160)
    state = Worker(run, study, console).run()
    console.print(f"worker {index} (pid {os.getpid()}): {state}")
    return 130 if state == StudyState.INTERRUPTED else 0


def preload_data(settings: SearchSettings, cache: DataCache, on_stage: Callable[[str], None] | None = None) -> None:
    """Load the data before the study is touched: a data error (no CIFAR there, --val-size too large) is reported
    before a study or a parent run exists. In-process trials (one worker) keep it; worker processes load their own."""
    if settings.space().varies_data:
        return
    cfg = TrainConfig(**settings.base_config)
    if settings.workers <= 1:
        cache.get(cfg.data_config(), resolve_device(cfg.device), on_stage)
    else:
        cache.check(cfg.data_config(), on_stage)


class Worker:
    """One trial at a time until the study holds ``settings.trials`` counted trials (or the deadline passes)."""

    def __init__(self, run: StudyRun, study: optuna.Study, console: Console, view: SearchView | None = None,
                 data: DataCache | None = None) -> None:
        self.run_, self.settings, self.study, self.console, self.view = run, run.settings, study, console, view
        self.data = data if data is not None else DataCache()
        self.objective = Objective(run, study, console, view, self.data)
        self.poll = max(0.5, min(2.0, self.settings.heartbeat_interval / 2))

    def run(self) -> StudyState:
        """COMPLETE, TIMEOUT, INTERRUPTED, PENDING (``wait_for_others=False`` and every place is taken elsewhere)
        or EXHAUSTED (the sampler only proposes values that were tried already)."""
        target, deadline = self.settings.trials, self.run_.deadline
        try:
            if not self.objective.space.varies_data:  # data errors surface before any trial is created
                self.objective.data_for(TrainConfig(**self.objective.base))
            waited, repeats = False, 0
            while deadline is None or time.time() < deadline:
                storage.requeue_stopped(self.study)  # a trial another worker stopped (a cluster's SIGTERM) resumes here
                c = budget.count_trials(self.study.get_trials(deepcopy=False))
                if c.waiting == 0 and c.reserved >= target:  # every place is taken
                    if not c.running:
                        return StudyState.COMPLETE
                    if not self.settings.wait_for_others:
                        return StudyState.PENDING
                    self._wait(announce=not waited)
                    waited = True
                    continue
                waited = False
                repeats = repeats + 1 if self._one_trial() == "duplicate" else 0
                if repeats >= MAX_REPEATS:
                    self.console.print(f"The sampler proposed {repeats} tried configurations in a row: the space has "
                                       "(almost) no untried ones left; stopping.", highlight=False)
                    return StudyState.EXHAUSTED
            return StudyState.TIMEOUT
        except KeyboardInterrupt:
            return StudyState.INTERRUPTED

    def _wait(self, announce: bool) -> None:
        """Trials run elsewhere: look again soon; a lost worker's trial turns stale and is re-queued here."""
        if announce and self.view is not None:
            self.console.print("waiting for trials still running elsewhere (a lost worker's trial is retried "
                               f"{self.settings.grace_period} s after its last heartbeat)", highlight=False)
        time.sleep(self.poll)
        with contextlib.suppress(Exception):  # a store that is briefly away: the next look will do
            optuna.storages.fail_stale_trials(self.study)

    def _one_trial(self) -> str:
        """Run one trial through ``study.optimize``; returns its outcome (a Status value, duplicate, surplus...)."""
        obj = self.objective
        obj.start()
        try:
            self.study.optimize(obj, n_trials=1, catch=(Skipped, TrialFailed), callbacks=[obj.told],
                                gc_after_trial=False)
        except KeyboardInterrupt:
            obj.mirror()
            raise
        except Exception as exc:
            if isinstance(exc, AllconvError) and not isinstance(exc, StoreUnavailable):
                obj.mirror()  # the user's error: the search stops with its one line
                raise
            self._recover(exc)
        finally:
            if self.view is not None:
                self.view.update(self.study.get_trials(deepcopy=False))
        return obj.outcome

    def _recover(self, exc: Exception) -> None:
        """After ``optimize`` raised for a store outage (in the trial or in telling it) or because another worker
        had declared the trial lost: settle the trial so that it counts once, or is retried from its checkpoint."""
        obj = self.objective
        store_fault = storage.is_transient(exc) or isinstance(exc, StoreUnavailable)
        if obj.number is None:  # asking for a trial failed: nothing was created
            if not store_fault:
                raise exc
            time.sleep(self.poll)
            return
        trial = storage.with_retries(obj.stored)
        if trial.state == TrialState.RUNNING and obj.verdict is not None:  # the result never reached the storage
            state, value = obj.verdict
            storage.with_retries(self.study.tell, obj.number, value, state=state, skip_if_finished=True)
            trial = storage.with_retries(obj.stored)
        lost = not store_fault and trial.state.is_finished() and not budget.retryable(trial)
        obj.mirror(trial, "declared lost (no heartbeat within the grace period) while still running; its retry "
                          "replaces it" if lost else None)
        if budget.retryable(trial):  # the loop re-queues it before the next trial
            self.console.print(f"trial {trial.number}: {first_line(exc)}; it resumes from its last checkpoint",
                               highlight=False)
        elif not trial.state.is_finished() and not store_fault:
            raise exc


class Objective(Hooks):
    """What ``study.optimize`` calls for one trial: sample, skip or train, and return the objective value; while the
    trial trains, it reports each epoch's validation accuracy to Optuna and stops the run when the pruner says so."""

    def __init__(self, run: StudyRun, study: optuna.Study, console: Console, view: SearchView | None,
                 data: DataCache) -> None:
        self.run_, self.settings, self.study, self.console, self.view, self.data = \
            run, run.settings, study, console, view, data
        self.space = self.settings.space()
        self.base = dict(self.settings.base_config)
        self.who = f"{socket.gethostname()}:{os.getpid()}"
        self.start()

    def start(self) -> None:
        self.trial: optuna.Trial | None = None  # the trial being run
        self.number: int | None = None
        self.run_id: str | None = None  # its MLflow run (the last attempt's)
        self.outcome = ""  # a Status value, duplicate or surplus
        self.verdict: tuple[TrialState, float | None] | None = None  # what Optuna is to be told
        self.starts = 0  # > 1: a restart after a collapse, whose epochs Optuna already holds from the dead attempt

    def on_start(self, cfg: TrainConfig, model: Any, start_epoch: int) -> None:
        self.starts += 1

    def on_epoch_end(self, metrics: EpochMetrics) -> None:
        if metrics.val_accuracy is not None and self.starts <= 1 and self.trial is not None:
            self.trial.report(metrics.val_accuracy, metrics.epoch)

    def should_stop(self, metrics: EpochMetrics) -> str | None:
        # a restart is not judged on the dead attempt's reports (Optuna keeps the first value of each step)
        pruned = metrics.val_accuracy is not None and self.starts <= 1 and self.trial and self.trial.should_prune()
        return Status.PRUNED if pruned else None

    def data_for(self, cfg: TrainConfig) -> Dataset:
        return self.data.get(cfg.data_config(), resolve_device(cfg.device), self.view.stage if self.view else None)

    def stored(self) -> FrozenTrial:
        return next(t for t in self.study.get_trials(deepcopy=False) if t.number == self.number)

    def note(self, key: str, value: Any) -> None:
        """A user attribute of the running trial, best effort (it explains; the storage may be away)."""
        with contextlib.suppress(Exception):
            if self.trial is not None:
                self.trial.set_user_attr(key, value)

    def __call__(self, trial: optuna.Trial) -> float:
        self.trial, self.number = trial, trial.number
        try:
            return self._run(trial)
        except (Skipped, TrialFailed, optuna.TrialPruned):
            raise
        except KeyboardInterrupt:
            self._stopped(budget.INTERRUPTED, Status.INTERRUPTED)
            raise
        except Exception as exc:
            raise self._classify(exc) from exc

    def _run(self, trial: optuna.Trial) -> float:
        trials = self.study.get_trials(deepcopy=False)
        self._skip_unless(budget.surplus_reason(trials, trial.number, self.settings.trials), TrialAttr.SURPLUS, True)
        frozen = next(t for t in trials if t.number == trial.number)
        history = budget.retry_history(frozen)
        trial.set_user_attr(TrialAttr.WORKER, self.who)
        if history:
            trial.set_user_attr(TrialAttr.RETRY_OF, history[0])
            trial.set_user_attr(TrialAttr.REASON, "")
        values = self.space.sample(trial, self.base)
        other = repeated(self.study.get_trials(deepcopy=False), trial.number)
        if other is not None:
            self._skip_unless(f"repeats trial {other}'s values: not trained, not counted", TrialAttr.DUPLICATE_OF,
                              other)
        previous_run = frozen.user_attrs.get(TrialAttr.MLFLOW_RUN_ID) if history else None
        return self._judge(self._train(trial, TrainConfig(**{**self.base, **values}), history, previous_run))

    def _skip_unless(self, reason: str, mark: str, value: Any) -> None:
        if reason:
            self.note(mark, value)
            self.note(TrialAttr.REASON, reason)
            self.outcome = "duplicate" if mark == TrialAttr.DUPLICATE_OF else "surplus"
            self.verdict = (TrialState.FAIL, None)
            raise Skipped(reason)

    def _stopped(self, reason: str, status: Status) -> None:
        self.note(TrialAttr.REASON, reason)
        self.outcome, self.verdict = status, (TrialState.FAIL, None)

    def _classify(self, exc: Exception) -> Exception:
        """The exception ``optimize`` sees: a store outage (the trial is re-queued, not counted), the user's error
        (the search stops; the trial takes no place), or the trial's own failure (counted; the study goes on)."""
        if isinstance(exc, StoreUnavailable) or storage.is_transient(exc):
            self._stopped(f"{budget.STORE_FAULT}: {first_line(exc)}", Status.INTERRUPTED)
            return exc
        if isinstance(exc, AllconvError):
            self.note(TrialAttr.USER_ERROR, True)
            self._stopped(str(exc), Status.FAILED)
            return exc
        reason = f"{type(exc).__name__}: {first_line(exc)}"
        self._stopped(reason, Status.FAILED)
        self.console.print(f"trial {self.number} failed: {reason}", highlight=False)
        return TrialFailed(reason)

    def _train(self, trial: optuna.Trial, cfg: TrainConfig, history: list[int],
               previous_run: str | None) -> TrainResult:
        data = self.data_for(cfg)
        tags = {Tag.ROLE: Role.TRIAL, Tag.STUDY_NAME: self.settings.study_name,
                Tag.STUDY_UID: self.study.user_attrs.get(StudyAttr.STUDY_UID, ""),
                Tag.TRIAL_NUMBER: str(trial.number), Tag.TRIAL_STATE: "running",
                Tag.SAMPLED: json.dumps(trial.params), Tag.WORKER: self.who, **self.settings.run_tags}
        if history:
            tags[Tag.RETRY_OF] = str(history[0])
        if self.view is not None:
            self.view.start_trial(trial.number, cfg.epochs)
        outcome = run_tracked(
            cfg, experiment=self.run_.experiment, run_name=f"trial-{trial.number:03d}",
            parent_run_id=self.run_.parent_run_id, tags=tags, checkpoint_from_run=previous_run,
            restart_on_bad_checkpoint=True, hooks=[self, *([self.view] if self.view else [])],
            data=data, log_model=False, on_run_created=partial(self._created, trial, previous_run),
        )
        return outcome.result

    def _created(self, trial: optuna.Trial, previous_run: str | None, run_id: str) -> None:
        """A run of this trial exists: record it in Optuna now, so a retry after a lost worker finds its checkpoint."""
        if self.run_id:  # the attempt before collapsed: run_tracked restarts the trial as a new run
            store.try_set_tags(self.run_id, {Tag.TRIAL_STATE: RESTARTED})
        elif previous_run:
            parent.close_lost_run(previous_run, run_id, trial.number)
        self.run_id = run_id
        trial.set_user_attr(TrialAttr.MLFLOW_RUN_ID, run_id)

    def _judge(self, result: TrainResult) -> float:
        """The value to return, or the exception that tells Optuna how the trial ended."""
        status = Status(result.status)
        self.outcome = status
        if status == Status.FINISHED:
            test = self.settings.objective == "test_accuracy"
            value = result.test_accuracy if test else result.val_accuracy
            if value is not None and math.isfinite(value):
                self.verdict = (TrialState.COMPLETE, value)
                return value
            reason = f"no {'test' if test else 'validation'} accuracy"
        elif status == Status.INTERRUPTED:
            self._stopped(budget.INTERRUPTED, status)
            raise KeyboardInterrupt
        elif status == Status.PRUNED:
            reason = f"pruned by the {self.settings.pruner} pruner after epoch {result.epochs_completed}"
        else:
            reason = f"{status}: {result.reason}"
        self.note(TrialAttr.REASON, reason)
        # diverged and collapsed runs are pruned, not failed: TPE then learns that the region is bad
        self.verdict = (TrialState[status.optuna], None)
        if status.optuna == TrialState.PRUNED.name:
            raise optuna.TrialPruned(reason)
        raise TrialFailed(reason)

    def told(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna's callback after it stored the trial's end: mirror it on the trial's MLflow run."""
        self.mirror(trial)

    def mirror(self, trial: FrozenTrial | None = None, reason: str | None = None) -> None:
        """The trial's state (and why) on its MLflow run, best effort."""
        with contextlib.suppress(Exception):
            trial = trial or self.stored()
            tags = {Tag.TRIAL_STATE: trial_state_name(trial.state.name)}
            reason = reason or str(trial.user_attrs.get(TrialAttr.REASON, ""))
            if reason and reason != budget.INTERRUPTED:  # the engine's own reason says more (which epoch)
                tags[Tag.REASON] = reason
            store.try_set_tags(trial.user_attrs.get(TrialAttr.MLFLOW_RUN_ID) or self.run_id, tags)
