"""Terminal progress for a training run (rich), as an engine hook.

Kept apart from the engine so the loop stays UI-free, and apart from tracking so a search can show its own view.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from allconv_cli.config import TrainConfig
from allconv_cli.engine import EpochMetrics, Hooks, TrainResult


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


class RichProgress(Hooks):
    """An epoch bar with live loss, accuracy and images/s, plus a bar for the batches of the current epoch."""

    def __init__(self, console: Console, description: str, log_epochs: bool = True) -> None:
        self.console = console
        self.description = description
        self.log_epochs = log_epochs
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.epochs_task = self.batches_task = None

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def on_start(self, cfg: TrainConfig, model: object, start_epoch: int) -> None:
        self.epochs_task = self.progress.add_task(
            self.description, total=cfg.epochs, completed=start_epoch, stats="starting"
        )
        self.batches_task = self.progress.add_task("  batches", total=1, stats="")

    def on_batch_end(self, epoch: int, images_seen: int, images_total: int) -> None:
        self.progress.update(self.batches_task, completed=images_seen, total=images_total)

    def on_epoch_end(self, m: EpochMetrics) -> None:
        stats = (
            f"loss {m.train_loss:.3f} acc {_pct(m.train_accuracy)} val {_pct(m.val_accuracy)} "
            f"{m.images_per_second:,.0f} img/s"
        )
        self.progress.update(self.epochs_task, completed=m.epoch, stats=stats)
        if self.log_epochs:
            self.progress.console.print(
                f"epoch {m.epoch:>4}  lr {m.lr:.4g}  train loss {m.train_loss:.4f} acc {_pct(m.train_accuracy)}  "
                f"val loss {m.val_loss if m.val_loss is None else round(m.val_loss, 4)} acc {_pct(m.val_accuracy)}"
                f"  {m.epoch_seconds:.1f}s  {m.images_per_second:,.0f} img/s",
                highlight=False,
            )


def summary_table(result: TrainResult, run_id: str | None = None) -> Table:
    """The final summary of ``allconv train``."""
    table = Table(title="allconv train: summary", show_header=False)
    rows = [
        ("run id", run_id or "-"),
        ("status", result.status + (f" ({result.reason})" if result.reason else "")),
        ("epochs", str(result.epochs_completed)),
        ("final val accuracy", _pct(result.val_accuracy)),
        ("best val accuracy", f"{_pct(result.best_val_accuracy)} (epoch {result.best_epoch})"),
        ("test accuracy", _pct(result.test_accuracy)),
        ("test error", "-" if result.test_error is None else f"{result.test_error:.2f}%"),
        ("images/s (train)", f"{result.images_per_second:,.0f}"),
        ("wall time", f"{result.seconds:.1f} s"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table
