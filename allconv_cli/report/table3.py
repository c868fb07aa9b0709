"""Table 3: for each network and protocol, the run that protocol reports, next to the paper's number.

A row comes from the trials of an ``allconv reproduce`` study (one per network and protocol); when a network was
reproduced several times the most recently started study is reported and the others are counted. Only finished runs
are ranked; diverged, failed and running ones are counted. ``paper`` picks on the test set, as the paper did, and says
so; ``validated`` picks on the final validation accuracy and never looks at test metrics.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from allconv_cli import architectures, paper
from allconv_cli.config import TrainConfig
from allconv_cli.errors import AllconvError
from allconv_cli.paper import PROTOCOLS, TABLE3
from allconv_cli.report.runs import RunRecord, parse_float, trials_by_study

PROTOCOL_SELECTION = {
    "paper": "lowest test error (selected on the test set, as the paper did)",
    "validated": "highest final validation accuracy (test set unused for selection)",
}
# The paper's setting as TrainConfig values (its protocol, all epochs, all of CIFAR-10): a reproduction run that
# differs in any of them is flagged as not comparable.
PAPER_SETTING: dict[str, object] = {
    "dataset": paper.PROTOCOL["dataset"], "epochs": paper.EPOCHS, "subset": None, "test_size": None, **paper.PROTOCOL,
}

Study = tuple[tuple[str, str], list[RunRecord]]  # ((experiment, study name), its trial runs)


@dataclass(frozen=True)
class LrOutcome:
    """One lr of a reproduction grid: the run that stands for it."""

    lr: float | None
    status: str
    test_error: float | None
    val_accuracy: float | None
    run_id: str


@dataclass(frozen=True)
class ProtocolResult:
    """Our number for one network under one protocol, and how it was obtained."""

    protocol: str
    study_name: str
    experiment: str
    selected_by: str
    test_error: float | None  # of the selected run, in %
    val_accuracy: float | None  # final validation accuracy of the selected run (fraction), None under `paper`
    lr: float | None
    diff: float | None  # ours - paper, in percentage points
    run_id: str | None
    rerun: str | None
    lrs_total: int
    finished: int
    diverged: int
    failed: int  # failed or interrupted
    running: int
    epochs: int | None
    deviations: tuple[str, ...]  # how the runs differ from the paper's setting; empty: comparable
    per_lr: tuple[LrOutcome, ...]
    other_studies: int = 0  # older reproductions of the same network and protocol, not reported

    @property
    def comparable(self) -> bool:
        return not self.deviations


@dataclass(frozen=True)
class NetworkRow:
    base: str
    branch: str
    name: str
    display_name: str
    params: int
    paper_params: str
    paper_error: float
    error_2020: float
    protocols: dict[str, ProtocolResult | None]


def rerun_command(params: dict[str, str]) -> str:
    """The ``allconv train`` command that trains this run's exact config again, from its logged params (what the
    run actually used, not what today's defaults would be)."""
    return TrainConfig.from_params(params).command_line()


def exact_params() -> dict[tuple[str, str], int]:
    """Exact parameter counts of the twelve networks as trained for Table 3 (10 classes, no BN), by arithmetic on
    the layer table (:func:`allconv_cli.architectures.param_count`): no network is built, no torch imported."""
    return {key: architectures.param_count(*key) for key in architectures.ARCHITECTURES}


def select_run(trials: Sequence[RunRecord], protocol: str) -> RunRecord | None:
    """The run a protocol reports, among finished runs with a test error.

    ``paper``: lowest test error. ``validated``: highest final validation accuracy; the test error is not looked at
    (ties go to the earlier run in the lr grid order, never to the better test error).
    """
    candidates = [r for r in trials if r.status == "finished" and r.metric("test_error") is not None]
    if protocol == "paper":
        return min(candidates, key=lambda r: r.metric("test_error"), default=None)
    if protocol != "validated":
        raise AllconvError(f"unknown protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    with_val = [r for r in candidates if r.val_accuracy is not None]
    return max(with_val, key=lambda r: r.val_accuracy, default=None)  # max keeps the first of equals


def deviations(params: dict[str, str]) -> tuple[str, ...]:
    """How a run's logged config differs from :data:`PAPER_SETTING` (params it did not log are not judged)."""
    cfg = TrainConfig.from_params(params)
    out = []
    for key, expected in PAPER_SETTING.items():
        if key in params and getattr(cfg, key) != expected:
            value = params[key]
            out.append(f"{key}={value}" if key != "epochs" else f"epochs={value} (paper: {expected})")
    return tuple(out)


def _representatives(trials: list[RunRecord]) -> list[RunRecord]:
    """One run per lr: a finished one when there is one, else the latest (a retried trial leaves several)."""
    by_lr: dict[float | None, list[RunRecord]] = defaultdict(list)
    for run in trials:
        by_lr[run.lr].append(run)
    chosen = []
    for group in by_lr.values():
        finished = [r for r in group if r.status == "finished"]
        chosen.append(max(finished or group, key=lambda r: r.start_time))
    return sorted(chosen, key=lambda r: (-(r.lr or 0.0)))


def _protocol_result(protocol: str, studies: list[Study], parents: dict[tuple[str, str], RunRecord],
                     paper_error: float) -> ProtocolResult:
    """Summarise the latest study of one network under one protocol."""

    def started(item: Study) -> int:
        parent = parents.get(item[0])
        return parent.start_time if parent else min(r.start_time for r in item[1])

    (experiment, study_name), trials = max(studies, key=started)
    reps = _representatives(trials)
    # ties in the validated selection go to the first run of the grid as the user listed it (highest lr first)
    chosen = select_run(reps, protocol)
    parent = parents.get((experiment, study_name))
    grid = [v for v in (parent.tag("lrs") if parent else "").split(",") if v]
    statuses = [r.status for r in reps]
    test_error = chosen.metric("test_error") if chosen else None
    sample = chosen or reps[0]
    epochs = parse_float(sample.params.get("epochs"))
    return ProtocolResult(
        protocol=protocol,
        study_name=study_name,
        experiment=experiment,
        selected_by=PROTOCOL_SELECTION[protocol],
        test_error=test_error,
        val_accuracy=chosen.val_accuracy if chosen and protocol == "validated" else None,
        lr=chosen.lr if chosen else None,
        diff=None if test_error is None else test_error - paper_error,
        run_id=chosen.run_id if chosen else None,
        rerun=rerun_command(chosen.params) if chosen else None,
        lrs_total=max(len(grid), len(reps)),
        finished=statuses.count("finished"),
        diverged=statuses.count("diverged"),
        failed=sum(s in ("failed", "interrupted", "killed") for s in statuses),
        running=statuses.count("running"),
        epochs=None if epochs is None else int(epochs),
        deviations=deviations(sample.params),
        per_lr=tuple(LrOutcome(r.lr, r.status, r.metric("test_error"), r.val_accuracy, r.run_id) for r in reps),
        other_studies=len(studies) - 1,
    )


def table3(runs: Sequence[RunRecord], param_counts: dict[tuple[str, str], int]) -> list[NetworkRow]:
    """One row per network of Table 3, in the paper's order, with our result under each protocol that was run.

    ``param_counts``: (base, branch) -> exact parameter count (:func:`exact_params`).
    """
    parents = {
        (r.experiment, r.tag("study_name")): r
        for r in runs
        if r.tag("role") == "study" and r.tag("kind") == "reproduce"
    }
    buckets: dict[tuple[str, str, str], list[Study]] = defaultdict(list)
    for key, trials in trials_by_study(runs, "reproduce").items():
        first = trials[0]
        parent = parents.get(key)
        protocol = first.tag("protocol") or (parent.tag("protocol") if parent else "")
        if protocol in PROTOCOLS:
            buckets[(first.tag("model").upper(), first.tag("branch"), protocol)].append((key, trials))
    rows = []
    for (base, branch), entry in TABLE3.items():
        results = {
            protocol: _protocol_result(protocol, buckets[(base, branch, protocol)], parents, entry.error)
            if buckets.get((base, branch, protocol))
            else None
            for protocol in PROTOCOLS
        }
        rows.append(NetworkRow(
            base=base, branch=branch, name=paper.registry_name(base, branch), display_name=entry.display_name,
            params=param_counts[(base, branch)], paper_params=entry.params_printed, paper_error=entry.error,
            error_2020=entry.error_2020, protocols=results,
        ))
    return rows
