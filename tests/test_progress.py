"""What a run shows while it runs: the measured time estimate, the stages, the epochs, the study line.

A real fake-data study (subprocess, stdout a pipe) checks the estimate against the trials' own wall time and the plain
lines a log gets; another one in a pseudo-terminal of 80 columns checks the live view; unit tests check the
estimate's arithmetic, the rendering at 80 columns (no name or number cut), the pace of plain progress lines and the
cost of the per-step hook.
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState
from rich.cells import cell_len
from rich.console import Console

from allconv_cli import estimate
from allconv_cli.engine import EpochMetrics
from allconv_cli.progress import RunTracker, TerminalView
from allconv_cli.search.plan import SearchSettings
from allconv_cli.search.view import SearchView
from allconv_cli.tracking.schema import MlflowTag

ALLCONV = [sys.executable, "-m", "allconv_cli"]
SPACE = """description: lr only (nothing that changes a trial's time)
sampler: random
fixed: {batch_size: 32}
params:
  lr: {type: float, low: 0.01, high: 0.1, log: true}
"""
# 192 training images in batches of 32: 6 steps an epoch (~0.3-1 s each for model A on a busy 2-core machine), 3
# epochs, 2 trials: long enough that the steps, not the fixed costs, set the time; ~30-70 s in all
STUDY = ["--model", "A", "--branch", "model", "--dataset", "fake", "--subset", "192", "--val-size", "64",
         "--preprocess", "standardize", "--device", "cpu", "--epochs", "3", "--trials", "2", "--pruner", "none",
         "--space", "lr.yaml", "--study-name", "timed"]
UNITS = {"s": 1, "min": 60, "h": 3600, "days": 86400}


def env_for(folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k not in ("COLUMNS", "LINES")}
    env.update(ALLCONV_CACHE_DIR=str(folder / "cache"), ALLCONV_FAKE_SIZES="400,64", PYTHONUNBUFFERED="1")
    return env


def seconds_of(text: str) -> float:
    """``~4.5 min`` -> 270.0 (what :func:`allconv_cli.estimate.duration` writes)."""
    number, unit = re.fullmatch(r"~?([\d.,]+) (s|min|h|days)", text.strip()).groups()
    return float(number.replace(",", "")) * UNITS[unit]


@pytest.fixture(scope="module")
def timed_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 2-trial, 3-epoch study of model A on fake data, stdout a pipe (not a terminal): its folder and output."""
    folder = tmp_path_factory.mktemp("timed")
    (folder / "lr.yaml").write_text(SPACE)
    run = subprocess.run([*ALLCONV, "search", *STUDY], cwd=folder, env=env_for(folder), capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return folder, run.stdout


@pytest.mark.e2e
def test_the_estimate_is_within_2x_of_the_trials_wall_time(timed_study: tuple[Path, str]) -> None:
    folder, out = timed_study
    line = next(line for line in out.splitlines() if line.startswith("Estimate on "))
    assert line.startswith("Estimate on cpu (--device cpu), ") and "one trial ~" in line and "(3 epochs)" in line
    predicted = seconds_of(re.search(r"the study (~[\d.,]+ \w+) \(2 trials to run", line).group(1))
    study = optuna.load_study(study_name="timed", storage=f"sqlite:///{folder / 'optuna.db'}")
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    measured = sum(t.duration.total_seconds() for t in trials)  # one worker: the trials ran one after the other
    print(f"estimated {predicted:.0f} s, the trials took {measured:.1f} s ({predicted / measured:.2f}x); "
          f"load average {os.getloadavg()[0]:.1f}")
    assert measured / 2 <= predicted <= measured * 2
    # the same line is in the parent run's description
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    parent = client.search_runs([client.get_experiment_by_name("allconv").experiment_id],
                                "tags.`allconv.role` = 'study'")[0]
    assert line in parent.data.tags[MlflowTag.NOTE]


@pytest.mark.e2e
def test_a_log_gets_plain_lines_at_a_sensible_rate(timed_study: tuple[Path, str]) -> None:
    _, out = timed_study
    lines = out.splitlines()
    stages = ["making the fake dataset (400 + 64 images) ...", "opening the Optuna study and its MLflow parent run",
              "measuring the training step of allconv_a_model (batch 32) for the estimate ..."]
    for stage in stages:
        assert any(line.startswith(stage) for line in lines), stage
    order = [next(i for i, line in enumerate(lines) if line.startswith(s)) for s in stages]
    estimate_at = next(i for i, line in enumerate(lines) if line.startswith("Estimate on "))
    first_epoch = next(i for i, line in enumerate(lines) if line.startswith("trial 0 epoch 1/3 "))
    assert order == sorted(order) and order[-1] < estimate_at < first_epoch, "stages, then the estimate, then trials"
    for trial in range(2):
        epochs = [line for line in lines if line.startswith(f"trial {trial} epoch ")]
        assert [e.split()[3] for e in epochs] == ["1/3", "2/3", "3/3"], epochs  # each finished epoch, once
        assert all("val loss" in e and "img/s" in e for e in epochs)
        assert any(line.startswith(f"trial {trial}: starting its MLflow run") for line in lines)
    study_lines = [line for line in lines if line.startswith("study timed: ")]
    assert [line.split(": ")[1].split(",")[0] for line in study_lines] == ["1/2 done", "2/2 done"]
    assert all("0 pruned, 0 failed, 0 running" in line for line in study_lines), study_lines
    assert "~" in study_lines[0] and "left" in study_lines[0] and "left" not in study_lines[-1]
    assert not any("━" in line or "\r" in line or "\x1b" in line for line in lines), "no live bars in a log"
    assert len(lines) < 60, f"{len(lines)} lines: a line per batch?"


def run_in_pty(cmd: list[str], cwd: Path, env: dict[str, str], cols: int = 80, rows: int = 40,
               timeout: float = 600) -> tuple[int, str]:
    """Run ``cmd`` with a pseudo-terminal of ``cols`` x ``rows`` as its stdin, stdout and stderr; its exit code and
    everything it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env={**env, "TERM": "xterm"},
                            close_fds=True, start_new_session=True)
    os.close(slave)
    out, deadline = bytearray(), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            try:
                chunk = os.read(master, 65536) if ready else b""
            except OSError:  # EIO: the child closed the terminal
                break
            if ready and not chunk:
                break
            out += chunk
        else:
            proc.kill()
            raise AssertionError(f"timed out: {out[-2000:]!r}")
    finally:
        os.close(master)
    return proc.wait(timeout=60), out.decode("utf-8", errors="replace")


def screen_lines(raw: str) -> list[str]:
    """The text lines a terminal was sent: colours dropped, split where the cursor moved (up a line, to its start)
    or the line was erased."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", raw)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]", "\n", text)
    return [line for line in re.split(r"\r\n|\n|\r", text) if line.strip()]


@pytest.mark.e2e
def test_the_live_view_on_an_80_column_terminal(tmp_path: Path) -> None:
    name = "a-study-name-long-enough-to-crowd-the-study-line"
    (tmp_path / "lr.yaml").write_text(SPACE.replace("batch_size: 32", "batch_size: 16"))
    # 4 steps of 16 an epoch, 2 epochs, 2 trials: ~20-40 s, long enough for the view to refresh inside each epoch
    args = [*STUDY[:STUDY.index("--subset")], "--subset", "64", "--val-size", "32", "--preprocess", "standardize",
            "--device", "cpu", "--epochs", "2", "--trials", "2", "--pruner", "median", "--space", "lr.yaml",
            "--study-name", name]
    code, raw = run_in_pty([*ALLCONV, "search", *args], tmp_path, {**env_for(tmp_path),
                                                                     "ALLCONV_FAKE_SIZES": "200,32"})
    lines = screen_lines(raw)
    assert code == 0, raw[-3000:]
    assert "Traceback" not in raw
    # every line fits, but the study's address: one logical line that the terminal wraps, so a click or a copy
    # gets all of it (a newline inside would break it)
    wide = [line for line in lines if cell_len(line) > 80]
    assert all(line.startswith("Open the study (after `mlflow ui` in this folder): http") for line in wide), wide
    assert re.search(r"http://127\.0\.0\.1:5000/#/experiments/\d+/runs/[0-9a-f]{32}\?workflowType=machine_learning\r?\n",
                     raw)
    assert any("━" in line and line.startswith(f"study {name}") for line in lines), "the live study bar"
    assert any(re.match(r"trial [01] epoch [12]/2 ", line) and "━" in line for line in lines), "a live trial bar"
    assert any("0 failed, 1 running" in line for line in lines), "the trial that trains counts as running"
    assert "…" not in raw, "nothing cut with an ellipsis"
    assert not any(re.fullmatch(r"\s*(s|min|h|days)\)?", line) for line in lines), "a duration split across lines"
    # a word is never cut: the long name and the estimate's words arrive whole
    assert all(name in line for line in lines if "a-study-name" in line)
    assert any(line.startswith("Estimate on cpu (--device cpu),") for line in lines)
    assert "trial   0 complete" in raw and "trial   1 complete" in raw
    assert "Wall time" in raw and "Open the study" in raw


# --------------------------------------------------------------------------------------------------------------------
# units: the arithmetic, the rendering, the pace


def measurement(on_cpu: bool = True, step: float = 2.0) -> estimate.Measurement:
    return estimate.Measurement("cpu (test)", on_cpu, step, 0.005, 128, parallel_devices=1 if on_cpu else 4)


@pytest.mark.unit
def test_the_estimate_adds_steps_evaluations_epochs_and_trials() -> None:
    sizes = estimate.Sizes(45_000, 5_000, 10_000)
    e = estimate.Estimate(measurement(), sizes, epochs=350, runs=40, workers=4, at_most=True, varies=("batch_size",))
    assert e.steps_per_epoch == 351
    assert e.epoch_seconds == pytest.approx(351 * 2.0 + 5_000 * 0.005)
    assert e.run_seconds == pytest.approx(350 * e.epoch_seconds + 10_000 * 0.005)
    assert e.parallel == 1, "CPU workers share the cores"
    assert e.total_seconds == pytest.approx(40 * e.run_seconds)
    line = e.line()
    assert "one epoch ~12 min (351 steps + evaluation)" in line and "one trial ~2.9 days (350 epochs)" in line
    assert "the study at most ~" in line and "the space samples batch_size" in line
    assert e.too_slow() and "Over a day on a CPU: use a GPU" in line
    # 39 steps of 2 s + 5,000 validation images an epoch, 20 epochs and the test: ~35 min, 40 in a day
    assert "with --subset 5000 --epochs 20 one trial takes ~35 min here, so --trials 40 fit in a day" in line
    on_gpus = estimate.Estimate(measurement(on_cpu=False), sizes, epochs=350, runs=40, workers=8)
    assert on_gpus.parallel == 4 and on_gpus.total_seconds == pytest.approx(10 * on_gpus.run_seconds)
    assert not on_gpus.too_slow() and "Over a day" not in on_gpus.line()
    train = estimate.Estimate(measurement(step=0.01), estimate.Sizes(1000, 0, 100), epochs=3, test_every=1)
    assert "one run ~" in train.line(study=False) and "study" not in train.line(study=False)
    assert train.eval_seconds == pytest.approx((1000 + 100) * 0.005), "no validation: the health pass, + the test"


@pytest.mark.unit
def test_durations_read_short() -> None:
    assert [estimate.duration(s) for s in (42, 270, 720, 5.2 * 3600, 3.04 * 86400, 116 * 86400)] == [
        "42 s", "4.5 min", "12 min", "5.2 h", "3.0 days", "116 days"]


@pytest.mark.unit
def test_the_device_says_why() -> None:
    device, words = estimate.describe_device("cpu")
    assert device.type == "cpu" and words.startswith("cpu (--device cpu), ") and words.endswith(" threads")


def settings(name: str, trials: int = 40) -> SearchSettings:
    return SearchSettings(study_name=name, storage_url="sqlite:///optuna.db", experiment="allconv", space_source="x",
                          space_name="x", space_text="params: {lr: {type: float, low: 0.01, high: 0.1}}\n",
                          base_config={"epochs": 350}, trials=trials)


def rendered(view: TerminalView, width: int = 80) -> list[str]:
    console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
    for renderable in view.lines(width):
        console.print(renderable)
    return console.file.getvalue().splitlines()


@pytest.mark.unit
def test_the_live_lines_fit_80_columns_and_cut_no_word() -> None:
    name = "allconv_c_allcnn-a-very-long-space-name-that-a-user-chose"
    view = SearchView(Console(file=io.StringIO(), width=80), settings(name), plain=False)
    view.estimate = estimate.Estimate(measurement(), estimate.Sizes(45_000, 5_000, 10_000), 350, runs=40,
                                      at_most=True)
    view.start_trial(7, 350)
    view.on_start(type("Cfg", (), {"epochs": 350})(), None, 0)
    view.on_batch_end(1, 12_032, 44_928)
    view.current_stage = ("loading the cached gcn-zca (GCN + ZCA) fit from /home/someone/.cache/allconv/preprocess",
                          time.perf_counter())
    lines = rendered(view)
    assert max(cell_len(line) for line in lines) <= 80, lines
    text = " ".join(lines)
    assert f"study {name}" in text and "0/40 done" in text and "at most ~" in text
    assert "trial 7 epoch 1/350" in text and "27%" in text and "trial ~" in text
    assert "/home/someone/.cache/allconv/preprocess" in text
    for width in (40, 60, 120):  # narrower or wider: still within the width, the name still whole
        assert max(cell_len(line) for line in rendered(view, width)) <= width
        assert name in " ".join(rendered(view, width)) or width < len(name)


@pytest.mark.unit
def test_trials_in_other_processes_show_their_epochs_from_the_storage() -> None:
    out = io.StringIO()
    view = SearchView(Console(file=out, width=80), settings("elsewhere", trials=4), plain=True)
    study = optuna.create_study(direction="maximize")
    running = study.ask()
    running.report(0.41, 1)
    running.report(0.47, 2)
    study.tell(study.ask(), 0.5)
    c = view.update(study.get_trials(deepcopy=False))
    assert (c.finished, c.running) == (1, 1)
    assert view.elsewhere == {0: (2, 350, 0.47)}
    text = out.getvalue()
    assert "trial 0 epoch 2/350 done in another process: val 47.00%" in text
    assert "study elsewhere: 1/4 done, 0 pruned, 0 failed, 1 running" in text
    live = SearchView(Console(file=io.StringIO(), width=80), settings("elsewhere", trials=4), plain=False)
    live.update(study.get_trials(deepcopy=False))
    assert any(line.startswith("trial 0 epoch 2/350") for line in rendered(live))
    assert "in another process" in " ".join(rendered(live))


def metrics(epoch: int) -> EpochMetrics:
    return EpochMetrics(epoch=epoch, train_loss=2.0, train_accuracy=0.2, lr=0.05, epoch_seconds=0.01,
                        images_per_second=1e5, val_loss=None, val_accuracy=0.25)


@pytest.mark.unit
def test_plain_progress_inside_an_epoch_comes_at_most_every_30_s() -> None:
    out = io.StringIO()
    view = TerminalView(Console(file=out, width=200), plain=True)
    run = view.track("train", expected_epoch=100.0)
    run.on_start(type("Cfg", (), {"epochs": 3})(), None, 0)
    for seen in range(64, 64_001, 64):  # a thousand steps in well under 30 s: no progress line
        run.on_batch_end(1, seen, 64_000)
    assert out.getvalue() == ""
    run.last_line -= 31  # 31 s later
    run.on_batch_end(1, 32_000, 64_000)
    run.on_batch_end(1, 32_064, 64_000)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train epoch 1/3: 32,000/64,000 images (50%), epoch ~")
    run.on_epoch_end(metrics(1))
    assert out.getvalue().splitlines()[-1].startswith("train epoch 1/3  lr 0.05  train loss 2.0000 acc 20.00%  "
                                                      "val loss - acc 25.00%")


@pytest.mark.unit
def test_the_per_step_hook_is_cheap() -> None:
    for plain in (False, True):
        run = RunTracker(TerminalView(Console(file=io.StringIO()), plain=plain), "x")
        start = time.perf_counter()
        for seen in range(100_000):
            run.on_batch_end(1, seen, 100_000)
        assert time.perf_counter() - start < 1.0, "10 µs a step at most, on a busy machine"


@pytest.mark.unit
def test_a_log_hears_a_long_stage_again_but_not_more_often_than_the_pace() -> None:
    out = io.StringIO()
    with TerminalView(Console(file=out, width=200), plain=True, plain_every=0.3) as view:
        view.stage("baseline: 3 + 20 steps through a DataLoader")
        time.sleep(1.2)  # a stage that lasts four paces
        view.say("evaluation: 5,000 images")
        time.sleep(0.15)  # under one pace since the last line: nothing more
    lines = out.getvalue().splitlines()
    assert lines[0] == "baseline: 3 + 20 steps through a DataLoader ..."
    again = [line for line in lines if line.startswith("baseline: 3 + 20 steps through a DataLoader: still going, ")]
    assert 2 <= len(again) <= 4, lines  # one each 0.3 s of silence (checked every 0.075 s), never a burst
    assert lines[-1] == "evaluation: 5,000 images", "no line within a pace of the last one"
    assert lines == [lines[0], *again, lines[-1]]
