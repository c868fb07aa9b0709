"""What a search shows in the terminal (on :mod:`allconv_cli.progress`'s view): the study line, the running trials,
one line per finished trial, the estimate, the final summary table."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import IO, Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console, RenderableType
from rich.table import Table

from allconv_cli import estimate, paper
from allconv_cli.config import TrainConfig
from allconv_cli.data import NUM_CLASSES, DataCache
from allconv_cli.engine import EpochMetrics, Hooks
from allconv_cli.estimate import Estimate, duration
from allconv_cli.progress import RunTracker, TerminalView, bar_line, measure_run, pct
from allconv_cli.search.budget import Counts, Ledger, count_trials, skipped
from allconv_cli.search.plan import SearchSettings
from allconv_cli.stores import safe_url
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


class SearchView(TerminalView, Hooks):
    """The study line (done, pruned, failed, running, best so far, time left) over the running trials: this
    process's with its progress inside the epoch, other processes' (``--workers N``, other hosts) with the epochs
    the storage holds; one line per finished trial; the time estimate before the first trial. As an engine hook it
    passes this process's trial on to its :class:`~allconv_cli.progress.RunTracker`."""

    def __init__(self, console: Console, settings: SearchSettings, *, plain: bool | None = None) -> None:
        super().__init__(console, plain=plain)
        self.settings = settings
        self.study: optuna.Study | None = None
        self.counts = Counts()
        self.reported: set[int] = set()
        self.elsewhere: dict[int, tuple[int, int, float | None]] = {}  # trial -> epochs done, epochs, last value
        self.durations: list[float] = []  # seconds of the study's complete trials
        self.estimate: Estimate | None = None
        self.estimate_line = ""  # what was said, for the parent run's description
        self.current: RunTracker | None = None
        self.current_number: int | None = None

    def attach(self, study: optuna.Study, requeued: Sequence[int] = ()) -> Counts:
        """Show ``study`` from now on: trials finished before are not listed again; says what this session does."""
        self.end_stage()
        self.study = study
        trials = study.get_trials(deepcopy=False)
        self.reported = {t.number for t in trials if t.state.is_finished()}
        c, s = self.update(trials), self.settings
        where = safe_url(s.storage_url)
        if c.finished or c.running or c.waiting:
            extra = f"; re-queued interrupted trial(s) {', '.join(map(str, requeued))}" if requeued else ""
            self.say(f"Resuming study {s.study_name} in {where}: {c.finished} of {s.trials} trials finished{extra}")
        else:
            self.say(f"Study {s.study_name} in {where}, space {s.space_source}: {s.trials} trials, {s.pruner} "
                     f"pruner, {s.workers} worker(s)")
        return c

    def measure(self, data: DataCache) -> str:
        """Time the base config's real step on this device and say what the study will take (one line, also for
        the parent run's description); empty when it could not be measured (the trials will say why)."""
        s = self.settings
        cfg = TrainConfig(**s.base_config)
        sizes = data.sizes(cfg.data_config())
        self.estimate = measure_run(
            self, cfg, estimate.Sizes(*sizes) if sizes else estimate.Sizes.nominal(cfg.data_config()),
            NUM_CLASSES[cfg.dataset], runs=max(1, s.trials - self.counts.finished), workers=s.workers,
            at_most=s.pruner != "none", varies=tuple(f for f in estimate.TIME_FIELDS if f in s.space().params))
        self.estimate_line = self.estimate.line() if self.estimate else ""
        return self.estimate_line

    def start_trial(self, number: int, epochs: int) -> None:
        """This process's trial ``number`` starts: its tracker, its stage, the counts with it running."""
        self.untrack(self.current)
        e = self.estimate
        self.current = self.track(f"trial {number}", what="trial", epoch_lines=False,
                                  expected_epoch=e.epoch_seconds if e else None,
                                  expected_eval=e.eval_seconds if e else 0.0)
        self.current_number = number
        self.stage(f"trial {number}: starting its MLflow run, building the network")
        if self.study is not None:
            self.update(self.study.get_trials(deepcopy=False))

    def on_start(self, cfg: TrainConfig, model: object, start_epoch: int) -> None:
        if self.current is not None:
            self.current.on_start(cfg, model, start_epoch)

    def on_batch_end(self, epoch: int, images_seen: int, images_total: int) -> None:
        if self.current is not None:
            self.current.on_batch_end(epoch, images_seen, images_total)

    def on_epoch_end(self, m: EpochMetrics) -> None:
        if self.current is not None:
            self.current.on_epoch_end(m)

    def update(self, trials: Sequence[FrozenTrial]) -> Counts:
        """New counts; a line for each trial that finished since; trials running elsewhere from the storage."""
        self.counts = c = count_trials(trials)
        retried = Ledger.of(trials).retried
        fresh = False
        for t in sorted(trials, key=lambda t: t.number):
            if t.state.is_finished() and t.number not in self.reported:
                self.reported.add(t.number)
                fresh = True
                if t.number == self.current_number:
                    self.end_stage()
                    self.untrack(self.current)
                    self.current = self.current_number = None
                self.say(trial_line(t, retried=t.number in retried))
        self.durations = [t.duration.total_seconds() for t in trials
                          if t.state == TrialState.COMPLETE and t.duration is not None]
        self._elsewhere(trials)
        if fresh and self.plain:
            self.say(self.study_text())
        return c

    def _elsewhere(self, trials: Sequence[FrozenTrial]) -> None:
        """Trials running in other processes: their epochs are what the storage knows (one value per epoch)."""
        seen: dict[int, tuple[int, int, float | None]] = {}
        for t in trials:
            if t.state != TrialState.RUNNING or t.number == self.current_number:
                continue
            values = t.intermediate_values
            done = max(values, default=0)
            seen[t.number] = (done, int(t.params.get("epochs", self.settings.base_config.get("epochs", 0))),
                              values.get(done))
            before = self.elsewhere.get(t.number)
            if self.plain and done and (before is None or before[0] < done):
                self.say(f"trial {t.number} epoch {done}/{seen[t.number][1]} done in another process: val "
                         f"{pct(values.get(done))}")
        self.elsewhere = seen

    def per_trial(self) -> float | None:
        """A trial's seconds: the study's complete trials' mean, else this trial's measured epochs, else the
        estimate."""
        if self.durations:
            return sum(self.durations) / len(self.durations)
        run = self.current
        if run is not None and run.walls and run.epochs:
            return run.epochs * (run.epoch_seconds() or 0.0)
        return self.estimate.run_seconds if self.estimate else None

    def time_left(self) -> float | None:
        """The running trials' longest remainder plus the queued trials over the parallel devices."""
        per_trial = self.per_trial()
        if per_trial is None:
            return None
        running = [per_trial * max(0, total - done) / max(total, 1) for done, total, _ in self.elsewhere.values()]
        if self.current is not None and self.current.running:
            running.append(self.current.left()[1] or 0.0)
        queued = max(0, self.settings.trials - self.counts.finished - max(self.counts.running, len(running)))
        parallel = self.estimate.parallel if self.estimate else 1
        return max(running, default=0.0) + queued * per_trial / parallel

    def study_text(self) -> str:
        c, target = self.counts, self.settings.trials
        left = self.time_left()
        best = "" if c.best_value is None else f", best {pct(c.best_value)} (trial {c.best_number})"
        when = "" if left is None or c.finished >= target else \
            f", {'at most ' if self.settings.pruner != 'none' else ''}~{duration(left)} left"
        return (f"study {self.settings.study_name}: {c.finished}/{target} done, {c.pruned} pruned, {c.failed} "
                f"failed, {c.running} running{best}{when}")

    def pulse(self) -> str | None:
        """A log that heard nothing for a while (trials in other processes, a long evaluation): the stage, else
        the study line with its time left."""
        return super().pulse() or (self.study_text() if self.study is not None else None)

    def lines(self, width: int) -> list[RenderableType]:
        c, target = self.counts, self.settings.trials
        head, _, rest = self.study_text().partition(": ")
        done, _, rest = rest.partition(", ")
        out: list[RenderableType] = [bar_line(head, c.finished / max(target, 1), done, width, rest)]
        for number, (epochs, total, value) in sorted(self.elsewhere.items()):
            out.append(bar_line(f"trial {number} epoch {epochs}/{total}", epochs / max(total, 1), f"val {pct(value)}",
                                width, "in another process: epochs from the storage"))
        return out + super().lines(width)


def trial_line(t: FrozenTrial, retried: bool = False) -> str:
    state = "skipped" if skipped(t) else trial_state_name(t.state.name)
    value = "" if t.value is None else f"val {100 * t.value:6.2f}%  "
    params = "  ".join(f"{k}={fmt(v)}" for k, v in t.params.items())
    reason = t.user_attrs.get(TrialAttr.REASON, "") or ("worker lost" if t.state == TrialState.FAIL else "")
    if retried:
        reason = f"{reason}; re-queued" if reason else "re-queued"
    took = f"  {duration(t.duration.total_seconds())}" if t.duration is not None else ""
    return f"trial {t.number:>3} {state:<8} {value}{params}{took}" + (f"  ({reason})" if reason else "")


def summary_table(summary: dict[str, Any], settings: SearchSettings) -> Table:
    """The end of ``allconv search``: trial counts, the best trial and its config, the paper's number."""
    table = Table(title=f"allconv search: {settings.study_name}", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # a path or run id wider than a narrow terminal folds; never an ellipsis
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
