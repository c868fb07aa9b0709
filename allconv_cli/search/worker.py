"""One worker: ask Optuna for a trial, train it as a tracked MLflow child run, tell Optuna how it ended; repeat.

A running trial writes a heartbeat every ``heartbeat_interval`` seconds; one silent for ``grace_period`` is failed by
the next worker that looks and re-queued with its params and MLflow run id, so the retry starts from the dead run's
last checkpoint. Each worker loads the dataset once and reuses it for every trial.

The objective is the validation accuracy after the last epoch (``--protocol paper`` of ``allconv reproduce``: the
test accuracy), and each epoch's validation accuracy is reported for pruning. The test set is evaluated once at the
end of a finished trial (by the engine) and only recorded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import time
import warnings
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from rich.console import Console

from allconv_cli.config import TrainConfig
from allconv_cli.data import DataConfig, Dataset, load_onto
from allconv_cli.engine import EpochMetrics, Hooks, resolve_device
from allconv_cli.errors import AllconvError
from allconv_cli.search.budget import (
    DUPLICATE_ATTR,
    REASON_INTERRUPTED,
    SURPLUS_ATTR,
    USER_ERROR_ATTR,
    count_trials,
    host_lock,
    state_name,
    surplus_reason,
)
from allconv_cli.search.sampling import repeated_trial
from allconv_cli.search.settings import SearchSettings, StudyRun, first_line
from allconv_cli.search.storage import UID_ATTR
from allconv_cli.search.view import SearchView
from allconv_cli.tracked_run import run_tracked
from allconv_cli.tracking import store
from allconv_cli.tracking.store import TAG


class DataCache:
    """The dataset of the last config, on its device: loaded once per process, reused by every trial that needs it."""

    def __init__(self) -> None:
        self.key: tuple[DataConfig, Any] | None = None
        self.data: Dataset | None = None
        self.checked: set[DataConfig] = set()

    def get(self, cfg: TrainConfig) -> Dataset:
        key = (cfg.data_config(), resolve_device(cfg.device))
        if key != self.key or self.data is None:
            self.data = None  # free the old one first
            self.data = load_onto(key[0], key[1])
            self.key = key
            self.checked.add(key[0])
        return self.data

    def check(self, cfg: TrainConfig) -> None:
        """Load ``cfg``'s data once on the CPU and drop it: data errors surface, the ZCA fit lands in its disk cache
        (so worker processes do not all fit it at once), and no device memory stays taken."""
        data_cfg = cfg.data_config()
        if data_cfg not in self.checked:
            load_onto(data_cfg, "cpu")
            self.checked.add(data_cfg)


def preload_data(settings: SearchSettings, cache: DataCache) -> None:
    """Load the data before the study is touched: a data error (no CIFAR there, --val-size too large) is reported
    before a study or a parent run exists. In-process trials (one worker) keep it; worker processes load their own."""
    if settings.space().varies_data:
        return
    cfg = TrainConfig(**settings.base_config)
    if settings.workers <= 1:
        cache.get(cfg)
    else:
        cache.check(cfg)


class Heartbeat:
    """Records the trial's heartbeat now and every ``interval`` s, from a thread (as Optuna's optimize() does)."""

    def __init__(self, storage: RDBStorage, trial_id: int, interval: int) -> None:
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{trial_id}")

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a busy database: the next beat will do
                self.storage.record_heartbeat(self.trial_id)

    def __enter__(self) -> Heartbeat:
        with contextlib.suppress(Exception):
            self.storage.record_heartbeat(self.trial_id)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


class TrialHooks(Hooks):
    """Report each epoch's validation accuracy to Optuna and stop the run when the pruner says so."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.starts = 0  # > 1: a restart after a collapse, whose epochs Optuna already holds from the dead attempt

    def on_start(self, cfg: TrainConfig, model: Any, start_epoch: int) -> None:
        self.starts += 1

    def on_epoch_end(self, metrics: EpochMetrics) -> None:
        if metrics.val_accuracy is not None and self.starts <= 1:
            self.trial.report(metrics.val_accuracy, metrics.epoch)

    def should_stop(self, metrics: EpochMetrics) -> str | None:
        # a restart is not judged on the dead attempt's reports (Optuna keeps the first value of each step)
        if metrics.val_accuracy is not None and self.starts <= 1 and self.trial.should_prune():
            return "pruned"
        return None


MAX_REPEATS = 20  # draws in a row that repeat tried values, after which a worker stops: the space is used up


class Worker:
    """One trial at a time until the study holds ``settings.trials`` finished trials (or the deadline passes)."""

    def __init__(self, run: StudyRun, study: optuna.Study, storage: RDBStorage, console: Console,
                 view: SearchView | None = None, data: DataCache | None = None) -> None:
        self.study_run = run
        self.settings = run.settings
        self.study = study
        self.storage = storage
        self.console = console
        self.view = view
        self.space = self.settings.space()
        self.base = dict(self.settings.base_config)
        self.data = data if data is not None else DataCache()
        self.poll = max(0.5, min(2.0, self.settings.heartbeat_interval / 2))
        self.who = f"{socket.gethostname()}:{os.getpid()}"

    def run(self) -> str:
        """Returns ``done``, ``timeout``, ``interrupted``, ``busy`` (``wait_for_others=False``, all trials taken) or
        ``exhausted`` (the sampler only proposes values that were tried already)."""
        deadline = self.study_run.deadline
        try:
            if not self.space.varies_data:
                self.data.get(TrainConfig(**self.base))  # data errors surface before any trial is created
            waited, repeats = False, 0
            while True:
                if deadline is not None and time.time() >= deadline:
                    return "timeout"
                optuna.storages.fail_stale_trials(self.study)
                trial = self._next_trial()
                if trial == "done":
                    return "done"
                if trial is None:
                    if not self.settings.wait_for_others:
                        return "busy"
                    if not waited and self.view is not None:
                        self.console.print("waiting for trials still running elsewhere (a lost worker's trial is "
                                           f"retried {self.settings.grace_period} s after its last heartbeat)")
                    waited = True
                    time.sleep(self.poll)
                    continue
                waited = False
                status = self._run_trial(trial)
                if self.view is not None:
                    self.view.update(self.study.get_trials(deepcopy=False))
                if status == "interrupted":
                    return "interrupted"
                repeats = repeats + 1 if status == "duplicate" else 0
                if repeats >= MAX_REPEATS:
                    self.console.print(f"The sampler proposed {repeats} tried configurations in a row: the space has "
                                       "(almost) no untried ones left; stopping.", highlight=False)
                    return "exhausted"
        except KeyboardInterrupt:
            return "interrupted"

    def _next_trial(self) -> optuna.Trial | str | None:
        target = self.settings.trials
        with host_lock(self.settings):
            c = count_trials(self.study.get_trials(deepcopy=False))
            if c.waiting == 0 and c.reserved >= target:
                return "done" if c.running == 0 else None
            with warnings.catch_warnings():  # "heartbeat is meant for optimize()": we beat ourselves
                warnings.simplefilter("ignore", UserWarning)
                trial = self.study.ask()
            with contextlib.suppress(Exception):
                self.storage.record_heartbeat(trial._trial_id)  # a RUNNING trial always has a heartbeat row
        reason = surplus_reason(self.study.get_trials(deepcopy=False), trial.number, target)
        if reason:
            trial.set_user_attr(SURPLUS_ATTR, True)
            trial.set_user_attr("reason", reason)
            self.study.tell(trial, state=TrialState.FAIL)
            return None
        return trial

    def _run_trial(self, trial: optuna.Trial) -> str:
        """Train one trial as an MLflow child run and tell Optuna how it ended; returns the trial's state."""
        run: dict[str, str] = {}
        try:
            with Heartbeat(self.storage, trial._trial_id, self.settings.heartbeat_interval):
                return self._train_trial(trial, run)
        except KeyboardInterrupt:
            self._finish(trial, run.get("id"), TrialState.FAIL, reason=REASON_INTERRUPTED)
            return "interrupted"
        except AllconvError as exc:  # a user error (data, config): every further trial would fail the same way
            with contextlib.suppress(Exception):  # it takes no place among --trials; the search stops
                trial.set_user_attr(USER_ERROR_ATTR, True)
            self._finish(trial, run.get("id"), TrialState.FAIL, reason=str(exc))
            raise
        except Exception as exc:  # this trial's problem (e.g. out of memory): record it, the study goes on
            reason = f"{type(exc).__name__}: {first_line(exc)}"
            self._finish(trial, run.get("id"), TrialState.FAIL, reason=reason)
            self.console.print(f"trial {trial.number} failed: {reason}", highlight=False)
            return "failed"

    def _train_trial(self, trial: optuna.Trial, run: dict[str, str]) -> str:
        frozen = next(t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)
        history = list(frozen.system_attrs.get("retry_history", ()))
        retry_of = history[0] if history else None
        previous_run = frozen.user_attrs.get("mlflow_run_id") if history else None
        trial.set_user_attr("worker", self.who)
        if history:
            trial.set_user_attr("retry_of", retry_of)
            trial.set_user_attr("reason", "")
        values = self.space.sample(trial, self.base)
        repeated = repeated_trial(self.study, trial)
        if repeated is not None:  # another trial has (or is training) these values: never train them twice
            trial.set_user_attr(DUPLICATE_ATTR, repeated)
            trial.set_user_attr("reason", f"repeats trial {repeated}'s values: not trained, not counted")
            self.study.tell(trial, state=TrialState.FAIL)
            return "duplicate"
        cfg = TrainConfig(**{**self.base, **values})
        data = self.data.get(cfg)
        tags = {
            f"{TAG}role": "trial",
            f"{TAG}study_name": self.settings.study_name,
            f"{TAG}study_uid": self.study.user_attrs.get(UID_ATTR, ""),
            f"{TAG}trial_number": str(trial.number),
            f"{TAG}trial_state": "running",
            f"{TAG}sampled": json.dumps(trial.params),
            f"{TAG}worker": self.who,
            **self.settings.run_tags,
        }
        if retry_of is not None:
            tags[f"{TAG}retry_of"] = str(retry_of)

        def created(run_id: str) -> None:
            if run.get("id"):  # the attempt before collapsed: run_tracked restarts the trial as a new run
                store.try_set_tags(run["id"], {f"{TAG}trial_state": "restarted"})
            elif previous_run:
                _close_lost_run(previous_run, run_id, trial.number)
            run["id"] = run_id
            trial.set_user_attr("mlflow_run_id", run_id)

        if self.view is not None:
            self.view.start_trial(trial.number, cfg.epochs)
        hooks: list[Hooks] = [TrialHooks(trial)] + ([self.view] if self.view is not None else [])
        outcome = run_tracked(
            cfg, experiment=self.study_run.experiment, run_name=f"trial-{trial.number:03d}",
            parent_run_id=self.study_run.parent_run_id, tags=tags, checkpoint_from_run=previous_run,
            restart_on_bad_checkpoint=True, hooks=hooks, data=data, log_model=False, on_run_created=created,
        )
        if outcome.resumed_from_epoch:
            store.try_set_tags(outcome.run_id, {f"{TAG}resumed_from_epoch": str(outcome.resumed_from_epoch)})
        result = outcome.result
        if result.status == "finished":
            test_objective = self.settings.objective == "test_accuracy"
            value = result.test_accuracy if test_objective else result.val_accuracy
            if value is None or not math.isfinite(value):
                what = "test" if test_objective else "validation"
                return self._finish(trial, outcome.run_id, TrialState.FAIL, reason=f"no {what} accuracy")
            return self._finish(trial, outcome.run_id, TrialState.COMPLETE, value=value)
        if result.status == "pruned":
            reason = f"pruned by the {self.settings.pruner} pruner after epoch {result.epochs_completed}"
            return self._finish(trial, outcome.run_id, TrialState.PRUNED, reason=reason)
        if result.status in ("diverged", "collapsed"):  # NaN loss, or dead ReLUs (constant output)
            # pruned, not failed: TPE then learns that this region is bad instead of ignoring the trial
            reason = f"{result.status}: {result.reason}"
            return self._finish(trial, outcome.run_id, TrialState.PRUNED, reason=reason)
        if result.status == "interrupted":
            self._finish(trial, outcome.run_id, TrialState.FAIL, reason=REASON_INTERRUPTED)
            return "interrupted"
        return self._finish(trial, outcome.run_id, TrialState.FAIL, reason=f"{result.status}: {result.reason}")

    def _finish(self, trial: optuna.Trial, run_id: str | None, state: TrialState, *, value: float | None = None,
                reason: str = "") -> str:
        """Tell Optuna, then mirror the state on the MLflow run. A trial already failed by another worker (its
        heartbeat went stale while it still ran) keeps that state; its retry owns the result."""
        with contextlib.suppress(Exception):
            trial.set_user_attr("reason", reason)
        with contextlib.suppress(Exception):
            if state == TrialState.COMPLETE:
                self.study.tell(trial, value, skip_if_finished=True)
            else:
                self.study.tell(trial, state=state, skip_if_finished=True)
        stored = next(t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)
        if stored.state.is_finished() and stored.state != state:
            state = stored.state
            reason = "declared lost (no heartbeat within the grace period) while still running; a retry replaces it"
        elif not stored.state.is_finished():  # the storage refused the result: it stays RUNNING until it goes stale
            state, reason = TrialState.FAIL, "its result could not be written to the Optuna storage"
        name = state_name(state)
        tags = {f"{TAG}trial_state": name}
        if reason and reason != REASON_INTERRUPTED:  # the engine's own reason says more (which epoch)
            tags[f"{TAG}reason"] = reason
        store.try_set_tags(run_id, tags)
        return name


def _close_lost_run(lost_run: str, new_run: str, trial_number: int) -> None:
    """The run of a dead worker is still RUNNING in MLflow: mark it failed and point to its retry."""
    with contextlib.suppress(Exception):
        run = store.get_run(lost_run)
        if run.info.status == "RUNNING":
            store.mark_failed(lost_run, f"worker lost; retried as trial {trial_number} in run {new_run}")
            store.try_set_tags(lost_run, {f"{TAG}trial_state": "failed"})
        store.try_set_tags(lost_run, {f"{TAG}retried_as": new_run})
