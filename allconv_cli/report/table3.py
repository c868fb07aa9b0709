"""Table 3: for each network and protocol, the run that protocol reports, next to the paper's number.

A row comes from the trials of an ``allconv reproduce`` study (one per network and protocol); when a network was
reproduced several times the most recently started study is reported and the others are counted. Only finished runs
are ranked; diverged, collapsed, failed and running ones are counted (a trial is its last attempt; collapsed attempts
are counted per lr). ``paper`` picks on the test set, as the paper did, and says so; ``validated`` picks on the final
validation accuracy and never looks at test metrics, and its number is that lr retrained on all training images (the
study's ``final`` run) when there is one.
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
from allconv_cli.tracking.schema import OLD_KILLED, Kind, Metric, Role, Status, Tag

PROTOCOL_SELECTION = {
    "paper": "lowest test error (selected on the test set, as the paper did)",
    "validated": "highest final validation accuracy (test set unused for selection), then that lr retrained on all "
                 "training images and tested once",
}
FP32 = "fp32"  # the paper's precision (Caffe, 2014); runs that record another are flagged
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
    status: str  # of its last attempt
    test_error: float | None
    val_accuracy: float | None
    run_id: str
    attempt: int = 1  # the attempt that stands for it (2, 3, ...: earlier ones collapsed)
    collapsed_attempts: int = 0  # of its runs, those that collapsed
    dead_classes: str = ""  # class channels never positive on validation after the last epoch, e.g. "3,7"


@dataclass(frozen=True)
class FinalRun:
    """The validated protocol's last step: the chosen lr retrained on all training images (val_size=0), tested once."""

    run_id: str
    status: str
    test_error: float | None
    diff: float | None  # ours - paper, in percentage points
    lr: float | None
    source_run: str  # the selection run it retrained
    attempt: int
    collapsed_attempts: int
    dead_classes: str
    deviations: tuple[str, ...]
    rerun: str | None


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
    collapsed: int = 0  # lrs whose last attempt collapsed too
    collapsed_attempts: int = 0  # runs that collapsed, over all lrs (each was restarted while retries were left)
    dead_classes: str = ""  # of the selected run
    final: FinalRun | None = None  # validated only: the selected lr retrained on all training images

    @property
    def comparable(self) -> bool:
        return not self.deviations

    @property
    def ours_from(self) -> str:
        """Which run ``ours`` is: ``final`` (validated, retrained on all training images) or ``selection``."""
        final = self.final
        return "final" if final is not None and final.status == Status.FINISHED and final.test_error is not None \
            else "selection"

    @property
    def ours_test_error(self) -> float | None:
        """The number Table 3 shows: the final run's test error under ``validated`` when it finished, else the
        selected run's."""
        return self.final.test_error if self.ours_from == "final" else self.test_error

    @property
    def ours_diff(self) -> float | None:
        return self.final.diff if self.ours_from == "final" else self.diff


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
    candidates = [r for r in trials if r.status == Status.FINISHED and r.metric(Metric.TEST_ERROR) is not None]
    if protocol == "paper":
        return min(candidates, key=lambda r: r.metric(Metric.TEST_ERROR), default=None)
    if protocol != "validated":
        raise AllconvError(f"unknown protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    with_val = [r for r in candidates if r.val_accuracy is not None]
    return max(with_val, key=lambda r: paper.validated_key(r.val_accuracy, r.lr), default=None)


def deviations(params: dict[str, str], precision: str = "") -> tuple[str, ...]:
    """How a run's logged config differs from :data:`PAPER_SETTING` (params it did not log are not judged), and its
    ``precision`` tag when that is not fp32 (bf16 autocast on a GPU is ours, not the paper's)."""
    cfg = TrainConfig.from_params(params)
    out = []
    for key, expected in PAPER_SETTING.items():
        if key in params and getattr(cfg, key) != expected:
            value = params[key]
            out.append(f"{key}={value}" if key != "epochs" else f"epochs={value} (paper: {expected})")
    if precision and precision != FP32:
        out.append(f"precision={precision} (paper: {FP32})")
    return tuple(out)


def _by_lr(runs: list[RunRecord]) -> dict[float | None, list[RunRecord]]:
    groups: dict[float | None, list[RunRecord]] = defaultdict(list)
    for run in runs:
        groups[run.lr].append(run)
    return groups


def _latest(group: list[RunRecord]) -> RunRecord:
    """The run that stands for a group: a finished one when there is one, else the latest (a trial retried after a
    lost worker, or restarted after a collapse, leaves several; the last attempt is the latest)."""
    finished = [r for r in group if r.status == Status.FINISHED]
    return max(finished or group, key=lambda r: r.start_time)


def _representatives(trials: list[RunRecord]) -> list[RunRecord]:
    """One run per lr (:func:`_latest`), highest lr first."""
    chosen = [_latest(group) for group in _by_lr(trials).values()]
    return sorted(chosen, key=lambda r: (-(r.lr or 0.0)))


def _collapsed(group: list[RunRecord]) -> int:
    return sum(r.status == Status.COLLAPSED for r in group)


def _final_run(finals: list[RunRecord], chosen: RunRecord | None, paper_error: float) -> FinalRun | None:
    """The study's final run (role=final) that retrained ``chosen``: the finished one, else its latest attempt."""
    mine = [r for r in finals if chosen is not None and r.tag(Tag.SOURCE_RUN) in ("", chosen.run_id)]
    if not mine:
        return None
    run = _latest(mine)
    test_error = run.metric(Metric.TEST_ERROR) if run.status == Status.FINISHED else None
    return FinalRun(
        run_id=run.run_id, status=run.status, test_error=test_error,
        diff=None if test_error is None else test_error - paper_error, lr=run.lr,
        source_run=run.tag(Tag.SOURCE_RUN), attempt=run.attempt, collapsed_attempts=_collapsed(mine),
        dead_classes=run.tag(Tag.DEAD_CLASSES), deviations=deviations(run.params, run.precision),
        rerun=rerun_command(run.params),
    )


def _protocol_result(protocol: str, studies: list[Study], parents: dict[tuple[str, str], RunRecord],
                     finals: dict[tuple[str, str], list[RunRecord]], paper_error: float) -> ProtocolResult:
    """Summarise the latest study of one network under one protocol."""

    def started(item: Study) -> int:
        parent = parents.get(item[0])
        return parent.start_time if parent else min(r.start_time for r in item[1])

    (experiment, study_name), trials = max(studies, key=started)
    by_lr = _by_lr(trials)
    reps = _representatives(trials)
    chosen = select_run(reps, protocol)
    parent = parents.get((experiment, study_name))
    grid = [v for v in (parent.tag(Tag.LRS) if parent else "").split(",") if v]
    statuses = [r.status for r in reps]
    test_error = chosen.metric(Metric.TEST_ERROR) if chosen else None
    sample = chosen or reps[0]
    epochs = parse_float(sample.params.get("epochs"))
    final = _final_run(finals.get((experiment, study_name), []), chosen, paper_error) \
        if protocol == "validated" else None
    found = deviations(sample.params, sample.precision) + (final.deviations if final else ())
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
        finished=statuses.count(Status.FINISHED),
        diverged=statuses.count(Status.DIVERGED),
        failed=sum(s in (Status.FAILED, Status.INTERRUPTED, OLD_KILLED) for s in statuses),
        running=statuses.count(Status.RUNNING),
        epochs=None if epochs is None else int(epochs),
        deviations=tuple(dict.fromkeys(found)),
        per_lr=tuple(LrOutcome(r.lr, r.status, r.metric(Metric.TEST_ERROR), r.val_accuracy, r.run_id, r.attempt,
                               _collapsed(by_lr[r.lr]), r.tag(Tag.DEAD_CLASSES)) for r in reps),
        other_studies=len(studies) - 1,
        collapsed=statuses.count(Status.COLLAPSED),
        collapsed_attempts=_collapsed(trials),
        dead_classes=chosen.tag(Tag.DEAD_CLASSES) if chosen else "",
        final=final,
    )


def table3(runs: Sequence[RunRecord], param_counts: dict[tuple[str, str], int]) -> list[NetworkRow]:
    """One row per network of Table 3, in the paper's order, with our result under each protocol that was run.

    ``param_counts``: (base, branch) -> exact parameter count (:func:`exact_params`).
    """
    parents = {
        (r.experiment, r.tag(Tag.STUDY_NAME)): r
        for r in runs
        if r.tag(Tag.ROLE) == Role.STUDY and r.tag(Tag.KIND) == Kind.REPRODUCE
    }
    finals: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for r in runs:
        if r.tag(Tag.ROLE) == Role.FINAL and (r.experiment, r.tag(Tag.STUDY_NAME)) in parents:
            finals[(r.experiment, r.tag(Tag.STUDY_NAME))].append(r)
    buckets: dict[tuple[str, str, str], list[Study]] = defaultdict(list)
    for key, trials in trials_by_study(runs, Kind.REPRODUCE).items():
        first = trials[0]
        parent = parents.get(key)
        protocol = first.tag(Tag.PROTOCOL) or (parent.tag(Tag.PROTOCOL) if parent else "")
        if protocol in PROTOCOLS:
            buckets[(first.tag(Tag.MODEL).upper(), first.tag(Tag.BRANCH), protocol)].append((key, trials))
    rows = []
    for (base, branch), entry in TABLE3.items():
        results = {
            protocol: _protocol_result(protocol, buckets[(base, branch, protocol)], parents, finals, entry.error)
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
