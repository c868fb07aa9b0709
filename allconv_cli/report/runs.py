"""The report's input: every run of the chosen MLflow experiments, flattened to plain values.

Read through :mod:`allconv_cli.tracking` (with its retries), never from local files, so a report can be made on any
machine that reaches the tracking store, including while workers on other hosts are still training.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from allconv_cli import stores
from allconv_cli.errors import AllconvError
from allconv_cli.tracking import store
from allconv_cli.tracking.schema import Metric, Role, Tag


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

    def tag(self, name: str, default: str = "") -> str:
        """The value of tag ``name``, a :class:`~allconv_cli.tracking.schema.Tag` (or MLflow's own) name."""
        return self.tags.get(name, default)

    @property
    def status(self) -> str:
        """Our own status tag (a :class:`~allconv_cli.tracking.schema.Status` value), else MLflow's, lower case."""
        return self.tag(Tag.STATUS, self.mlflow_status.lower())

    @property
    def lr(self) -> float | None:
        return parse_float(self.params.get("lr"))

    @property
    def val_accuracy(self) -> float | None:
        """The validation accuracy of the final model (the one whose test error was measured)."""
        value = self.metric(Metric.FINAL_VAL_ACCURACY)
        return value if value is not None else self.metric(Metric.VAL_ACCURACY)

    @property
    def attempt(self) -> int:
        """1 for a first run, 2, 3, ... for restarts after a collapse (runs from before attempts existed: 1)."""
        value = parse_float(self.tag(Tag.ATTEMPT))
        return int(value) if value is not None else 1

    @property
    def precision(self) -> str:
        """bf16, tf32 or fp32 (:attr:`Tag.PRECISION`); empty for runs from before it was recorded."""
        return self.tag(Tag.PRECISION)

    def metric(self, key: str) -> float | None:
        value = self.metrics.get(key)
        return None if value is None or not math.isfinite(value) else float(value)


def parse_float(value: str | None) -> float | None:
    """A logged param as a number; None for missing, "None" and non-numeric values."""
    try:
        return float(value) if value not in (None, "", "None") else None
    except ValueError:
        return None


def trials_by_study(runs: Iterable[RunRecord], kind: str | None = None) -> dict[tuple[str, str], list[RunRecord]]:
    """Trial runs grouped by (experiment, study name); only studies of ``kind`` (:attr:`Tag.KIND`) when given."""
    groups: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for run in runs:
        if run.tag(Tag.ROLE) != Role.TRIAL or not run.tag(Tag.STUDY_NAME):
            continue
        if kind is not None and run.tag(Tag.KIND) != kind:
            continue
        groups[(run.experiment, run.tag(Tag.STUDY_NAME))].append(run)
    return groups


def restarted(runs: Iterable[RunRecord]) -> set[str]:
    """Ids of the runs that collapsed and were restarted as a new attempt (another run names them in its
    :attr:`Tag.COLLAPSE_RETRY_OF` tag): a trial is its last attempt."""
    return {run.tag(Tag.COLLAPSE_RETRY_OF) for run in runs if run.tag(Tag.COLLAPSE_RETRY_OF)}


def load_runs(experiments: Sequence[str] | None = None) -> tuple[list[RunRecord], list[str]]:
    """All runs of the named experiments (default: every active experiment), and the experiment names used.

    A named experiment that does not exist is a user error that lists the ones that do.
    """
    uri, shown = store.tracking_uri(), store.shown_uri()
    database = stores.sqlite_path(uri)
    if database is not None and not database.exists():
        # nothing was ever tracked here; MLflow would create an empty database just to find that out
        if experiments:
            raise AllconvError(f"no MLflow store at {shown}: run `allconv reproduce` here first, or set "
                               "MLFLOW_TRACKING_URI to the store that holds the runs")
        return [], []
    known = store.experiments()
    if experiments:
        missing = [name for name in experiments if name not in known]
        if missing:
            available = ", ".join(sorted(known)) or "none"
            raise AllconvError(
                f"no MLflow experiment {missing[0]!r} in {shown}: available are {available} "
                "(omit --experiment to report on all)"
            )
        names = list(dict.fromkeys(experiments))
    else:
        names = sorted(known)
    by_id = {known[name]: name for name in names}
    if not by_id:
        return [], names
    runs = [
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
        for run in store.all_runs(list(by_id))
    ]
    if not experiments:  # all of them: name only those that hold runs (not MLflow's empty "Default")
        names = [name for name in names if any(run.experiment == name for run in runs)]
    return runs, names

