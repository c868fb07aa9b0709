"""Evaluation without gradients, and the two signs that a network is dead: a constant output, dead class channels.

Kept apart from the loop (:mod:`allconv_cli.engine`) because the health checks need their own definitions: with
the paper's ReLU on the class scores, a class channel whose score is <= 0 for every input passes no gradient, and
once every channel is so the loss sits at ln(classes) for good (seen on an H100 with All-CNN-C at lr 0.05).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from allconv_cli.data import Split, iterate_batches

ALIVE_SAMPLE = 5000  # inputs the alive-class check sees when there is no validation split (training images)


def autocast(device: torch.device, amp: bool) -> torch.autocast:
    """bf16 autocast on CUDA when ``amp``; a no-op elsewhere (CPU trains and evaluates in fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def precision(device: torch.device, amp: bool) -> str:
    """What the convolutions compute in: ``bf16`` (amp on CUDA), ``tf32`` (CUDA without amp: :func:`engine.setup`
    allows TF32 for convs and matmuls) or ``fp32`` (CPU). The paper trained in fp32."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if amp else "tf32"


@torch.no_grad()
def evaluate_classes(model: nn.Module, split: Split, *, amp: bool = True, batch_size: int = 1000,
                     head_relu: bool = True) -> tuple[float, float, tuple[int, ...]]:
    """Mean cross-entropy, accuracy and the dead class channels (:func:`dead_from_range`) over a split, in large
    batches without gradients (dropout off): one pass gives all three."""
    was_training = model.training
    model.eval()
    device = split.x.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    high = low = None
    for x, y in iterate_batches(split, batch_size, shuffle=False):
        with autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        batch_high, batch_low = logits.amax(0), logits.amin(0)
        high = batch_high if high is None else torch.maximum(high, batch_high)
        low = batch_low if low is None else torch.minimum(low, batch_low)
    model.train(was_training)
    n = max(len(split), 1)
    dead = () if high is None else dead_from_range(high, low, head_relu)
    return loss_sum.item() / n, correct.item() / n, dead


def evaluate(model: nn.Module, split: Split, *, amp: bool = True, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a split, in large batches without gradients (dropout off)."""
    loss, accuracy, _ = evaluate_classes(model, split, amp=amp, batch_size=batch_size)
    return loss, accuracy


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


@torch.no_grad()
def dead_classes(model: nn.Module, split: Split, *, amp: bool = True, head_relu: bool = True,
                 n: int = ALIVE_SAMPLE) -> tuple[int, ...]:
    """The dead class channels on the first ``n`` inputs of ``split`` (for runs without a validation split)."""
    part = Split(split.x[:n], split.y[:n])
    return evaluate_classes(model, part, amp=amp, head_relu=head_relu)[2]


@torch.no_grad()
def output_is_constant(model: nn.Module, split: Split, n: int = 256) -> bool:
    """True when the network gives every input the same logits: all ReLUs before the head are dead.

    Seen on an H100 with the paper's All-CNN-C (no BN, lr 0.05, Xavier init, ReLU on the class scores): after one
    epoch every logit was 0 for every image and the validation loss sat at exactly ln(10) for the remaining 265
    epochs. No gradient flows through a dead ReLU, so such a run can never recover and is stopped early.
    """
    was_training = model.training
    model.eval()
    logits = model(split.x[:n]).float()
    model.train(was_training)
    return bool((logits - logits[:1]).abs().max() <= 1e-6 * (1 + logits.abs().max()))
