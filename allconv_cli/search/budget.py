"""Counting a study's trials against ``--trials``, exactly, with any number of workers and hosts.

``--trials`` is the number of *finished* trials (complete + pruned + failed), where a failed trial that was re-queued
(worker lost, or Ctrl-C) does not count, its retry does; nor do trials that were never trained (a repeat of another
trial's values, a user error). Running and waiting trials are reserved budget: a worker only asks for a new trial
while finished + running + waiting < target, under a per-host lock. Hosts racing for the last slot are settled after
the fact: the trial created after the target is marked surplus and not counted.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import random
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from allconv_cli.search.settings import SearchSettings
from allconv_cli.tracking.store import TAG

SURPLUS_ATTR = f"{TAG}surplus"
DUPLICATE_ATTR = f"{TAG}duplicate_of"  # the number of the trial whose sampled values this one repeated
USER_ERROR_ATTR = f"{TAG}user_error"  # failed on the user's input (AllconvError): the search stopped
REASON_INTERRUPTED = "interrupted"


def state_name(state: TrialState) -> str:
    """How a trial's state reads in the terminal and in the ``allconv.trial_state`` tag."""
    return {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}.get(
        state, state.name.lower())


@dataclass
class Counts:
    finished: int = 0  # complete + pruned + failed, not counting failed trials that were re-queued
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0
    best_value: float | None = None
    best_number: int | None = None

    @property
    def reserved(self) -> int:
        return self.finished + self.running + self.waiting

    def complete_for(self, target: int) -> bool:
        """Nothing left to run here or elsewhere."""
        return self.finished >= target and not self.running and not self.waiting


def superseded(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that were re-queued (their retry carries them in ``retry_history``)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def duplicate_retries(trials: Sequence[FrozenTrial]) -> set[int]:
    """Retries of a trial that already has a retry with a lower number (two hosts re-queued the same Ctrl-C'd trial
    at once): only the first one counts, a worker that pops a duplicate marks it surplus."""
    first: dict[int, int] = {}
    dups = set()
    for t in sorted(trials, key=lambda t: t.number):
        history = t.system_attrs.get("retry_history")
        if history:
            if history[-1] in first:
                dups.add(t.number)
            else:
                first[history[-1]] = t.number
    return dups


@dataclass(frozen=True)
class Excluded:
    """The trials that do not count, or not by themselves: re-queued failures and duplicate retries."""

    superseded: set[int]
    duplicates: set[int]

    @classmethod
    def of(cls, trials: Sequence[FrozenTrial]) -> Excluded:
        return cls(superseded(trials), duplicate_retries(trials))

    def counts(self, t: FrozenTrial) -> bool:
        """Does ``t`` take a place among the study's ``--trials``? Not when surplus, a duplicate retry, or a failed
        trial whose retry takes its place."""
        if not takes_a_place(t, self):
            return False
        return not (t.state == TrialState.FAIL and t.number in self.superseded)


def takes_a_place(t: FrozenTrial, excluded: Excluded) -> bool:
    """Was ``t`` (or is it being) trained for the study, its values taken? Not a surplus trial, a duplicate retry, a
    repeat of another trial's values, or a trial stopped by a user error."""
    attrs = t.user_attrs
    return not (attrs.get(SURPLUS_ATTR) or DUPLICATE_ATTR in attrs or attrs.get(USER_ERROR_ATTR)
                or t.number in excluded.duplicates)


def count_trials(trials: Sequence[FrozenTrial]) -> Counts:
    excluded = Excluded.of(trials)
    c = Counts()
    for t in trials:
        if not excluded.counts(t):
            continue
        if t.state == TrialState.COMPLETE:
            c.complete += 1
            if t.value is not None and (c.best_value is None or t.value > c.best_value):
                c.best_value, c.best_number = t.value, t.number
        elif t.state == TrialState.PRUNED:
            c.pruned += 1
        elif t.state == TrialState.FAIL:
            c.failed += 1
        elif t.state == TrialState.RUNNING:
            c.running += 1
        elif t.state == TrialState.WAITING:
            c.waiting += 1
    c.finished = c.complete + c.pruned + c.failed
    return c


def surplus_reason(trials: Sequence[FrozenTrial], number: int, target: int) -> str:
    """Why the just-created trial ``number`` must not run (empty: it may): a duplicate retry, or another host
    took the last place at the same moment."""
    excluded = Excluded.of(trials)
    if number in excluded.duplicates:
        return "surplus: a duplicate retry (another process re-queued the same trial)"
    mine = next(t for t in trials if t.number == number)
    if not mine.system_attrs.get("retry_history"):
        ahead = sum(1 for t in trials if t.number < number and excluded.counts(t))
        if ahead >= target:
            return f"surplus: the study already had {ahead} trials when this one was created"
    return ""


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Re-queue trials failed by Ctrl-C (as the heartbeat callback does for lost workers): same params, same MLflow
    run id to resume from, and ``retry_history`` so the failed one stops counting."""
    trials = study.get_trials(deepcopy=False)
    gone = superseded(trials)
    requeued = []
    for t in trials:
        if t.state != TrialState.FAIL or t.user_attrs.get("reason") != REASON_INTERRUPTED or t.number in gone:
            continue
        system_attrs = {"failed_trial": t.number, **t.system_attrs}
        system_attrs["retry_history"] = [*t.system_attrs.get("retry_history", ()), t.number]
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=t.params, distributions=t.distributions,
            user_attrs={k: v for k, v in t.user_attrs.items() if k != "reason"}, system_attrs=system_attrs,
            intermediate_values=dict(t.intermediate_values),
        ))
        requeued.append(t.number)
    return requeued


def lock_key(settings: SearchSettings) -> str:
    """One lock per study and temp folder: the processes that share a temp folder are one host's (tests give each
    simulated host its own TMPDIR)."""
    text = f"{settings.storage_url}\0{settings.study_name}\0{tempfile.gettempdir()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def host_lock(settings: SearchSettings) -> Iterator[None]:
    """Serialise 'count, then ask' among the workers of this host, which makes the trial total exact.

    On Linux the lock is a socket name in the abstract namespace: no file, and the kernel frees it when its
    process ends, however it ends. Elsewhere a lock file with flock; without either (Windows), no lock: the
    surplus check after asking still keeps the count right.
    """
    key = lock_key(settings)
    if sys.platform.startswith("linux"):
        with _abstract_socket_lock(f"allconv-search-{key}"):
            yield
        return
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(tempfile.gettempdir()) / f"allconv-search-{key}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _abstract_socket_lock(name: str) -> Iterator[None]:
    """Held while this process has a Unix socket bound to ``\\0name``; others poll until they can bind it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        delay = 0.005
        while True:
            try:
                sock.bind(b"\0" + name.encode())
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 0.1)
        yield
    finally:
        sock.close()

