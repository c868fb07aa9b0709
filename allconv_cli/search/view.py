"""What a search shows in the terminal: the live study bar, one line per finished trial, the final summary table."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import IO, Any

from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from allconv_cli import paper
from allconv_cli.config import TrainConfig
from allconv_cli.engine import EpochMetrics, Hooks
from allconv_cli.search.budget import Counts, Ledger, count_trials, skipped
from allconv_cli.search.plan import SearchSettings
from allconv_cli.tracking.schema import TrialAttr, trial_state_name


class PipeSafeStream:
    """Standard output that outlives its reader. Ctrl-C on ``allconv search ... | tee log`` stops ``tee`` too, and
    every later write would raise BrokenPipeError: in the middle of checkpointing the trial and closing its MLflow
    runs. After a broken pipe, output goes to /dev/null (also Python's own flush at exit) and the work goes on."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)

    def isatty(self) -> bool:
        return not self.broken and self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", None) or "utf-8"


def pipe_safe(console: Console) -> Console:
    """``console``, writing through a :class:`PipeSafeStream`."""
    if not isinstance(console.file, PipeSafeStream):
        console.file = PipeSafeStream(console.file)  # type: ignore[assignment]
    return console


def fmt(value: Any) -> str:
    """A sampled value, short."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class SearchView(Hooks):
    """A study bar (done / running / pruned / failed, best so far) and, in-process, the running trial's epochs."""

    def __init__(self, console: Console, study_name: str, target: int, trials: Sequence[FrozenTrial]) -> None:
        self.console = console
        self.progress = Progress(
            SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), console=console,
        )
        self.study_task = self.progress.add_task(f"study {study_name}", total=target, stats="")
        self.trial_task: Any = None
        self.reported = {t.number for t in trials if t.state.is_finished()}
        self.update(trials)

    def __enter__(self) -> SearchView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, trials: Sequence[FrozenTrial]) -> Counts:
        c = count_trials(trials)
        best = "-" if c.best_value is None else f"{100 * c.best_value:.2f}% (trial {c.best_number})"
        stats = f"running {c.running}  pruned {c.pruned}  failed {c.failed}  best val {best}"
        self.progress.update(self.study_task, completed=min(c.finished, self.progress.tasks[0].total or 0),
                             stats=stats)
        retried = Ledger.of(trials).retried
        for t in sorted(trials, key=lambda t: t.number):
            if t.state.is_finished() and t.number not in self.reported:
                self.reported.add(t.number)
                self.progress.console.print(trial_line(t, retried=t.number in retried), highlight=False)
        return c

    def start_trial(self, number: int, epochs: int) -> None:
        if self.trial_task is None:
            self.trial_task = self.progress.add_task(f"  trial {number}", total=epochs, stats="")
        else:
            self.progress.reset(self.trial_task, total=epochs, description=f"  trial {number}", stats="")

    def on_start(self, cfg: TrainConfig, model: object, start_epoch: int) -> None:
        if self.trial_task is not None:
            self.progress.update(self.trial_task, total=cfg.epochs, completed=start_epoch,
                                 stats="resumed" if start_epoch else "")

    def on_epoch_end(self, m: EpochMetrics) -> None:
        if self.trial_task is not None:
            val = "-" if m.val_accuracy is None else f"{100 * m.val_accuracy:.2f}%"
            self.progress.update(self.trial_task, completed=m.epoch,
                                 stats=f"loss {m.train_loss:.3f}  val {val}  {m.images_per_second:,.0f} img/s")


def trial_line(t: FrozenTrial, retried: bool = False) -> str:
    state = "skipped" if skipped(t) else trial_state_name(t.state.name)
    value = "" if t.value is None else f"val {100 * t.value:6.2f}%  "
    params = "  ".join(f"{k}={fmt(v)}" for k, v in t.params.items())
    reason = t.user_attrs.get(TrialAttr.REASON, "") or ("worker lost" if t.state == TrialState.FAIL else "")
    if retried:
        reason = f"{reason}; re-queued" if reason else "re-queued"
    return f"trial {t.number:>3} {state:<8} {value}{params}" + (f"  ({reason})" if reason else "")


def summary_table(summary: dict[str, Any], settings: SearchSettings) -> Table:
    """The end of ``allconv search``: trial counts, the best trial and its config, the paper's number."""
    table = Table(title=f"allconv search: {settings.study_name}", show_header=False)
    rows = [
        ("storage", summary["storage"]),
        ("space", f"{summary['space']} ({settings.space_source})"),
        ("trials", f"{summary['finished']} of {summary['target_trials']} finished: {summary['complete']} complete, "
                   f"{summary['pruned']} pruned, {summary['failed']} failed"
                   + (f", {summary['running']} still running" if summary["running"] else "")),
    ]
    best = summary.get("best")
    if best:
        test = paper.error_percent(best["test_accuracy"])
        rows += [
            ("best trial", f"{best['trial']} (run {best['mlflow_run_id']})"),
            ("best val accuracy", f"{100 * best['val_accuracy']:.2f}%"),
            ("its test error", "-" if test is None else f"{test:.2f}% (recorded, never used to select)"),
            ("best config", "  ".join(f"{k}={fmt(v)}" for k, v in best["config"].items()) or "-"),
        ]
    entry = paper.TABLE3.get((str(settings.base_config["model"]).upper(), str(settings.base_config["branch"])))
    if entry is not None:
        rows.append(("paper test error", f"{entry.error:.2f}% ({entry.display_name}, full CIFAR-10, 350 epochs)"))
    rows.append(("MLflow parent run", str(summary["parent_run_id"])))
    for key, value in rows:
        table.add_row(key, value)
    return table
