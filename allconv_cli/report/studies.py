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

# Ablation studies (by their `allconv.space` tag) and the params one row of their table stands for.
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
        (r.experiment, r.tag("study_name")): r
        for r in runs
        if r.tag("role") == "study" and r.tag("kind") != "reproduce" and r.tag("study_name")
    }
    trials_of = trials_by_study(runs)
    finals: dict[tuple[str, str], RunRecord] = {}
    for run in runs:
        if run.tag("role") == "final" and run.status == "finished":
            key = (run.experiment, run.tag("study_name"))
            if key not in finals or run.start_time > finals[key].start_time:
                finals[key] = run
    studies, ablations = [], []
    for key, parent in sorted(parents.items(), key=lambda item: item[1].start_time):
        attempts = trials_of.get(key, [])
        superseded = restarted(attempts)
        trials = [r for r in attempts if r.run_id not in superseded]
        best = _best_by_objective(trials)
        searched = _searched_params(trials)
        statuses = [r.status for r in trials]
        final = finals.get(key)
        sample = best or (trials[0] if trials else parent)
        network = sample.tag("network") or parent.tag("network")
        space = parent.tag("space")
        studies.append(StudySummary(
            name=key[1], experiment=key[0], space=space, network=network, trials=len(trials),
            finished=statuses.count("finished"), diverged=statuses.count("diverged"), pruned=statuses.count("pruned"),
            val_accuracy=_objective(best) if best else None,
            test_error=best.metric("test_error") if best else None,
            best_params={k: best.params[k] for k in searched if k in best.params} if best else {},
            best_run_id=best.run_id if best else None,
            rerun=rerun_command(best.params) if best else None,
            final_test_error=final.metric("test_error") if final else None,
            final_run_id=final.run_id if final else None,
            collapsed_attempts=len(superseded),
        ))
        if space in ABLATION_SPACES and trials:
            ablations.append(_ablation(key, space, trials))
    return studies, ablations


def _searched_params(trials: Sequence[RunRecord]) -> list[str]:
    """Params whose value differs between trials: what the study searched over."""
    keys = sorted({k for r in trials for k in r.params})
    skip = {"lr_milestones", "extra"}  # derived from other params / retired
    return [k for k in keys if k not in skip and len({r.params.get(k) for r in trials}) > 1]


def _objective(run: RunRecord) -> float | None:
    """``allconv search`` maximises the final validation accuracy, so the report ranks its trials by the same."""
    value = run.val_accuracy
    return value if value is not None else run.metric("best_val_accuracy")


def _best_by_objective(trials: Sequence[RunRecord]) -> RunRecord | None:
    """The trial with the best objective; finished trials first, pruned ones only when none finished."""
    scored = [r for r in trials if r.status in ("finished", "pruned") and _objective(r) is not None]
    finished = [r for r in scored if r.status == "finished"] or scored
    return max(finished, key=lambda r: _objective(r), default=None)


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
            "diverged": sum(r.status == "diverged" for r in group),
            "val_accuracy": _objective(best) if best else None,
            "test_error": best.metric("test_error") if best else None,
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
