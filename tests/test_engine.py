"""The training loop: paper defaults, exact resume, determinism, divergence, hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from allconv_cli.config import TrainConfig
from allconv_cli.data import load_dataset
from allconv_cli.engine import (
    CheckpointError,
    EpochMetrics,
    Hooks,
    load_checkpoint,
    make_optimizer,
    resolve_device,
    train,
)
from allconv_cli.errors import AllconvError

CPU = torch.device("cpu")


def tiny(**overrides: object) -> TrainConfig:
    """A config that trains in seconds on CPU: small fake data, model A, BN so it learns fast."""
    base = dict(
        model="A",
        branch="strided",
        dataset="fake",
        subset=320,
        val_size=100,
        preprocess="standardize",
        bn=True,
        batch_size=16,
        epochs=4,
        lr=0.05,
        device="cpu",
    )
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    return load_dataset(tiny().data_config()).to(CPU, channels_last=True)


class Recorder(Hooks):
    def __init__(self, stop_after: int | None = None) -> None:
        self.epochs: list[EpochMetrics] = []
        self.checkpoints: list[tuple[str, int]] = []
        self.stop_after = stop_after

    def on_epoch_end(self, metrics: EpochMetrics) -> None:
        self.epochs.append(metrics)

    def on_checkpoint(self, path: Path, kind: str, epoch: int) -> None:
        assert path.exists()
        self.checkpoints.append((kind, epoch))

    def should_stop(self, metrics: EpochMetrics) -> str | None:
        return "pruned" if self.stop_after is not None and metrics.epoch >= self.stop_after else None


@pytest.mark.unit
def test_paper_defaults() -> None:
    cfg = TrainConfig()
    assert (cfg.optimizer, cfg.momentum, cfg.weight_decay, cfg.lr, cfg.epochs) == ("sgd", 0.9, 1e-3, 0.05, 350)
    assert cfg.lr_milestones() == [200, 250, 300]
    assert TrainConfig(epochs=35).lr_milestones() == [20, 25, 30]
    assert (cfg.dropout_input, cfg.dropout_hidden, cfg.preprocess, cfg.augment) == (0.2, 0.5, "gcn-zca", "none")
    model = torch.nn.Linear(2, 2)
    sgd = make_optimizer(cfg, model, CPU)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] is False and sgd.defaults["momentum"] == 0.9
    assert make_optimizer(TrainConfig(optimizer="nesterov"), model, CPU).defaults["nesterov"] is True
    assert isinstance(make_optimizer(TrainConfig(optimizer="adam"), model, CPU), torch.optim.Adam)


@pytest.mark.e2e
def test_lr_schedule_is_multisteplr(data, tmp_path: Path) -> None:
    """lr x0.1 *after* each milestone epoch, as torch's MultiStepLR (timm's multistep is one epoch earlier)."""
    hooks = Recorder()
    train(tiny(epochs=4, milestones=(2, 3)), data, device=CPU, checkpoint_dir=tmp_path, hooks=hooks)
    assert [m.lr for m in hooks.epochs] == pytest.approx([0.05, 0.05, 0.005, 0.0005])


@pytest.mark.unit
def test_bad_config_values() -> None:
    with pytest.raises(AllconvError, match="optimizer='rmsprop'"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(AllconvError, match=r"milestones=\[5\]"):
        TrainConfig(epochs=4, milestones=(5,))
    if not torch.cuda.is_available():
        with pytest.raises(AllconvError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(AllconvError, match="'tpu:7'"):
        resolve_device("tpu:7")


@pytest.mark.e2e
def test_learns_and_reports(data, tmp_path: Path) -> None:
    hooks = Recorder()
    result = train(tiny(epochs=3), data, device=CPU, checkpoint_dir=tmp_path, hooks=hooks)
    assert result.status == "finished" and result.epochs_completed == 3
    assert [m.epoch for m in hooks.epochs] == [1, 2, 3]
    assert hooks.epochs[-1].train_loss < hooks.epochs[0].train_loss
    # chance is 0.1 (sd 0.03 on 100 images); the fake data needs many more steps to be learnt well
    assert result.val_accuracy is not None and result.val_accuracy > 0.2
    assert result.test_accuracy is not None and result.test_accuracy > 0.2
    assert ("last", 3) in hooks.checkpoints and any(kind == "best" for kind, _ in hooks.checkpoints)
    assert result.images_per_second > 0


@pytest.mark.e2e
def test_same_seed_same_metrics(data, tmp_path: Path) -> None:
    runs = [train(tiny(epochs=2), data, device=CPU, checkpoint_dir=tmp_path / str(i)) for i in range(2)]
    assert runs[0].history[-1]["train_loss"] == runs[1].history[-1]["train_loss"]
    assert runs[0].test_accuracy == runs[1].test_accuracy
    for a, b in zip(runs[0].model.state_dict().values(), runs[1].model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other = train(tiny(epochs=2, seed=1), data, device=CPU, checkpoint_dir=tmp_path / "other")
    assert other.history[-1]["train_loss"] != runs[0].history[-1]["train_loss"]


@pytest.mark.e2e
@pytest.mark.parametrize("augment", ["none", "flip-translate"])
def test_resume_is_exact(data, tmp_path: Path, augment: str) -> None:
    """4 epochs straight == 2 epochs, then resume from the checkpoint for 2 more: same weights, same metrics."""
    cfg = tiny(epochs=4, augment=augment)
    straight = train(cfg, data, device=CPU, checkpoint_dir=tmp_path / "straight")
    first = train(cfg, data, device=CPU, checkpoint_dir=tmp_path / "split", hooks=Recorder(stop_after=2))
    assert first.status == "pruned" and first.epochs_completed == 2
    resumed = train(
        cfg, data, device=CPU, checkpoint_dir=tmp_path / "resumed", resume_from=tmp_path / "split" / "last.pt"
    )
    assert resumed.epochs_completed == 4 and len(resumed.history) == 4
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert resumed.history == [
        {k: v for k, v in h.items() if k not in ("epoch_seconds", "images_per_second")}
        | {k: r[k] for k in ("epoch_seconds", "images_per_second")}
        for h, r in zip(straight.history, resumed.history, strict=True)
    ]
    assert resumed.test_accuracy == straight.test_accuracy


@pytest.mark.e2e
def test_divergence_ends_cleanly(data, tmp_path: Path) -> None:
    result = train(tiny(epochs=3, lr=1e8, bn=False), data, device=CPU, checkpoint_dir=tmp_path)
    assert result.status == "diverged"
    assert "nan" in result.reason or "inf" in result.reason
    assert result.test_accuracy is None


@pytest.mark.unit
def test_corrupted_checkpoint_is_detected(tmp_path: Path) -> None:
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.e2e
def test_interrupt_keeps_last_checkpoint(data, tmp_path: Path) -> None:
    class CtrlC(Hooks):
        def on_batch_end(self, epoch: int, images_seen: int, images_total: int) -> None:
            if epoch == 2 and images_seen > 64:
                raise KeyboardInterrupt

    result = train(tiny(epochs=4), data, device=CPU, checkpoint_dir=tmp_path, hooks=CtrlC())
    assert result.status == "interrupted" and result.epochs_completed == 1
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1


@pytest.mark.e2e
def test_dead_network_is_stopped_as_collapsed(data, tmp_path: Path) -> None:
    """Weights of std 1e-20: activations underflow to 0 after a few layers, every ReLU is dead, the output is
    constant and no gradient can ever revive it."""
    cfg = tiny(epochs=10, bn=False, init="gaussian", init_std=1e-20, collapse_patience=3)
    result = train(cfg, data, device=CPU, checkpoint_dir=tmp_path)
    assert result.status == "collapsed" and result.epochs_completed == 3
    assert "dead ReLUs" in result.reason and result.test_accuracy is None
    healthy = train(tiny(epochs=2, collapse_patience=1), data, device=CPU, checkpoint_dir=tmp_path / "ok")
    assert healthy.status == "finished"
