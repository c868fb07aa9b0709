"""Running a study's trials in N worker processes (``--workers N``) on this machine.

Worker processes (``python -m allconv_cli search --worker PLAN``) start in their own sessions, so a terminal Ctrl-C
reaches only the launcher, which forwards exactly one SIGINT to each; it restarts one that dies, assigns GPUs
round-robin, and polls the storage for the live view.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from rich.console import Console

from allconv_cli.errors import AllconvError
from allconv_cli.search.budget import Counts, count_trials
from allconv_cli.search.plan import SearchSettings, StudyRun
from allconv_cli.search.view import SearchView
from allconv_cli.tracking.schema import StudyState


def gpu_assignment(settings: SearchSettings) -> list[str | None]:
    """CUDA devices round-robin over the workers (None: leave CUDA_VISIBLE_DEVICES alone)."""
    if str(settings.base_config.get("device", "auto")) not in ("auto", "cuda"):
        return [None] * settings.workers
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        import torch

        devices = [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if not devices:
        return [None] * settings.workers
    return [devices[i % len(devices)] for i in range(settings.workers)]


class _Processes:
    """The worker processes of one session: the plan file they read (0600: it holds the storage URL), their logs,
    and the restarts of ones that crash."""

    def __init__(self, run: StudyRun, console: Console) -> None:
        self.run, self.settings, self.console = run, run.settings, console
        self.folder = Path(tempfile.mkdtemp(prefix="allconv-search-"))
        self.plan = self.folder / "plan.json"
        self.plan.touch(mode=0o600)
        self.plan.write_text(run.to_json())
        self.gpus = gpu_assignment(self.settings)
        self.restarts_left, self.errors = self.settings.workers, []
        self.procs = {i: self.spawn(i) for i in range(self.settings.workers)}

    def spawn(self, i: int) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.gpus[i] is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[i]
        elif "OMP_NUM_THREADS" not in env:  # CPU workers: share the cores instead of each taking all of them
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.settings.workers))
        log = open(self.folder / f"worker-{i}.log", "ab")  # noqa: SIM115 (the child owns it; closed when we exit)
        cmd = [sys.executable, "-m", "allconv_cli", "search", "--worker", str(self.plan), "--worker-index", str(i)]
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def reap(self, c: Counts) -> None:
        """Handle the processes that exited: a user error (exit 2) is kept, a crash is restarted while useful."""
        for i, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.procs[i]
            log = self.folder / f"worker-{i}.log"
            if code == 2:
                self.errors.append(_last_line(log))
            if code in (0, 2, 130):
                continue
            done = c.waiting == 0 and c.reserved >= self.settings.trials and c.running == 0
            late = self.run.deadline is not None and time.time() >= self.run.deadline
            self.console.print(f"worker {i} (pid {proc.pid}) exited with {code}; log: {log}", highlight=False)
            if self.restarts_left > 0 and not done and not late and not self.errors:
                self.restarts_left -= 1
                self.procs[i] = self.spawn(i)
                self.console.print(f"restarted worker {i} (pid {self.procs[i].pid})", highlight=False)

    def close(self) -> None:
        self.plan.unlink(missing_ok=True)  # it holds the storage URL with its password
        if self.restarts_left == self.settings.workers:  # no crash: the logs are not needed (an error's line is kept)
            shutil.rmtree(self.folder, ignore_errors=True)


def run_processes(run: StudyRun, study: optuna.Study, view: SearchView, console: Console) -> StudyState:
    """``settings.workers`` worker processes until the study is done; crashed ones are restarted, a user error stops
    them all and is raised here, Ctrl-C reaches each once."""
    workers, interrupted = _Processes(run, console), False
    try:
        while workers.procs:
            time.sleep(1.0)
            workers.reap(view.update(study.get_trials(deepcopy=False)))
            if workers.errors and workers.procs:  # a user error stops the search: the others checkpoint and stop
                _interrupt(workers.procs, view, study)
                workers.procs = {}
    except KeyboardInterrupt:
        interrupted = True
        console.print("Interrupted: checkpointing the running trials...")
        _interrupt(workers.procs, view, study)
    view.update(study.get_trials(deepcopy=False))
    workers.close()
    if workers.errors:
        raise AllconvError(workers.errors[0].removeprefix("Error: "))
    if interrupted:
        return StudyState.INTERRUPTED
    c = count_trials(study.get_trials(deepcopy=False))
    return StudyState.COMPLETE if c.finished >= run.settings.trials else StudyState.TIMEOUT


def _interrupt(procs: dict[int, subprocess.Popen[bytes]], view: SearchView, study: optuna.Study) -> None:
    for proc in procs.values():
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGINT)
    _wait_all(list(procs.values()), view, study)


def _wait_all(procs: list[subprocess.Popen[bytes]], view: SearchView, study: optuna.Study,
              timeout: float = 300.0) -> None:
    end = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.time() < end:
            time.sleep(0.5)
            view.update(study.get_trials(deepcopy=False))
    except KeyboardInterrupt:
        pass
    for p in procs:
        if p.poll() is None:
            p.kill()


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return f"a worker failed (no log at {path})"
    return lines[-1] if lines else f"a worker failed (empty log {path})"
