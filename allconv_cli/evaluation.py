"""Evaluation without gradients, and the collapse rule that reads it: one pass gives loss, accuracy and both signs
that a network is dead (a constant output, dead class channels).

Kept apart from the loop (:mod:`allconv_cli.engine`) because the health checks need their own definitions: with
the paper's ReLU on the class scores, a class channel whose score is <= 0 for every input passes no gradient, and
once every channel is so the loss sits at ln(classes) for good (seen on an H100 with All-CNN-C at lr 0.05).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from allconv_cli.checkpoints import TrainState
from allconv_cli.config import TrainConfig
from allconv_cli.data import Split, iterate_batches

ALIVE_SAMPLE = 5000  # inputs the alive-class check sees when there is no validation split (training images)
CONSTANT_SAMPLE = 256  # the first inputs of the pass whose logits the constant-output check compares


def autocast(device: torch.device, amp: bool) -> torch.autocast:
    """bf16 autocast on CUDA when ``amp``; a no-op elsewhere (CPU trains and evaluates in fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def precision(device: torch.device, amp: bool) -> str:
    """What the convolutions compute in: ``bf16`` (amp on CUDA), ``tf32`` (CUDA without amp: :func:`engine.setup`
    allows TF32 for convs and matmuls) or ``fp32`` (CPU). The paper trained in fp32."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if amp else "tf32"


@dataclass(frozen=True)
class Evaluation:
    """What one pass over a split measured."""

    loss: float
    accuracy: float
    dead_classes: tuple[int, ...]  # class channels dead on every input of the pass (:func:`dead_from_range`)
    constant: bool  # the first CONSTANT_SAMPLE inputs all gave the same logits: every ReLU before the head is dead


@torch.no_grad()
def evaluate_split(model: nn.Module, split: Split, *, amp: bool = True, batch_size: int = 1000, head_relu: bool = True,
                   constant_sample: int = CONSTANT_SAMPLE) -> Evaluation:
    """Loss, accuracy, dead class channels and the constant-output check in one pass of large batches without
    gradients (dropout off). Only the final numbers cross to the host: no sync per batch."""
    was_training = model.training
    model.eval()
    device = split.x.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    spread = torch.zeros((), device=device)  # largest |logit - first input's logit| over the first inputs
    scale = torch.zeros((), device=device)  # largest |logit| over the same inputs
    high = low = first = None
    seen = 0
    for x, y in iterate_batches(split, batch_size, shuffle=False):
        with autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        high = logits.amax(0) if high is None else torch.maximum(high, logits.amax(0))
        low = logits.amin(0) if low is None else torch.minimum(low, logits.amin(0))
        head = logits[: max(0, constant_sample - seen)]
        if len(head):
            first = head[0] if first is None else first
            spread = torch.maximum(spread, (head - first).abs().max())
            scale = torch.maximum(scale, head.abs().max())
        seen += len(y)
    model.train(was_training)
    n = max(len(split), 1)
    dead = () if high is None else dead_from_range(high, low, head_relu)
    constant = first is not None and bool(spread <= 1e-6 * (1 + scale))
    return Evaluation(loss_sum.item() / n, correct.item() / n, dead, constant)


def evaluate(model: nn.Module, split: Split, *, amp: bool = True, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a split, in large batches without gradients (dropout off)."""
    result = evaluate_split(model, split, amp=amp, batch_size=batch_size)
    return result.loss, result.accuracy


def health_split(val: Split | None, train: Split) -> Split:
    """What each epoch's pass runs on: the validation split, or without one the first ALIVE_SAMPLE training
    images (their loss and accuracy are not reported: the health signals are what is wanted of them)."""
    return val if val is not None else Split(train.x[:ALIVE_SAMPLE], train.y[:ALIVE_SAMPLE])


def dead_from_range(high: torch.Tensor, low: torch.Tensor, head_relu: bool) -> tuple[int, ...]:
    """Class channels that are dead, from each class score's maximum and minimum over the inputs seen.

    With ReLU on the class scores (``head_relu``) a channel is alive when it produces a positive score for some input
    (the global average of a ReLU map is > 0 exactly when some position is): a channel <= 0 everywhere passes no
    gradient. Without that ReLU every score passes gradient; a channel is dead when its score is the same for every
    input (nothing before it responds to the image).
    """
    constant = (high - low) <= 1e-6 * (1 + torch.maximum(high.abs(), low.abs()))
    dead = high <= 0 if head_relu else constant
    return tuple(int(i) for i in torch.nonzero(dead).flatten().tolist())


class CollapseWatch:
    """Decides, epoch by epoch, whether a run has collapsed: the one place of the rule.

    Dead means the output is the same for every input (seen on an H100 with the paper's All-CNN-C, no BN, lr 0.05:
    after one epoch every logit was 0 and the validation loss sat at ln(10) for the remaining 265 epochs), or, with
    ReLU on the class scores, every class channel is dead. No gradient flows through a dead ReLU, so such a run can
    never recover. A run is ``collapsed`` (when ``cfg.collapse_patience`` > 0) once it has been dead for that many
    epochs in a row, or is dead after its last epoch. The count lives in ``TrainState.constant_epochs`` so that it
    travels in the checkpoint.
    """

    def __init__(self, cfg: TrainConfig, num_classes: int) -> None:
        self.patience, self.last_epoch, self.head_relu = cfg.collapse_patience, cfg.epochs, cfg.head_relu
        self.num_classes = num_classes
        self.dead_classes: tuple[int, ...] | None = None  # after the last epoch observed; None: none yet

    def observe(self, state: TrainState, evaluation: Evaluation) -> str | None:
        """Count this epoch (``state.epoch``) into ``state.constant_epochs``; the reason if the run has collapsed."""
        self.dead_classes = evaluation.dead_classes
        head_dead = self.head_relu and len(evaluation.dead_classes) == self.num_classes
        dead = head_dead or evaluation.constant
        state.constant_epochs = state.constant_epochs + 1 if dead else 0
        if not (self.patience and dead and (state.constant_epochs >= self.patience or state.epoch >= self.last_epoch)):
            return None
        what = ("every class score was <= 0 for every validation input (the ReLUs on the class scores are dead: the "
                "loss is ln(classes) and no gradient flows)" if head_dead else
                "the network's output was the same for every input")
        when = (f"stopped after epoch {state.epoch}" if state.epoch < self.last_epoch else
                f"still dead after the last epoch ({state.epoch})")
        return f"{what}; dead ReLUs for {state.constant_epochs} epoch(s) in a row (it cannot recover), {when}"
