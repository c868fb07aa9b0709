"""``allconv report``: the paper's Table 3 next to what MLflow holds, plus search studies and the two ablations.

Everything is read back from MLflow (params, tags, final metrics), never from local files, so a report can be
made on any machine that reaches the tracking store, including while workers on other hosts are still training.

How rows are picked, and why:

* A Table 3 row comes from the trials of an ``allconv reproduce`` study (tags ``allconv.kind=reproduce``,
  ``allconv.role=trial``), one study per network and protocol. When a network was reproduced several times
  (a smoke run, then the real one) the most recently started study is reported and the others are counted in a note.
* ``paper`` protocol: the lr with the lowest *test* error, which is what the paper did (it had no validation split).
  It is labelled as selected on the test set, because it is: the number is optimistic.
* ``validated`` protocol: the lr with the highest *final* validation accuracy. The engine measures the test error on
  the final model, so the validation accuracy of that same model is the one that may pick it. The test error of
  the picked run is reported, and only that one: the honest number. Test metrics never enter this selection.
* Only finished runs can be picked; diverged, failed, interrupted and still-running runs are counted, not ranked.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from allconv_cli import paper
from allconv_cli.config import TrainConfig
from allconv_cli.errors import AllconvError
from allconv_cli.paper import PAPER, PROTOCOLS, REPRODUCTION_2020, TABLE3

TAG = "allconv."  # same prefix as tracking.TAG; not imported from there because tracking pulls in torch
PROTOCOL_SELECTION = {
    "paper": "lowest test error (selected on the test set, as the paper did)",
    "validated": "highest final validation accuracy (test set unused for selection)",
}
PROTOCOL_SHORT = {"paper": "test-sel.", "validated": "val-sel."}
# Ablation studies (by their `allconv.space` tag) and the params one row of their table stands for.
ABLATION_SPACES: dict[str, tuple[str, ...]] = {
    "bn-dropout": ("bn", "dropout_input", "dropout_hidden"),
    "optimizer": ("optimizer", "lr"),
}
ABLATION_TITLES = {"bn-dropout": "BatchNorm x dropout", "optimizer": "SGD vs Adam (optimizer x lr)"}
# The paper's setting; a reproduction run that differs in any of these is flagged as not comparable.
PAPER_SETTING: dict[str, str] = {
    "dataset": "cifar10", "epochs": str(paper.EPOCHS), "subset": "None", "test_size": "None",
    **{k: str(paper.PROTOCOL[k]) for k in ("preprocess", "augment", "bn", "optimizer")},
}


# --------------------------------------------------------------------------------------------------------------
# Reading MLflow


@dataclass(frozen=True)
class RunRecord:
    """The parts of an MLflow run the report needs, flattened so the selection logic is plain Python."""

    run_id: str
    experiment: str
    name: str
    start_time: int
    mlflow_status: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]

    def tag(self, key: str, default: str = "") -> str:
        return self.tags.get(TAG + key, default)

    @property
    def status(self) -> str:
        """Our own status tag (finished, diverged, pruned, interrupted, failed, running)."""
        return self.tag("status", self.mlflow_status.lower())

    @property
    def lr(self) -> float | None:
        return _float(self.params.get("lr"))

    def metric(self, key: str) -> float | None:
        value = self.metrics.get(key)
        return None if value is None or not math.isfinite(value) else float(value)


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "", "None") else None
    except ValueError:
        return None


def load_runs(experiments: Sequence[str] | None = None) -> tuple[list[RunRecord], list[str]]:
    """All runs of the named experiments (default: every active experiment), and the experiment names used.

    A named experiment that does not exist is a user error that lists the ones that do.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        # nothing was ever tracked here; MLflow would create an empty database just to find that out
        if experiments:
            raise AllconvError(f"no MLflow store at {uri}: run `allconv reproduce` here first, or set "
                               "MLFLOW_TRACKING_URI to the store that holds the runs")
        return [], []
    client = MlflowClient()
    known = {}
    token = None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        known.update({exp.name: exp.experiment_id for exp in page})
        token = page.token
        if not token:
            break
    if experiments:
        missing = [name for name in experiments if name not in known]
        if missing:
            available = ", ".join(sorted(known)) or "none"
            raise AllconvError(
                f"no MLflow experiment {missing[0]!r} in {uri}: available are {available} "
                "(omit --experiment to report on all)"
            )
        names = list(dict.fromkeys(experiments))
    else:
        names = sorted(known)
    by_id = {known[name]: name for name in names}
    runs: list[RunRecord] = []
    if not by_id:
        return runs, names
    token = None
    while True:
        page = client.search_runs(list(by_id), run_view_type=ViewType.ACTIVE_ONLY, max_results=5000, page_token=token)
        runs += [
            RunRecord(
                run_id=run.info.run_id,
                experiment=by_id[run.info.experiment_id],
                name=run.info.run_name or "",
                start_time=run.info.start_time or 0,
                mlflow_status=run.info.status,
                tags=dict(run.data.tags),
                params=dict(run.data.params),
                metrics=dict(run.data.metrics),
            )
            for run in page
        ]
        token = page.token
        if not token:
            break
    if not experiments:  # all of them: name only those that hold runs (not MLflow's empty "Default")
        names = [name for name in names if any(run.experiment == name for run in runs)]
    return runs, names


# --------------------------------------------------------------------------------------------------------------
# Rerunning a row


def rerun_command(params: dict[str, str]) -> str:
    """The ``allconv train`` command that trains this run's exact config again, from its logged params (what the
    run actually used, not what today's defaults would be)."""
    return TrainConfig.from_params(params).command_line()


# --------------------------------------------------------------------------------------------------------------
# Table 3


@dataclass
class LrOutcome:
    """One lr of a reproduction grid: the run that stands for it."""

    lr: float | None
    status: str
    test_error: float | None
    val_accuracy: float | None
    run_id: str


@dataclass
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
    deviations: list[str]  # how the runs differ from the paper's setting; empty: comparable
    per_lr: list[LrOutcome]
    other_studies: int = 0  # older reproductions of the same network and protocol, not reported

    @property
    def comparable(self) -> bool:
        return not self.deviations


@dataclass
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


@functools.cache
def exact_params() -> dict[tuple[str, str], int]:
    """Exact parameter counts of the twelve networks (builds them once; imports torch)."""
    from allconv_cli import models

    return {key: models.count_params(models.build(*key, init="torch")) for key in models.ARCHITECTURES}


def _study_groups(runs: Iterable[RunRecord], kind_filter: str | None) -> dict[tuple[str, str], list[RunRecord]]:
    """Trial runs grouped by (experiment, study name)."""
    groups: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for run in runs:
        if run.tag("role") != "trial" or not run.tag("study_name"):
            continue
        if kind_filter is not None and run.tag("kind") != kind_filter:
            continue
        groups[(run.experiment, run.tag("study_name"))].append(run)
    return groups


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
    with_val = [r for r in candidates if _val_accuracy(r) is not None]
    return max(with_val, key=lambda r: _val_accuracy(r), default=None)  # max keeps the first of equals


def _val_accuracy(run: RunRecord) -> float | None:
    value = run.metric("final_val_accuracy")
    return value if value is not None else run.metric("val_accuracy")


def _deviations(params: dict[str, str]) -> list[str]:
    out = []
    for key, expected in PAPER_SETTING.items():
        value = params.get(key)
        if value is not None and value != expected:
            out.append(f"{key}={value}" if key != "epochs" else f"epochs={value} (paper: {expected})")
    return out


def _protocol_result(protocol: str, studies: list[tuple[tuple[str, str], list[RunRecord]]],
                     parents: dict[tuple[str, str], RunRecord], paper_error: float) -> ProtocolResult:
    """Summarise the latest study of one network under one protocol."""

    def started(item: tuple[tuple[str, str], list[RunRecord]]) -> int:
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
    epochs = _float(sample.params.get("epochs"))
    return ProtocolResult(
        protocol=protocol,
        study_name=study_name,
        experiment=experiment,
        selected_by=PROTOCOL_SELECTION[protocol],
        test_error=test_error,
        val_accuracy=_val_accuracy(chosen) if chosen and protocol == "validated" else None,
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
        deviations=_deviations(sample.params),
        per_lr=[
            LrOutcome(r.lr, r.status, r.metric("test_error"), _val_accuracy(r), r.run_id) for r in reps
        ],
        other_studies=len(studies) - 1,
    )


def table3(runs: Sequence[RunRecord]) -> list[NetworkRow]:
    """One row per network of Table 3, in the paper's order, with our result under each protocol that was run."""
    parents = {
        (r.experiment, r.tag("study_name")): r
        for r in runs
        if r.tag("role") == "study" and r.tag("kind") == "reproduce"
    }
    buckets: dict[tuple[str, str, str], list[tuple[tuple[str, str], list[RunRecord]]]] = defaultdict(list)
    for key, trials in _study_groups(runs, "reproduce").items():
        first = trials[0]
        parent = parents.get(key)
        protocol = first.tag("protocol") or (parent.tag("protocol") if parent else "")
        if protocol in PROTOCOLS:
            buckets[(first.tag("model").upper(), first.tag("branch"), protocol)].append((key, trials))
    counts = exact_params()
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
            params=counts[(base, branch)], paper_params=entry.params_printed, paper_error=entry.error,
            error_2020=entry.error_2020, protocols=results,
        ))
    return rows


# --------------------------------------------------------------------------------------------------------------
# Search studies and ablations


@dataclass
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


@dataclass
class Ablation:
    """An ablation study as a small table: per combination of ``columns``, the best trial of that combination."""

    study: str
    experiment: str
    space: str
    title: str
    columns: list[str]
    rows: list[dict[str, Any]]


def _searched_params(trials: Sequence[RunRecord]) -> list[str]:
    """Params whose value differs between trials: what the study searched over."""
    keys = sorted({k for r in trials for k in r.params})
    skip = {"lr_milestones", "extra"}
    return [k for k in keys if k not in skip and len({r.params.get(k) for r in trials}) > 1]


def _best_by_val(trials: Sequence[RunRecord]) -> RunRecord | None:
    """The trial with the best validation accuracy after its last epoch (the search's objective); finished trials
    first, pruned ones only when none finished."""
    scored = [r for r in trials if r.status in ("finished", "pruned") and _objective(r) is not None]
    finished = [r for r in scored if r.status == "finished"] or scored
    return max(finished, key=lambda r: _objective(r), default=None)


def _objective(run: RunRecord) -> float | None:
    """``allconv search`` maximises the final validation accuracy, so the report ranks its trials by the same."""
    value = _val_accuracy(run)
    return value if value is not None else run.metric("best_val_accuracy")


def search_studies(runs: Sequence[RunRecord]) -> tuple[list[StudySummary], list[Ablation]]:
    """Every search study (role=study and not a reproduction), and the ablation tables among them."""
    parents = {
        (r.experiment, r.tag("study_name")): r
        for r in runs
        if r.tag("role") == "study" and r.tag("kind") != "reproduce" and r.tag("study_name")
    }
    trials_by_study = _study_groups(runs, None)
    finals: dict[tuple[str, str], RunRecord] = {}
    for run in runs:
        if run.tag("role") == "final" and run.status == "finished":
            key = (run.experiment, run.tag("study_name"))
            if key not in finals or run.start_time > finals[key].start_time:
                finals[key] = run
    studies, ablations = [], []
    for key, parent in sorted(parents.items(), key=lambda item: item[1].start_time):
        trials = trials_by_study.get(key, [])
        best = _best_by_val(trials)
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
        ))
        if space in ABLATION_SPACES and trials:
            ablations.append(_ablation(key, space, trials))
    return studies, ablations


def _ablation(key: tuple[str, str], space: str, trials: list[RunRecord]) -> Ablation:
    columns = [c for c in ABLATION_SPACES[space] if len({r.params.get(c) for r in trials}) > 1]
    columns = columns or [c for c in ABLATION_SPACES[space] if any(c in r.params for r in trials)]
    groups: dict[tuple[str, ...], list[RunRecord]] = defaultdict(list)
    for run in trials:
        groups[tuple(run.params.get(c, "") for c in columns)].append(run)
    rows = []
    for combo in sorted(groups, key=_sort_key):
        group = groups[combo]
        best = _best_by_val(group)
        rows.append({
            **dict(zip(columns, combo, strict=True)),
            "trials": len(group),
            "diverged": sum(r.status == "diverged" for r in group),
            "val_accuracy": _objective(best) if best else None,
            "test_error": best.metric("test_error") if best else None,
            "run_id": best.run_id if best else None,
        })
    return Ablation(study=key[1], experiment=key[0], space=space, title=ABLATION_TITLES[space], columns=columns,
                    rows=rows)


def _sort_key(combo: tuple[str, ...]) -> tuple[tuple[int, float, str], ...]:
    """Numbers numerically, words alphabetically."""
    out = []
    for value in combo:
        number = _float(value)
        out.append((0, number, "") if number is not None else (1, 0.0, value))
    return tuple(out)


# --------------------------------------------------------------------------------------------------------------
# The report


@dataclass
class Report:
    tracking_uri: str
    experiments: list[str]
    networks: list[NetworkRow]
    studies: list[StudySummary]
    ablations: list[Ablation]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for row, raw in zip(self.networks, data["networks"], strict=True):
            for protocol, result in row.protocols.items():
                if result is not None:
                    raw["protocols"][protocol]["comparable"] = result.comparable
        data["sources"] = {"paper": PAPER, "reproduction_2020": REPRODUCTION_2020}
        return data


def build_report(experiments: Sequence[str] | None = None) -> Report:
    """Read MLflow and assemble everything ``allconv report`` prints."""
    import mlflow

    runs, names = load_runs(experiments)
    networks = table3(runs)
    studies, ablations = search_studies(runs)
    notes = []
    if not runs:
        where = ", ".join(names) if names else "any experiment"
        notes.append(f"no runs in {where} of {mlflow.get_tracking_uri()}: run `allconv reproduce` first")
    elif not any(result for row in networks for result in row.protocols.values()):
        notes.append("no `allconv reproduce` runs found: every network shows as missing")
    for row in networks:
        for result in row.protocols.values():
            if result is None:
                continue
            label = f"{row.display_name} ({result.protocol})"
            if result.deviations:
                notes.append(f"{label}: not the paper's setting ({', '.join(result.deviations)})")
            pending = result.lrs_total - result.finished - result.diverged - result.failed
            if pending > 0:
                notes.append(f"{label}: {pending} of {result.lrs_total} lrs still running or not started; "
                             "the selection may change")
            if result.other_studies:
                notes.append(f"{label}: {result.other_studies} older reproduction(s) ignored, reporting "
                             f"{result.study_name!r}")
    return Report(mlflow.get_tracking_uri(), list(names), networks, studies, ablations, notes)


# --------------------------------------------------------------------------------------------------------------
# Rendering


def _num(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _lr(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _ours(result: ProtocolResult | None) -> str:
    if result is None or result.test_error is None:
        return "-"
    return f"{result.test_error:.2f}" + ("" if result.comparable else "*")


def table3_header() -> list[str]:
    """Short headers (the legend under the table explains them), so 13 columns fit a terminal."""
    cols = ["network", "params", "paper params", "paper err %", "2020 err %"]
    for protocol in PROTOCOLS:
        cols += [f"ours {PROTOCOL_SHORT[protocol]} err %", "lr", "diff", "diverged"]
    return cols


def table3_cells(row: NetworkRow) -> list[str]:
    cells = [row.display_name, f"{row.params:,}", row.paper_params, f"{row.paper_error:.2f}", f"{row.error_2020:.2f}"]
    for protocol in PROTOCOLS:
        result = row.protocols[protocol]
        if result is None:
            cells += ["-", "-", "-", "-"]
        else:
            cells += [_ours(result), _lr(result.lr), _num(result.diff, signed=True),
                      f"{result.diverged}/{result.lrs_total}"]
    return cells


def _study_cells(study: StudySummary) -> list[str]:
    params = ", ".join(f"{k}={v}" for k, v in study.best_params.items()) or "-"
    return [study.name, study.space or "-", study.network or "-", f"{study.finished}/{study.trials}",
            _pct(study.val_accuracy), _num(study.test_error), _num(study.final_test_error), params]


STUDY_HEADER = ["study", "space", "network", "finished", "val acc %", "its test err %", "final retrain err %",
                "best params"]


def _ablation_header(ablation: Ablation) -> list[str]:
    return [*ablation.columns, "trials", "diverged", "val acc %", "its test err %"]


def _ablation_cells(ablation: Ablation, row: dict[str, Any]) -> list[str]:
    return [*(str(row[c]) for c in ablation.columns), str(row["trials"]), str(row["diverged"]),
            _pct(row["val_accuracy"]), _num(row["test_error"])]


def _legend() -> list[str]:
    return [
        "test-sel.: the paper's protocol, all 50,000 training images, the lr with the lowest TEST error "
        "(selection on the test set, optimistic).",
        "val-sel.: the lr with the best validation accuracy on a held-out split; its test error is the honest "
        "number. diff = ours - paper, in points; * = not the paper's setting (see notes).",
    ]


def wide_console(**kwargs: Any) -> Any:
    """A rich Console that, when output is piped or captured, does not squeeze the 13-column table into 80 columns."""
    import shutil

    from rich.console import Console

    console = Console(**kwargs)
    if not console.is_terminal:
        console = Console(width=max(shutil.get_terminal_size((160, 24)).columns, 160), **kwargs)
    return console


def render_rich(report: Report, console: Any) -> None:
    """The terminal view: Table 3, then search studies and ablations when there are any, then notes."""
    from rich.table import Table

    table = Table(title="Table 3: CIFAR-10 test error (%), paper vs this reproduction", title_style="bold")
    for i, name in enumerate(table3_header()):
        table.add_column(name, justify="left" if i in (0, 2) else "right", no_wrap=i == 0)
    for row in report.networks:
        table.add_row(*table3_cells(row))
        if row.branch == "allcnn" and row.base != "C":
            table.add_section()
    console.print(table)
    for line in _legend():
        console.print(line, style="dim", highlight=False)
    if report.studies:
        studies = Table(title="allconv search studies (best trial by validation accuracy)", title_style="bold")
        for name in STUDY_HEADER:
            studies.add_column(name, overflow="fold")
        for study in report.studies:
            studies.add_row(*_study_cells(study))
        console.print(studies)
    for ablation in report.ablations:
        table = Table(title=f"Ablation: {ablation.title} ({ablation.study})", title_style="bold")
        for name in _ablation_header(ablation):
            table.add_column(name)
        for row in ablation.rows:
            table.add_row(*_ablation_cells(ablation, row))
        console.print(table)
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)


def _md_table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *(line(r) for r in rows)]


def render_markdown(report: Report) -> str:
    lines = ["## Table 3: CIFAR-10 test error (%), paper vs this reproduction", ""]
    lines += _md_table(table3_header(), (table3_cells(row) for row in report.networks))
    lines += ["", *(f"- {line}" for line in _legend())]
    if report.studies:
        lines += ["", "## allconv search studies", ""]
        lines += _md_table(STUDY_HEADER, (_study_cells(s) for s in report.studies))
    for ablation in report.ablations:
        lines += ["", f"## Ablation: {ablation.title} ({ablation.study})", ""]
        lines += _md_table(_ablation_header(ablation), (_ablation_cells(ablation, r) for r in ablation.rows))
    if report.notes:
        lines += ["", "Notes:", "", *(f"- {note}" for note in report.notes)]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["network", "display_name", "params", "paper_params", "paper_error", "error_2020"] + [
    f"{protocol}_{key}"
    for protocol in PROTOCOLS
    for key in ("test_error", "lr", "diff", "diverged", "finished", "lrs_total", "val_accuracy", "epochs",
                "comparable", "run_id", "study")
]


def render_csv(report: Report) -> str:
    """Table 3 only, one row per network, missing values as empty cells (searches and ablations: use json)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in report.networks:
        record: dict[str, Any] = {
            "network": row.name, "display_name": row.display_name, "params": row.params,
            "paper_params": row.paper_params, "paper_error": row.paper_error, "error_2020": row.error_2020,
        }
        for protocol in PROTOCOLS:
            result = row.protocols[protocol]
            if result is None:
                continue
            values = {
                "test_error": result.test_error, "lr": result.lr, "diff": result.diff, "diverged": result.diverged,
                "finished": result.finished, "lrs_total": result.lrs_total, "val_accuracy": result.val_accuracy,
                "epochs": result.epochs, "comparable": result.comparable, "run_id": result.run_id,
                "study": result.study_name,
            }
            record.update({f"{protocol}_{k}": ("" if v is None else v) for k, v in values.items()})
        writer.writerow(record)
    return out.getvalue()


def render_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2)


# --------------------------------------------------------------------------------------------------------------
# The plot

SERIES = (  # (label, colour)
    ("paper (Springenberg et al. 2015)", "#4d4d4d"),
    ("2020 PyTorch reproduction", "#e6a07a"),
    ("ours, lr selected on the test set (as the paper)", "#3a7dc9"),
    ("ours, lr selected on validation", "#2e9e5b"),
)


def plot(report: Report, path: str) -> None:
    """A grouped bar chart of test error per network: paper, 2020 reproduction, ours under each protocol.

    Readable on its own: values on the bars, "not run" where a network has no result, hatching where our runs do
    not use the paper's setting (fewer epochs, a subset, other data).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = report.networks
    values: list[list[float | None]] = [
        [r.paper_error for r in rows],
        [r.error_2020 for r in rows],
        *[[r.protocols[p].test_error if r.protocols[p] else None for r in rows] for p in PROTOCOLS],
    ]
    hatched = [[False] * len(rows), [False] * len(rows)] + [
        [bool(r.protocols[p] and not r.protocols[p].comparable) for r in rows] for p in PROTOCOLS
    ]
    present = [v for series in values for v in series if v is not None]
    top = max(present) * 1.18 if present else 30.0
    width = 0.2
    fig, ax = plt.subplots(figsize=(15, 6.5), dpi=110)
    for s, ((_label, colour), series) in enumerate(zip(SERIES, values, strict=True)):
        offset = (s - 1.5) * width
        for i, value in enumerate(series):
            x = i + offset
            if value is None:
                ax.text(x, top * 0.01, "not run", rotation=90, ha="center", va="bottom", fontsize=7, color="#999999")
                continue
            ax.bar(x, value, width, color=colour, edgecolor="white" if not hatched[s][i] else "black",
                   hatch="///" if hatched[s][i] else None, linewidth=0.6)
            ax.text(x, value + top * 0.008, f"{value:.2f}", rotation=90, ha="center", va="bottom", fontsize=7)
    for boundary in (3.5, 7.5):
        ax.axvline(boundary, color="#cccccc", linewidth=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r.display_name for r in rows], rotation=25, ha="right", fontsize=9)
    ax.set_ylim(0, top)
    ax.set_ylabel("CIFAR-10 test error (%), lower is better")
    ax.set_title("The All Convolutional Net, Table 3: paper vs the 2020 reproduction vs ours (no augmentation)",
                 pad=34)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    handles = [Patch(facecolor=c, label=label) for label, c in SERIES]
    if any(any(h) for h in hatched):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="///",
                             label="hatched: not the paper's setting (fewer epochs / subset / other data)"))
    # above the axes, so it never hides a bar however high our errors are
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8, ncol=len(handles),
              frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
