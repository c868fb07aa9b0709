"""Distinct configurations across processes and hosts: samplers that do not draw alike, and the rule that catches the
rest.

Optuna's samplers keep one random state per process, seeded once, so processes started together with one ``--seed``
propose the same values. :class:`PerTrialSeed` rebuilds Optuna's TPE or random sampler for each trial from
``(--seed, trial number)``: trial numbers are unique in a study, so concurrent trials draw differently, and one process
with one seed draws the same trials every time. A grid hands point ``n`` to trial ``n`` (:class:`GridPoints`).
Chance can still give two trials the same values (a small categorical space), so a freshly sampled trial is compared
with the others before it is trained (:func:`repeated`). Why not Optuna's GridSampler: docs/design.md.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from allconv_cli.search.budget import Ledger, retry_history
from allconv_cli.spaces import SearchSpace


def trial_seed(seed: int, number: int) -> int:
    """A 32-bit seed for trial ``number`` of a study searched with ``--seed seed``."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class PerTrialSeed(BaseSampler):
    """``build(trial_seed(seed, n))`` samples trial ``n``. TPE and random keep nothing between trials that the study
    does not hold (they rebuild their model from its trials), so rebuilding them per trial loses nothing."""

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
    """Every point of a grid once: trial ``n`` takes point ``n mod size`` if no placed trial holds it, else the next
    free one. Unlike Optuna's GridSampler, a trial that was never trained (a repeat, a user error, a surplus trial)
    frees its point, and the budget, not the sampler, ends the study (the target is capped at the grid's size)."""

    def __init__(self, grid: dict[str, list[Any]]) -> None:
        self.names = list(grid)
        self.points = [dict(zip(self.names, combo, strict=True)) for combo in itertools.product(*grid.values())]
        self.index = {self._key(p): i for i, p in enumerate(self.points)}
        self.chosen: dict[int, int] = {}

    def _key(self, params: dict[str, Any]) -> tuple[Any, ...] | None:
        return tuple(params[n] for n in self.names) if all(n in params for n in self.names) else None

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.params:  # a retry keeps the params of the trial it repeats
            return
        trials = study.get_trials(deepcopy=False)
        ledger = Ledger.of(trials)
        taken = {self.index.get(self._key(t.params)) for t in trials
                 if t.number != trial.number and ledger.holds_a_place(t)}
        order = [(trial.number + k) % len(self.points) for k in range(len(self.points))]
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


def repeated(trials: Sequence[FrozenTrial], number: int) -> int | None:
    """The number of another trial that holds the values trial ``number`` just sampled (it must not be trained),
    or None: they are its own.

    Each process writes its trial's values (Optuna stores a param as it is suggested), then reads every trial. Of
    two trials sampled at the same moment, at least one sees the other's values and yields; both may yield, then both
    draw again. So equal values are never trained twice. A retry and an enqueued trial repeat values on purpose.
    """
    me = next(t for t in trials if t.number == number)
    if not me.params or retry_history(me) or "fixed_params" in me.system_attrs:
        return None
    ledger = Ledger.of(trials)
    return next((t.number for t in trials
                 if t.number != number and t.params == me.params and ledger.holds_a_place(t)), None)
