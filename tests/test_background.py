"""The epoch loop's records off the training thread: the writer keeps order and a bound, surfaces errors on the
training thread, and loses nothing at the end of a run or on Ctrl-C; the same through ``run_tracked`` and MLflow."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.tracking._tracking_service import utils as mlflow_uri

from allconv_cli.background import BackgroundWriter
from allconv_cli.config import TrainConfig
from allconv_cli.data import load_dataset
from allconv_cli.engine import EpochMetrics, Hooks, load_checkpoint, train
from allconv_cli.errors import AllconvError
from allconv_cli.tracking.run import MlflowHooks, run_tracked
from allconv_cli.tracking.schema import Status, Tag

CPU = torch.device("cpu")


def tiny(**overrides: object) -> TrainConfig:
    base = dict(model="A", branch="strided", dataset="fake", subset=320, val_size=100, preprocess="standardize",
                bn=True, batch_size=16, epochs=2, lr=0.05, device="cpu")
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def data():
    return load_dataset(tiny().data_config()).to(CPU, channels_last=True)


@pytest.mark.unit
def test_jobs_run_in_order_off_the_calling_thread_and_close_waits_for_all() -> None:
    done: list[tuple[int, str]] = []
    with BackgroundWriter(maxsize=2) as writer:
        for i in range(6):
            writer.submit(lambda i=i: (time.sleep(0.01), done.append((i, threading.current_thread().name))))
    assert [i for i, _ in done] == list(range(6)), "close waits for every job, in submission order"
    assert {name for _, name in done} == {"allconv-writer"}


@pytest.mark.unit
def test_the_queue_is_bounded_submit_waits() -> None:
    release = threading.Event()
    writer = BackgroundWriter(maxsize=1)
    writer.submit(release.wait)  # the worker is busy with this one
    writer.submit(lambda: None)  # fills the queue
    blocked = threading.Thread(target=writer.submit, args=(lambda: None,))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive(), "a third job waits while the queue is full"
    release.set()
    blocked.join(5)
    assert not blocked.is_alive()
    writer.close()


@pytest.mark.unit
def test_an_error_surfaces_on_the_submitting_thread_and_later_jobs_are_skipped() -> None:
    ran: list[int] = []

    def fail() -> None:
        raise AllconvError("upload failed")

    writer = BackgroundWriter()
    writer.submit(fail)
    writer.submit(ran.append, 1)
    with pytest.raises(AllconvError, match="upload failed"):
        writer.flush()
    assert ran == [], "a job after a failed one is skipped"
    writer.close()  # raised once: closing afterwards is quiet

    writer = BackgroundWriter()
    writer.submit(fail)
    deadline = time.monotonic() + 60
    with pytest.raises(AllconvError, match="upload failed"):  # a hand-over after the failure raises it
        while time.monotonic() < deadline:
            writer.submit(ran.append, 2)
            time.sleep(0.01)
    writer.close()
    assert ran == []
    with pytest.raises(AllconvError, match="upload failed"), BackgroundWriter() as writer:
        writer.submit(fail)  # leaving the block raises it


@pytest.mark.unit
def test_an_exception_on_the_way_out_waits_for_the_jobs_and_keeps_the_writer_error_as_a_note() -> None:
    done: list[int] = []

    def fail() -> None:
        raise OSError("disk full")

    with pytest.raises(KeyboardInterrupt) as caught, BackgroundWriter() as writer:
        writer.submit(lambda: (time.sleep(0.2), done.append(1)))
        writer.submit(fail)
        raise KeyboardInterrupt
    assert done == [1], "Ctrl-C still waits for the jobs handed over"
    assert any("disk full" in note for note in caught.value.__notes__)


class SlowRecorder(Hooks):
    """Records on the writer thread, slowly (as an upload to a remote store), and where each call ran."""

    def __init__(self, interrupt_in: int | None = None, fail_on: str | None = None) -> None:
        self.checkpoints: list[tuple[str, int, int]] = []  # kind, epoch, the checkpoint's epoch on disk
        self.records: list[int] = []
        self.threads: set[str] = set()
        self.interrupt_in, self.fail_on = interrupt_in, fail_on

    def on_epoch_record(self, metrics: EpochMetrics) -> None:
        self.threads.add(threading.current_thread().name)
        time.sleep(0.2)
        self.records.append(metrics.epoch)

    def on_checkpoint(self, path: Path, kind: str, epoch: int) -> None:
        self.threads.add(threading.current_thread().name)
        if kind == self.fail_on:
            raise AllconvError(f"cannot upload {path.name}")
        time.sleep(0.5)
        self.checkpoints.append((kind, epoch, load_checkpoint(path)["epoch"]))

    def on_batch_end(self, epoch: int, images_seen: int, images_total: int) -> None:
        if epoch == self.interrupt_in and images_seen >= 32:
            raise KeyboardInterrupt


@pytest.mark.e2e
def test_records_run_off_the_training_thread_and_are_complete_when_train_returns(data, tmp_path: Path) -> None:
    hooks = SlowRecorder()
    result = train(tiny(), data, device=CPU, checkpoint_dir=tmp_path, hooks=hooks)
    assert result.status == "finished" and Status(result.status) == Status.FINISHED
    assert hooks.threads == {"allconv-writer"}
    assert hooks.records == [1, 2]
    assert [(k, e) for k, e, _ in hooks.checkpoints if k == "last"] == [("last", 1), ("last", 2)]
    assert all(e == on_disk for k, e, on_disk in hooks.checkpoints if k == "last"), "written before reported"


@pytest.mark.e2e
def test_ctrl_c_waits_for_the_last_checkpoint_and_its_upload(data, tmp_path: Path) -> None:
    hooks = SlowRecorder(interrupt_in=2)
    result = train(tiny(epochs=3), data, device=CPU, checkpoint_dir=tmp_path, hooks=hooks)
    assert result.status == "interrupted" and result.epochs_completed == 1
    assert result.reason == "interrupted during epoch 2; the last checkpoint holds epoch 1"
    assert ("last", 1, 1) in hooks.checkpoints, "the slow upload of epoch 1 finished before train returned"
    assert hooks.records == [1] and load_checkpoint(tmp_path / "last.pt")["epoch"] == 1


@pytest.mark.e2e
def test_an_upload_error_ends_the_run_on_the_training_thread(data, tmp_path: Path) -> None:
    with pytest.raises(AllconvError, match=r"cannot upload best\.pt"):
        train(tiny(epochs=3), data, device=CPU, checkpoint_dir=tmp_path, hooks=SlowRecorder(fail_on="best"))


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowClient]:
    for key in [k for k in os.environ if k.startswith(("MLFLOW_", "ALLCONV_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(mlflow_uri, "_tracking_uri", None)
    monkeypatch.chdir(tmp_path)
    yield MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def slow_uploads(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> None:
    """MlflowHooks' uploads take 1 s each (a slow remote store), or fail as one whose retry budget ran out."""
    real = MlflowHooks.on_checkpoint

    def upload(self: MlflowHooks, path: Path, kind: str, epoch: int) -> None:
        if fail and epoch == 2:
            raise AllconvError("the MLflow store did not answer")
        time.sleep(1.0)
        real(self, path, kind, epoch)

    monkeypatch.setattr(MlflowHooks, "on_checkpoint", upload)


@pytest.mark.e2e
def test_run_tracked_returns_with_the_last_checkpoint_uploaded(data, store: MlflowClient,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    slow_uploads(monkeypatch)
    outcome = run_tracked(tiny(epochs=2), experiment="bg", data=data, log_model=False)
    run = store.get_run(outcome.run_id)
    assert outcome.result.status == Status.FINISHED and run.info.status == "FINISHED"
    assert run.data.tags[Tag.CHECKPOINT_LAST_EPOCH] == "2"
    assert {a.path for a in store.list_artifacts(outcome.run_id, "checkpoints")} == {
        "checkpoints/last.pt", "checkpoints/best.pt"}
    assert [m.step for m in store.get_metric_history(outcome.run_id, "val_accuracy")] == [1, 2]


@pytest.mark.e2e
def test_run_tracked_on_ctrl_c_keeps_the_uploaded_last_checkpoint(data, store: MlflowClient, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    slow_uploads(monkeypatch)
    outcome = run_tracked(tiny(epochs=3), experiment="bg", data=data, log_model=False,
                          hooks=[SlowRecorder(interrupt_in=2)])
    run = store.get_run(outcome.run_id)
    assert outcome.result.status == Status.INTERRUPTED and run.info.status == "KILLED"
    assert run.data.tags[Tag.CHECKPOINT_LAST_EPOCH] == "1"
    path = store.download_artifacts(outcome.run_id, "checkpoints/last.pt", str(tmp_path))
    assert load_checkpoint(path)["epoch"] == 1


@pytest.mark.e2e
def test_run_tracked_raises_an_upload_error_and_marks_the_run_failed(data, store: MlflowClient,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    slow_uploads(monkeypatch, fail=True)
    with pytest.raises(AllconvError, match="did not answer"):
        run_tracked(tiny(epochs=3), experiment="bg", data=data, log_model=False)
    (run,) = store.search_runs([store.get_experiment_by_name("bg").experiment_id])
    assert run.info.status == "FAILED" and "did not answer" in run.data.tags[Tag.REASON]
    assert run.data.tags[Tag.CHECKPOINT_LAST_EPOCH] == "1"

