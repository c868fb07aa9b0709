"""Samplers that make any number of processes on one study draw distinct configurations, and the check that catches
the rest.

Each trial's random state is seeded from ``(--seed, trial number)``: trial numbers are unique in a study, so
processes that ask at the same instant draw differently, and one process with one seed draws the same trials every
time. A grid hands point ``n`` to trial ``n`` when it is free. Chance can still give two trials the same values (a
small categorical space), so a freshly sampled trial is compared with the others before it is trained; the protocol
is in :func:`judge`. Why: docs/scaling.md.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from allconv_cli.search.budget import Excluded, takes_a_place
from allconv_cli.spaces import SearchSpace
from allconv_cli.tracking.store import TAG

CHECKED_ATTR = f"{TAG}distinct"  # set once a trial's sampled values passed the check: it owns them
WAIT = "wait"
DECISION_TIMEOUT = 30.0  # seconds to wait for another process's verdict on the same values (it may have died)


def trial_seed(seed: int, number: int) -> int:
    """A 32-bit seed for trial ``number`` of a study searched with ``--seed seed``."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class PerTrialSeed(BaseSampler):
    """A sampler rebuilt for each trial from ``build(trial_seed(seed, trial.number))`` and used for that trial only.

    Optuna's samplers keep one random state per process, seeded once: processes started together with one seed
    then propose the same values. TPE and random keep nothing else between trials that the study does not hold
    (their search-space caches are rebuilt from the study's trials), so rebuilding them loses nothing.
    """

    def __init__(self, build: Callable[[int], BaseSampler], seed: int) -> None:
        self.build, self.seed = build, seed
        self.number: int | None = None
        self.current = build(seed)

    def _for(self, trial: FrozenTrial) -> BaseSampler:
        if trial.number != self.number:
            self.number, self.current = trial.number, self.build(trial_seed(self.seed, trial.number))
        return self.current

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.current.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.current.reseed_rng()


class GridPoints(BaseSampler):
    """Every point of a grid once: trial ``n`` takes point ``n mod size`` if no trial holds it, else the next free
    one. Trials numbered at the same instant get distinct points; one process takes them in the grid's order.

    Unlike Optuna's GridSampler, a trial that does not count (a duplicate, a user error, surplus) frees its point,
    and nothing stops the study: the budget does (the target is capped at the grid's size).
    """

    def __init__(self, grid: dict[str, list[Any]]) -> None:
        self.names = list(grid)
        self.points = [dict(zip(self.names, combo, strict=True)) for combo in itertools.product(*grid.values())]
        self.index = {self._key(p): i for i, p in enumerate(self.points)}
        self.chosen: dict[int, int] = {}

    def _key(self, params: dict[str, Any]) -> tuple[Any, ...] | None:
        if not all(n in params for n in self.names):
            return None
        return tuple(params[n] for n in self.names)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.params:  # a retry keeps the params of the trial it repeats
            return
        trials = study.get_trials(deepcopy=False)
        excluded = Excluded.of(trials)
        taken = {self.index.get(self._key(t.params)) for t in trials
                 if t.number != trial.number and takes_a_place(t, excluded)}
        size = len(self.points)
        order = [(trial.number + k) % size for k in range(size)]
        self.chosen[trial.number] = next((i for i in order if i not in taken), order[0])

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        if trial.number not in self.chosen or param_name not in self.names:
            raise ValueError(f"{param_name} is not a parameter of this grid ({', '.join(self.names)})")
        return self.points[self.chosen[trial.number]][param_name]


def _tpe(seed: int) -> BaseSampler:
    # group=True: TPE models each conditional branch (lr.sgd vs lr.adam) on the trials that have it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)


def make_sampler(space: SearchSpace, seed: int) -> BaseSampler:
    """The sampler of ``space``'s kind; every process of a study builds the same one (same ``seed``)."""
    if space.sampler == "grid":
        return GridPoints(space.grid())
    if space.sampler == "random":
        return PerTrialSeed(lambda s: optuna.samplers.RandomSampler(seed=s), seed)
    return PerTrialSeed(_tpe, seed)


# --------------------------------------------------------------------------------------------------------------------
# the check after sampling


def judge(trials: Sequence[FrozenTrial], number: int) -> int | str | None:
    """Does trial ``number`` (its values just sampled) repeat another trial's values? The number of the trial that
    keeps them, ``None`` (they are this trial's own), or :data:`WAIT` (a later trial with the same values is still
    deciding).

    Every process writes its trial's values, then reads all trials: of two trials sampled at once, at least one sees
    the other's values. A trial yields to an equal one with a lower number, or with a higher number that has already
    passed this check; it waits for an equal, higher-numbered one that has not decided yet. A later trial never
    waits on an earlier one, so nobody waits in a circle, and exactly one of the equal trials is trained.
    """
    me = next(t for t in trials if t.number == number)
    if not me.params or me.system_attrs.get("retry_history") or "fixed_params" in me.system_attrs:
        return None  # nothing sampled (a space of fixed values), a retry or an enqueued trial
    excluded = Excluded.of(trials)
    pending = False
    for t in trials:
        if t.number == number or t.params != me.params or not takes_a_place(t, excluded):
            continue
        if t.number < number or t.user_attrs.get(CHECKED_ATTR) or t.system_attrs.get("retry_history"):
            return t.number
        pending = True
    return WAIT if pending else None


def repeated_trial(study: optuna.Study, trial: optuna.Trial, timeout: float = DECISION_TIMEOUT) -> int | None:
    """The number of the trial whose values ``trial`` repeats (it must not be trained), or None after marking
    ``trial`` as the owner of its values. Waiting on a process that died counts as repeating: never train twice."""
    end = time.monotonic() + timeout
    while True:
        trials = study.get_trials(deepcopy=False)
        verdict = judge(trials, trial.number)
        if verdict is None:
            trial.set_user_attr(CHECKED_ATTR, True)
            return None
        if verdict != WAIT:
            return int(verdict)
        if time.monotonic() > end:
            me = next(t for t in trials if t.number == trial.number)
            return max(t.number for t in trials if t.params == me.params and t.number != trial.number)
        time.sleep(0.2)
