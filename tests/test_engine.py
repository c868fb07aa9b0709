"""The training loop: paper defaults, exact resume, determinism, divergence, hooks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from allconv_cli.config import TrainConfig
from allconv_cli.data import Split, load_dataset
from allconv_cli.engine import (
    CheckpointError,
    EpochMetrics,
    Hooks,
    load_checkpoint,
    make_optimizer,
    resolve_device,
    steps_per_epoch,
    train,
)
from allconv_cli.errors import AllconvError
from allconv_cli.evaluation import dead_from_range, evaluate_split

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
@pytest.mark.usefixtures("flush_denormals")
def test_dead_network_is_stopped_as_collapsed(data, tmp_path: Path) -> None:
    """Weights of std 1e-20: activations underflow to 0 after a few layers, every ReLU is dead, the output is
    constant and no gradient can ever revive it."""
    cfg = tiny(epochs=10, bn=False, init="gaussian", init_std=1e-20, collapse_patience=3)
    result = train(cfg, data, device=CPU, checkpoint_dir=tmp_path)
    assert result.status == "collapsed" and result.epochs_completed == 3
    assert "dead ReLUs" in result.reason and result.test_accuracy is None
    healthy = train(tiny(epochs=2, collapse_patience=1), data, device=CPU, checkpoint_dir=tmp_path / "ok")
    assert healthy.status == "finished"


@pytest.mark.unit
def test_default_decays_sit_at_4_5_6_sevenths_of_the_steps() -> None:
    """The paper's epochs 200, 250, 300 of 350, by optimizer step; explicit --milestones stay epochs."""
    assert TrainConfig().lr_milestone_steps(351) == [200 * 351, 250 * 351, 300 * 351]
    assert TrainConfig(epochs=2).lr_milestone_steps(13) == [15, 19, 22]  # 26 steps: all three inside epoch 2
    assert TrainConfig(epochs=2).lr_milestones() == [1.143, 1.429, 1.714]  # what the lr_milestones param says
    assert TrainConfig(epochs=4, milestones=(2, 3)).lr_milestone_steps(13) == [26, 39]
    assert TrainConfig(epochs=4, milestones=(2, 3)).lr_milestones() == [2, 3]
    assert TrainConfig(epochs=2).to_params()["lr_milestones"] == "[1.143, 1.429, 1.714]"
    assert TrainConfig().to_params()["lr_milestones"] == "[200, 250, 300]"
    assert steps_per_epoch(220, 16) == 13 and steps_per_epoch(10, 16) == 1 and steps_per_epoch(32, 16) == 2


class LrPerStep(Hooks):
    """The lr of every optimizer step, read from the optimizer that on_start's model trains with."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.optimizer: torch.optim.Optimizer | None = None

    def on_batch_end(self, epoch: int, images_seen: int, images_total: int) -> None:
        self.lrs.append(self.optimizer.param_groups[0]["lr"])  # the lr the *next* step uses


@pytest.mark.e2e
def test_a_two_epoch_run_decays_inside_its_second_epoch_and_resumes_exactly(data, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20: --epochs 2 used to train its whole second epoch at lr/1000. Now epoch 2 starts at the full lr
    and decays after steps 23, 29 and 34 of 40 (320 images, batch 16); a run stopped after epoch 1 resumes onto
    the same steps."""
    from allconv_cli import engine

    real_setup, hooks = engine.setup, LrPerStep()

    def setup(*args, **kwargs):
        state = real_setup(*args, **kwargs)
        hooks.optimizer = state.optimizer
        return state

    monkeypatch.setattr(engine, "setup", setup)
    cfg = tiny(epochs=2)
    assert steps_per_epoch(len(data.train), cfg.batch_size) == 20
    assert cfg.lr_milestone_steps(20) == [23, 29, 34]
    straight = train(cfg, data, device=CPU, checkpoint_dir=tmp_path / "straight", hooks=hooks)
    assert [h["lr"] for h in straight.history] == [0.05, 0.05]
    expected = [0.05] * 22 + [0.005] * 6 + [0.0005] * 5 + [0.00005] * 7  # the lr after steps 1..40
    assert hooks.lrs == pytest.approx(expected)
    train(cfg, data, device=CPU, checkpoint_dir=tmp_path / "split", hooks=Recorder(stop_after=1))
    hooks.lrs = []
    resumed = train(cfg, data, device=CPU, checkpoint_dir=tmp_path / "resumed", hooks=hooks,
                    resume_from=tmp_path / "split" / "last.pt")
    assert hooks.lrs == pytest.approx(expected[20:])
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert resumed.history[-1]["train_loss"] == straight.history[-1]["train_loss"]


class EvalPasses(Hooks):
    """Counts the network's forward calls in eval mode (evaluation passes are batches of up to 1,000)."""

    def __init__(self) -> None:
        self.calls = 0

    def on_start(self, cfg: TrainConfig, model: torch.nn.Module, start_epoch: int) -> None:
        model.register_forward_hook(self.count)

    def count(self, module: torch.nn.Module, args: object, output: object) -> None:
        self.calls += not module.training


@pytest.mark.e2e
def test_one_evaluation_pass_per_epoch_gives_loss_accuracy_and_both_dead_signs(data, tmp_path: Path) -> None:
    """100 validation images are one batch: 3 epochs are 3 passes, plus the final test pass (2,000 fake test
    images: 2 batches). Without a validation split the pass covers the first 5,000 training images (one batch here)
    and still yields alive classes; its loss and accuracy are not reported as validation figures."""
    hooks = EvalPasses()
    result = train(tiny(epochs=3), data, device=CPU, checkpoint_dir=tmp_path / "a", hooks=hooks)
    assert result.status == "finished" and hooks.calls == 3 + math.ceil(len(data.test) / 1000)
    assert all(0 <= h["alive_classes"] <= 10 and "val_loss" in h for h in result.history)
    no_val = load_dataset(tiny(val_size=0).data_config()).to(CPU, channels_last=True)
    hooks = EvalPasses()
    result = train(tiny(epochs=2, val_size=0), no_val, device=CPU, checkpoint_dir=tmp_path / "b", hooks=hooks)
    assert hooks.calls == 2 * math.ceil(min(len(no_val.train), 5000) / 1000) + math.ceil(len(no_val.test) / 1000)
    assert all("alive_classes" in h and "val_loss" not in h for h in result.history)
    assert result.dead_classes is not None


@pytest.mark.unit
def test_the_one_pass_matches_separate_measurements() -> None:
    """evaluate_split == loss/accuracy by hand, the dead classes from the score range, and the constant check on
    the first 256 inputs even when they span several batches."""
    torch.manual_seed(0)
    x, y = torch.randn(600, 3, 32, 32), torch.randint(0, 10, (600,))
    split = Split(x, y)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10), torch.nn.ReLU())
    got = evaluate_split(net, split, amp=False, batch_size=100)
    with torch.no_grad():
        logits = net(x)
    assert got.loss == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert got.accuracy == (logits.argmax(1) == y).sum().item() / len(y)
    assert got.dead_classes == dead_from_range(logits.amax(0), logits.amin(0), head_relu=True)
    assert not got.constant
    dead = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    torch.nn.init.zeros_(dead[1].weight)
    got = evaluate_split(dead, split, amp=False, batch_size=100, head_relu=False)
    assert got.constant and got.dead_classes == tuple(range(10))  # the bias for every input: no class responds
    # constant on the first 256 only: inputs after them differ, and are not looked at for this sign
    later = Split(torch.cat([torch.zeros(256, 3, 32, 32), x[:44]]), y[:300])
    assert evaluate_split(net, later, amp=False, batch_size=100).constant
    assert not evaluate_split(net, later, amp=False, batch_size=100, constant_sample=300).constant
