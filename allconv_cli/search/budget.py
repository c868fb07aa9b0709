"""``--trials N`` means N counted trials, with any number of workers and hosts: which trials count, and which must
not run.

A trial counts once it is finished (complete, pruned or failed), except a trial that was never trained (a repeat of
another trial's values, a user error, a surplus trial: :data:`TrialAttr.SKIP_MARKS`), a failed trial that is or will
be retried (worker lost, interrupted, a store fault: its retry counts instead), and a second retry of the same trial.
Running and waiting trials hold places. Workers ask for a trial only while places are free; hosts that race for the
last place are settled after the fact by trial number (unique in a study): a trial created after N counted ones is
surplus and never trained. No lock is needed. Why: docs/design.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

from allconv_cli.tracking.schema import TrialAttr

INTERRUPTED = "interrupted"  # the reason of a trial stopped by Ctrl-C or a stop signal: re-queued on the next start
STORE_FAULT = "store unavailable"  # the reason's start for a trial a store outage stopped: re-queued at once


def retry_history(t: FrozenTrial) -> list[int]:
    """The trials this one retries, oldest first (Optuna's ``RetryHeartbeatStaleTrialCallback`` records them)."""
    return list(t.system_attrs.get("retry_history", ()))


def skipped(t: FrozenTrial) -> bool:
    """Never trained: a repeat, a user error or a surplus trial."""
    return any(t.user_attrs.get(mark, False) is not False for mark in TrialAttr.SKIP_MARKS)  # duplicate_of may be 0


def retryable(t: FrozenTrial) -> bool:
    """A failed trial that was stopped, not failed by its own training: it is re-queued and does not count."""
    reason = str(t.user_attrs.get(TrialAttr.REASON, ""))
    return t.state == TrialState.FAIL and (reason == INTERRUPTED or reason.startswith(STORE_FAULT))


@dataclass(frozen=True)
class Ledger:
    """What the study's trials say about each other: retried ones, and retries that repeat an earlier retry."""

    retried: frozenset[int]
    extra_retries: frozenset[int]  # two processes re-queued the same trial at once: all but the first

    @classmethod
    def of(cls, trials: Sequence[FrozenTrial]) -> Ledger:
        retried, first, extra = set(), set(), set()
        for t in sorted(trials, key=lambda t: t.number):
            history = retry_history(t)
            retried.update(history)
            if history and history[-1] in first:
                extra.add(t.number)
            elif history:
                first.add(history[-1])
        return cls(frozenset(retried), frozenset(extra))

    def holds_a_place(self, t: FrozenTrial) -> bool:
        """Trained (or being trained, or waiting to be) for the study: its values are taken."""
        return not skipped(t) and t.number not in self.extra_retries

    def counts(self, t: FrozenTrial) -> bool:
        """Takes one of the study's ``--trials`` places."""
        if not self.holds_a_place(t):
            return False
        return not (t.state == TrialState.FAIL and (t.number in self.retried or retryable(t)))


@dataclass
class Counts:
    finished: int = 0  # complete + pruned + failed, counted trials only
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


_FIELD = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
          TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}


def count_trials(trials: Sequence[FrozenTrial]) -> Counts:
    ledger = Ledger.of(trials)
    c = Counts()
    for t in trials:
        if not ledger.counts(t):
            continue
        setattr(c, _FIELD[t.state], getattr(c, _FIELD[t.state]) + 1)
        if t.state == TrialState.COMPLETE and t.value is not None and (c.best_value is None or t.value > c.best_value):
            c.best_value, c.best_number = t.value, t.number
    c.finished = c.complete + c.pruned + c.failed
    return c


def surplus_reason(trials: Sequence[FrozenTrial], number: int, target: int) -> str:
    """Why the just-asked trial ``number`` must not run (empty: it may): a second retry of one trial, or the study
    already had ``target`` counted trials when it was created (hosts asked for the last place at once)."""
    ledger = Ledger.of(trials)
    if number in ledger.extra_retries:
        return "surplus: a duplicate retry (another process re-queued the same trial)"
    mine = next(t for t in trials if t.number == number)
    if not retry_history(mine):
        ahead = sum(1 for t in trials if t.number < number and ledger.counts(t))
        if ahead >= target:
            return f"surplus: the study already had {ahead} trials when this one was created"
    return ""
