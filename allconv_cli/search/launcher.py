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
from allconv_cli.search.budget import count_trials
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


def run_processes(run: StudyRun, study: optuna.Study, view: SearchView, console: Console) -> StudyState:
    """``settings.workers`` worker processes until the study is done; crashed ones are restarted, a user error stops
    them all and is raised here, Ctrl-C reaches each once."""
    settings = run.settings
    folder = Path(tempfile.mkdtemp(prefix="allconv-search-"))
    plan = folder / "plan.json"
    plan.touch(mode=0o600)  # it holds the storage URL, password included
    plan.write_text(run.to_json())
    gpus = gpu_assignment(settings)

    def spawn(i: int) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpus[i] is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i]
        elif "OMP_NUM_THREADS" not in env:  # CPU workers: share the cores instead of each taking all of them
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // settings.workers))
        log = open(folder / f"worker-{i}.log", "ab")  # noqa: SIM115 (the child owns it; closed when we exit)
        cmd = [sys.executable, "-m", "allconv_cli", "search", "--worker", str(plan), "--worker-index", str(i)]
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    procs = {i: spawn(i) for i in range(settings.workers)}
    restarts_left, errors, interrupted = settings.workers, [], False
    try:
        while procs:
            time.sleep(1.0)
            c = view.update(study.get_trials(deepcopy=False))
            for i, proc in list(procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                del procs[i]
                if code in (0, 130):
                    continue
                log = folder / f"worker-{i}.log"
                if code == 2:
                    errors.append(_last_line(log))
                    continue
                done = c.waiting == 0 and c.reserved >= settings.trials and c.running == 0
                late = run.deadline is not None and time.time() >= run.deadline
                console.print(f"worker {i} (pid {proc.pid}) exited with {code}; log: {log}", highlight=False)
                if restarts_left > 0 and not done and not late and not errors:
                    restarts_left -= 1
                    procs[i] = spawn(i)
                    console.print(f"restarted worker {i} (pid {procs[i].pid})", highlight=False)
            if errors and procs:  # a user error stops the search: the others checkpoint their trials and stop
                _interrupt(procs, view, study)
                procs = {}
    except KeyboardInterrupt:
        interrupted = True
        console.print("Interrupted: checkpointing the running trials...")
        _interrupt(procs, view, study)
    view.update(study.get_trials(deepcopy=False))
    plan.unlink(missing_ok=True)  # it holds the storage URL with its password
    if restarts_left == settings.workers:  # no worker crashed: the logs are not needed (an error's line is kept)
        shutil.rmtree(folder, ignore_errors=True)
    if errors:
        raise AllconvError(errors[0].removeprefix("Error: "))
    if interrupted:
        return StudyState.INTERRUPTED
    c = count_trials(study.get_trials(deepcopy=False))
    return StudyState.COMPLETE if c.finished >= settings.trials else StudyState.TIMEOUT


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
