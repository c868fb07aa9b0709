"""The one terminal view of ``train``, ``search``, ``reproduce`` and ``bench``: each stage while it happens, the time
estimate, each running run's epoch and progress inside it with the time left, and (a search) the study line.

On an interactive terminal it is a rich ``Live`` region under the permanent lines. Elsewhere (a log file, CI, a pipe)
the same facts come as plain lines: each stage as it starts, each finished epoch, and inside a long epoch a progress
line at most every :data:`PLAIN_EVERY` seconds, never one per batch. Kept apart from the engine, which only calls
hooks (``on_batch_end`` here stores three numbers: it runs after every optimizer step on the training thread).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from allconv_cli.config import TrainConfig
from allconv_cli.engine import EpochMetrics, Hooks, TrainResult
from allconv_cli.errors import AllconvError, first_line
from allconv_cli.estimate import Estimate, Sizes, duration, measure

PLAIN_EVERY = 30.0  # seconds between progress lines inside an epoch, when not on a terminal
REFRESH_PER_SECOND = 2
MIN_BAR = 10  # columns; narrower than this, the bar is left out rather than the words cut


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def bar_line(left: str, fraction: float | None, right: str, width: int, extra: str = "") -> RenderableType:
    """``left``, a bar, ``right`` and ``extra`` in ``width`` columns. The bar takes what the words leave; when
    that is under :data:`MIN_BAR`, ``extra`` moves to a second line, and if even then there is no room the bar goes
    and the words wrap between words: a name or a number is never cut."""
    extra = extra.strip()
    if extra and width - cell_len(f"{left}  {right}  {extra}") - 1 >= MIN_BAR:
        right, extra = f"{right}  {extra}", ""
    room = width - cell_len(left) - cell_len(right) - 2
    if fraction is None or room < MIN_BAR:
        return Text(f"{left}  {right}  {extra}".strip(), overflow="fold")
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(width=room, no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_row(Text(left, style="bold"), ProgressBar(total=1.0, completed=min(max(fraction, 0.0), 1.0), width=room),
                 Text(right))
    return Group(grid, Text(f"  {extra}", overflow="fold")) if extra else grid


class RunTracker(Hooks):
    """One run's progress (an ``allconv train`` run, a trial, a final run), fed by the engine's hooks.

    Time left: this epoch's from the rate of its own steps plus the evaluation pass measured before (or
    ``expected_eval``); later epochs at the mean measured epoch (the first one, with its warm-up, only while it is
    the only one), or ``expected_epoch`` (the estimate) until an epoch has ended.
    """

    def __init__(self, view: TerminalView, label: str, *, what: str = "run", epoch_lines: bool = True,
                 expected_epoch: float | None = None, expected_eval: float = 0.0) -> None:
        self.view, self.label, self.what, self.epoch_lines = view, label, what, epoch_lines
        self.expected_epoch, self.expected_eval = expected_epoch, expected_eval
        self.epochs = self.epoch = self.seen = self.total = 0
        self.walls: list[float] = []  # whole epochs: training, evaluation, hand-over
        self.evals: list[float] = []  # the part of each that was not training steps
        self.epoch_started = self.last_line = time.perf_counter()
        self.last: EpochMetrics | None = None

    def on_start(self, cfg: TrainConfig, model: object, start_epoch: int) -> None:
        self.epochs, self.epoch, self.seen, self.total = cfg.epochs, start_epoch + 1, 0, 0
        self.epoch_started = self.last_line = time.perf_counter()
        self.view.end_stage()

    def on_batch_end(self, epoch: int, images_seen: int, images_total: int) -> None:
        self.epoch, self.seen, self.total = epoch, images_seen, images_total
        if self.view.plain and time.perf_counter() - self.last_line >= self.view.plain_every:
            self.last_line = time.perf_counter()
            self.view.say(self.progress_line())

    def on_epoch_end(self, m: EpochMetrics) -> None:
        now = time.perf_counter()
        wall = now - self.epoch_started
        self.walls.append(wall)
        self.evals.append(max(0.0, wall - m.epoch_seconds))
        self.epoch, self.seen, self.last = m.epoch + 1, 0, m
        self.epoch_started = self.last_line = now
        if self.epoch_lines or self.view.plain:
            self.view.say(self.epoch_line(m))
        if m.epoch == self.epochs:
            self.view.stage(f"{self.label}: last epoch done; testing and recording the {self.what}")

    @property
    def running(self) -> bool:
        return 0 < self.epoch <= self.epochs

    def epoch_seconds(self) -> float | None:
        """An epoch's wall time as measured so far (the estimate's before the first epoch ends)."""
        walls = (self.walls[1:] or self.walls)[-5:]
        return sum(walls) / len(walls) if walls else self.expected_epoch

    def left(self) -> tuple[float | None, float | None]:
        """Seconds left in this epoch and in the whole run (None: nothing to go by yet)."""
        elapsed = time.perf_counter() - self.epoch_started
        per_epoch = self.epoch_seconds()
        if self.seen and self.total:
            evals = (self.evals[1:] or self.evals)[-5:]
            eval_part = sum(evals) / len(evals) if evals else self.expected_eval
            this = elapsed * (self.total - self.seen) / self.seen + eval_part
            per_epoch = per_epoch or elapsed * self.total / self.seen + eval_part
        elif per_epoch is not None:
            this = max(0.0, per_epoch - elapsed)
        else:
            return None, None
        return this, this + max(0, self.epochs - self.epoch) * per_epoch

    def _left_words(self) -> str:
        this, run = self.left()
        if this is None or run is None:
            return ""
        return f"epoch ~{duration(this)} left, {self.what} ~{duration(run)} left"

    def progress_line(self) -> str:
        """Inside an epoch (plain lines): where it is and the time left."""
        share = f" ({100 * self.seen / self.total:.0f}%)" if self.total else ""
        return f"{self.label} epoch {self.epoch}/{self.epochs}: {self.seen:,}/{self.total:,} images{share}, " \
               f"{self._left_words()}".rstrip(", ")

    def epoch_line(self, m: EpochMetrics) -> str:
        val_loss = "-" if m.val_loss is None else f"{m.val_loss:.4f}"
        _, run = self.left()
        left = f"  {self.what} ~{duration(run)} left" if run is not None and m.epoch < self.epochs else ""
        return (f"{self.label} epoch {m.epoch}/{self.epochs}  lr {m.lr:.4g}  train loss {m.train_loss:.4f} acc "
                f"{pct(m.train_accuracy)}  val loss {val_loss} acc {pct(m.val_accuracy)}  {m.epoch_seconds:.1f}s  "
                f"{m.images_per_second:,.0f} img/s{left}")

    def render(self, width: int) -> RenderableType:
        """The live line: epoch, a bar through the epoch, the time left, the last validation accuracy."""
        val = f", val {pct(self.last.val_accuracy)}" if self.last is not None else ""
        fraction = self.seen / self.total if self.total else 0.0
        return bar_line(f"{self.label} epoch {self.epoch}/{self.epochs}", fraction, f"{100 * fraction:3.0f}%",
                        width, f"{self._left_words()}{val}".lstrip(", "))


class TerminalView:
    """Stages, permanent lines and the live region of running runs; a context manager around the work it shows."""

    def __init__(self, console: Console, *, plain: bool | None = None, plain_every: float = PLAIN_EVERY) -> None:
        self.console = console
        self.plain = (not console.is_interactive) if plain is None else plain
        self.plain_every = plain_every
        self.runs: list[RunTracker] = []
        self.current_stage: tuple[str, float] | None = None  # (what, since): one attribute, read by the refresher
        self.live: Live | None = None
        self.last_said = time.perf_counter()  # when a permanent line was last written (plain: the heartbeat's clock)
        self.quiet: threading.Event | None = None  # set to stop the plain heartbeat

    def __enter__(self) -> TerminalView:
        if not self.plain and self.live is None:
            self.live = Live(_Region(self), console=self.console, refresh_per_second=REFRESH_PER_SECOND,
                             transient=True)
            self.live.start()
        if self.plain and self.quiet is None:
            self.quiet = threading.Event()
            threading.Thread(target=self._heartbeat, args=(self.quiet,), name="allconv-heartbeat",
                             daemon=True).start()
        return self

    def _heartbeat(self, quiet: threading.Event) -> None:
        """A log is never silent for long: when nothing was written for :attr:`plain_every` seconds, the current
        stage (or, a search, the study line) once more with its elapsed time. A live view shows a spinner instead."""
        while not quiet.wait(min(1.0, self.plain_every / 4)):
            if time.perf_counter() - self.last_said >= self.plain_every:
                text = self.pulse()
                if text:
                    self.say(text)
                else:
                    self.last_said = time.perf_counter()

    def pulse(self) -> str | None:
        """What a log hears when it heard nothing for a while: the stage still running and for how long."""
        stage = self.current_stage
        if stage is None:
            return None
        return f"{stage[0]}: still going, {duration(time.perf_counter() - stage[1])} so far"

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.end_stage()
        self.current_stage = None  # a stage an error ended is not reported as done
        if self.quiet is not None:
            self.quiet.set()
            self.quiet = None
        if self.live is not None:
            self.live.stop()
            self.live = None

    def say(self, text: str) -> None:
        """A permanent line: one line in a log; on a terminal wrapped between words at its width."""
        self.last_said = time.perf_counter()
        self.console.print(text, highlight=False, markup=False, soft_wrap=self.plain)

    def stage(self, text: str) -> None:
        """``text`` starts now (and the stage before it ends): a plain line, or a spinner with its elapsed time
        that becomes a permanent line with its duration when it ends."""
        self.end_stage()
        self.current_stage = (text, time.perf_counter())
        if self.plain:
            self.say(f"{text} ...")

    def end_stage(self) -> None:
        stage, self.current_stage = self.current_stage, None
        if stage is not None and not self.plain:
            self.say(f"{stage[0]}: {duration(time.perf_counter() - stage[1])}")

    def track(self, label: str, **kwargs: object) -> RunTracker:
        """A run to show until :meth:`untrack`; its hooks go to the engine."""
        tracker = RunTracker(self, label, **kwargs)  # type: ignore[arg-type]
        self.runs.append(tracker)
        return tracker

    def untrack(self, tracker: RunTracker | None) -> None:
        if tracker in self.runs:
            self.runs.remove(tracker)

    def lines(self, width: int) -> list[RenderableType]:
        """What the live region shows: each running run, then the current stage with a spinner."""
        out = [run.render(width) for run in list(self.runs) if run.running]
        stage = self.current_stage
        if stage is not None:  # the elapsed time in a column of its own: a wrap never splits "(7 s)"
            grid = Table.grid(padding=(0, 1))
            grid.add_column(no_wrap=True)
            grid.add_column(overflow="fold")
            grid.add_column(no_wrap=True)
            grid.add_row(Spinner("dots"), Text(stage[0]), f"({duration(time.perf_counter() - stage[1])})")
            out.append(grid)
        return out


class _Region:
    """The live region's renderable: asks the view for its lines at each refresh."""

    def __init__(self, view: TerminalView) -> None:
        self.view = view

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.view.lines(options.max_width)


def measure_run(view: TerminalView, cfg: TrainConfig, sizes: Sizes, num_classes: int, *, study: bool = True,
                **kwargs: Any) -> Estimate | None:
    """Measure ``cfg``'s step as a stage and say the estimate (:class:`~allconv_cli.estimate.Estimate`'s fields
    in ``kwargs``); None, having said why, when the measurement itself failed (the run will fail the same way
    and say more)."""
    view.stage(f"measuring the training step of {cfg.registry_name} (batch {cfg.batch_size}) for the estimate")
    try:
        measured = measure(cfg, num_classes)
    except (AllconvError, KeyboardInterrupt):
        raise
    except Exception as exc:
        view.end_stage()
        view.say(f"No time estimate: measuring the step failed ({first_line(exc)})")
        return None
    found = Estimate(measured, sizes, cfg.epochs, cfg.test_every, **kwargs)
    view.end_stage()
    view.say(found.line(study))
    return found


@contextlib.contextmanager
def run_progress(console: Console, label: str, **kwargs: object) -> Iterator[RunTracker]:
    """One run shown on its own (a final run, ``allconv train``): a view around it and its tracker."""
    with TerminalView(console) as view:
        yield view.track(label, **kwargs)


def summary_table(result: TrainResult, run_id: str | None = None) -> Table:
    """The final summary of ``allconv train``."""
    table = Table(title="allconv train: summary", show_header=False)
    rows = [
        ("run id", run_id or "-"),
        ("status", result.status + (f" ({result.reason})" if result.reason else "")),
        ("epochs", str(result.epochs_completed)),
        ("final val accuracy", pct(result.val_accuracy)),
        ("best val accuracy", f"{pct(result.best_val_accuracy)} (epoch {result.best_epoch})"),
        ("test accuracy", pct(result.test_accuracy)),
        ("test error", "-" if result.test_error is None else f"{result.test_error:.2f}%"),
        ("images/s (train)", f"{result.images_per_second:,.0f}"),
        ("wall time", f"{result.seconds:.1f} s"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table
