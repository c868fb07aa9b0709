"""``allconv search`` studies and the two ablations (BatchNorm x dropout, SGD vs Adam) as small tables.

Trials are ranked by what the search maximised, the final validation accuracy; their test error is shown, never
used to rank.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from allconv_cli.report.runs import RunRecord, parse_float, restarted, trials_by_study
from allconv_cli.report.table3 import rerun_command
from allconv_cli.tracking.schema import Kind, Metric, Role, Status, Tag

# Ablation studies (by their Tag.SPACE) and the params one row of their table stands for.
ABLATION_SPACES: dict[str, tuple[str, ...]] = {
    "bn-dropout": ("bn", "dropout_input", "dropout_hidden"),
    "optimizer": ("optimizer", "lr"),
}
ABLATION_TITLES = {"bn-dropout": "BatchNorm x dropout", "optimizer": "SGD vs Adam (optimizer x lr)"}


@dataclass(frozen=True)
class StudySummary:
    """One ``allconv search`` study: its best trial by validation accuracy, and that trial's test error."""

    name: str
    experiment: str
    space: str
    network: str
    trials: int
    finished: int
    diverged: int
    pruned: int
    val_accuracy: float | None  # final validation accuracy of the best trial (the objective)
    test_error: float | None  # of the best trial (measured, never used to pick it)
    best_params: dict[str, str]
    best_run_id: str | None
    rerun: str | None
    final_test_error: float | None  # of the study's final retrain run (role=final), when there is one
    final_run_id: str | None
    collapsed_attempts: int = 0  # trial runs that collapsed and were restarted (each trial counts as its last)
    done: int = 0  # trials counted as allconv search counts them: complete + pruned + failed
    target_trials: int | None = None  # the study's --trials (None for studies from before it was recorded)


@dataclass(frozen=True)
class Ablation:
    """An ablation study as a small table: per combination of ``columns``, the best trial of that combination."""

    study: str
    experiment: str
    space: str
    title: str
    columns: tuple[str, ...]
    rows: tuple[dict[str, Any], ...]


def search_studies(runs: Sequence[RunRecord]) -> tuple[list[StudySummary], list[Ablation]]:
    """Every search study (role=study and not a reproduction), and the ablation tables among them."""
    parents = {
        (r.experiment, r.tag(Tag.STUDY_NAME)): r
        for r in runs
        if r.tag(Tag.ROLE) == Role.STUDY and r.tag(Tag.KIND) != Kind.REPRODUCE and r.tag(Tag.STUDY_NAME)
    }
    trials_of = trials_by_study(runs)
    finals: dict[tuple[str, str], RunRecord] = {}
    for run in runs:
        if run.tag(Tag.ROLE) == Role.FINAL and run.status == Status.FINISHED:
            key = (run.experiment, run.tag(Tag.STUDY_NAME))
            if key not in finals or run.start_time > finals[key].start_time:
                finals[key] = run
    studies, ablations = [], []
    for key, parent in sorted(parents.items(), key=lambda item: item[1].start_time):
        attempts = trials_of.get(key, [])
        superseded = restarted(attempts)
        trials = [r for r in attempts if r.run_id not in superseded]
        studies.append(_summary(key, parent, trials, finals.get(key), len(superseded)))
        if parent.tag(Tag.SPACE) in ABLATION_SPACES and trials:
            ablations.append(_ablation(key, parent.tag(Tag.SPACE), trials))
    return studies, ablations


def _summary(key: tuple[str, str], parent: RunRecord, trials: list[RunRecord], final: RunRecord | None,
             collapsed_attempts: int) -> StudySummary:
    best = _best_by_objective(trials)
    searched = _searched_params(trials)
    statuses = [r.status for r in trials]
    sample = best or (trials[0] if trials else parent)
    target = parse_float(parent.tag(Tag.TARGET_TRIALS))
    return StudySummary(
        name=key[1], experiment=key[0], space=parent.tag(Tag.SPACE),
        network=sample.tag(Tag.NETWORK) or parent.tag(Tag.NETWORK), trials=len(trials),
        finished=statuses.count(Status.FINISHED), diverged=statuses.count(Status.DIVERGED),
        pruned=statuses.count(Status.PRUNED),
        val_accuracy=_objective(best) if best else None,
        test_error=best.metric(Metric.TEST_ERROR) if best else None,
        best_params={k: best.params[k] for k in searched if k in best.params} if best else {},
        best_run_id=best.run_id if best else None,
        rerun=rerun_command(best.params) if best else None,
        final_test_error=final.metric(Metric.TEST_ERROR) if final else None,
        final_run_id=final.run_id if final else None,
        collapsed_attempts=collapsed_attempts,
        done=_done(parent, trials),
        target_trials=None if target is None else int(target),
    )


def _done(parent: RunRecord, trials: Sequence[RunRecord]) -> int:
    """Trials done as ``allconv search`` counts them (complete + pruned + failed, a re-queued failure not counted):
    the study's own count on its parent run when it logged one, else the trial runs that ended and were not
    retried as another trial."""
    counts = [parent.metric(name) for name in (Metric.N_COMPLETE, Metric.N_PRUNED, Metric.N_FAILED)]
    if all(count is not None for count in counts):
        return int(sum(count for count in counts if count is not None))
    return sum(r.status != Status.RUNNING and not r.tag(Tag.RETRIED_AS) for r in trials)


def _searched_params(trials: Sequence[RunRecord]) -> list[str]:
    """Params whose value differs between trials: what the study searched over."""
    keys = sorted({k for r in trials for k in r.params})
    skip = {"lr_milestones", "extra"}  # derived from other params / retired
    return [k for k in keys if k not in skip and len({r.params.get(k) for r in trials}) > 1]


def _objective(run: RunRecord) -> float | None:
    """``allconv search`` maximises the final validation accuracy, so the report ranks its trials by the same."""
    value = run.val_accuracy
    return value if value is not None else run.metric(Metric.BEST_VAL_ACCURACY)


def _best_by_objective(trials: Sequence[RunRecord]) -> RunRecord | None:
    """The trial with the best objective; finished trials first, pruned ones only when none finished."""
    scored = [r for r in trials if r.status in (Status.FINISHED, Status.PRUNED) and _objective(r) is not None]
    finished = [r for r in scored if r.status == Status.FINISHED] or scored
    return max(finished, key=_rank, default=None)


def _rank(run: RunRecord) -> tuple[float, float]:
    """Ties go to the earlier trial, as in ``search.parent.best_trial``: the report and the search name the same."""
    number = parse_float(run.tag(Tag.TRIAL_NUMBER))
    return _objective(run) or 0.0, -(number if number is not None else run.start_time)


def _ablation(key: tuple[str, str], space: str, trials: list[RunRecord]) -> Ablation:
    columns = [c for c in ABLATION_SPACES[space] if len({r.params.get(c) for r in trials}) > 1]
    columns = columns or [c for c in ABLATION_SPACES[space] if any(c in r.params for r in trials)]
    groups: dict[tuple[str, ...], list[RunRecord]] = defaultdict(list)
    for run in trials:
        groups[tuple(run.params.get(c, "") for c in columns)].append(run)
    rows = []
    for combo in sorted(groups, key=_sort_key):
        group = groups[combo]
        best = _best_by_objective(group)
        rows.append({
            **dict(zip(columns, combo, strict=True)),
            "trials": len(group),
            "diverged": sum(r.status == Status.DIVERGED for r in group),
            "val_accuracy": _objective(best) if best else None,
            "test_error": best.metric(Metric.TEST_ERROR) if best else None,
            "run_id": best.run_id if best else None,
        })
    return Ablation(study=key[1], experiment=key[0], space=space, title=ABLATION_TITLES[space],
                    columns=tuple(columns), rows=tuple(rows))


def _sort_key(combo: tuple[str, ...]) -> tuple[tuple[int, float, str], ...]:
    """Numbers numerically, words alphabetically."""
    out = []
    for value in combo:
        number = parse_float(value)
        out.append((0, number, "") if number is not None else (1, 0.0, value))
    return tuple(out)
