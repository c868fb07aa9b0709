"""The paper's Section 4: what a unit responds to, by three ways of propagating back through the ReLUs.

Figure 1 of the paper defines them by what each passes back through a ReLU whose forward input is ``f`` and whose
incoming gradient is ``R``: plain backpropagation ``(f > 0) R``, the "deconvnet" of Zeiler & Fergus ``(R > 0) R``
(the forward input is ignored), and guided backpropagation ``(f > 0) (R > 0) R``. Our nets' ``nn.ReLU`` modules are
in-place, which full backward hooks do not allow, so :func:`relu_rule` swaps them for a small ``autograd.Function``
that applies the chosen rule and puts the originals back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from allconv_cli.errors import AllconvError

RULES: tuple[str, ...] = ("backprop", "deconvnet", "guided")


class _RuleReLUFunction(torch.autograd.Function):
    """ReLU forward; in the backward pass the gradient goes through where the rule's mask is true."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, rule: str) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.rule = rule  # type: ignore[attr-defined]
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        rule = ctx.rule  # type: ignore[attr-defined]
        if rule == "backprop":
            mask = x > 0
        elif rule == "deconvnet":
            mask = grad > 0
        else:
            mask = (x > 0) & (grad > 0)
        return grad.masked_fill(~mask, 0.0), None


class RuleReLU(nn.Module):
    """A ReLU whose backward pass follows one of :data:`RULES`."""

    def __init__(self, rule: str) -> None:
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}: one of {', '.join(RULES)}")
        self.rule = rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RuleReLUFunction.apply(x, self.rule)

    def extra_repr(self) -> str:
        return f"rule={self.rule}"


@contextlib.contextmanager
def relu_rule(model: nn.Module, rule: str) -> Iterator[int]:
    """Within the block, every ``nn.ReLU`` of ``model`` back-propagates by ``rule``; yields how many were swapped."""
    swapped = [
        (parent, name, child)
        for parent in list(model.modules())
        for name, child in parent.named_children()
        if isinstance(child, nn.ReLU)
    ]
    for parent, name, _ in swapped:
        setattr(parent, name, RuleReLU(rule))
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    named_layers = getattr(model, "named_layers", None)
    if named_layers is None:
        raise AllconvError(f"{type(model).__name__} is not an allconv network (no named_layers): visualize needs one")
    return named_layers()


def layer_names(model: nn.Module) -> list[str]:
    """The layers whose units can be shown: the convs and pools, in order (conv1, pool1, conv2, ...)."""
    return [name for name, _ in _layers(model) if name.startswith(("conv", "pool"))]


def default_layer(model: nn.Module) -> str:
    """The highest hidden conv: the one before the 1x1 conv to the class scores (the paper shows the top layers)."""
    convs = [name for name in layer_names(model) if name.startswith("conv")]
    return convs[-2] if len(convs) > 1 else convs[-1]


def check_layer(model: nn.Module, layer: str) -> None:
    names = layer_names(model)
    if layer not in names:
        raise AllconvError(f"unknown layer {layer!r}: choose one of {', '.join(names)}")


def forward_to(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The output of ``layer`` (after its BatchNorm and ReLU) for inputs ``x``."""
    for name, module in _layers(model):
        x = module(x)
        if name == layer:
            return x
    raise AllconvError(f"unknown layer {layer!r}: choose one of {', '.join(layer_names(model))}")


def unit_count(model: nn.Module, layer: str, x: torch.Tensor) -> int:
    """Channels of ``layer`` (one forward pass of one input)."""
    with torch.no_grad():
        return int(forward_to(model, layer, x[:1]).shape[1])


@torch.no_grad()
def peak_activations(model: nn.Module, layer: str, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """(images, channels): each channel's largest activation over the positions of each image (model in eval)."""
    peaks = [forward_to(model, layer, x[i : i + batch_size]).flatten(2).amax(dim=2).float()
             for i in range(0, len(x), batch_size)]
    return torch.cat(peaks)


def reconstruct(model: nn.Module, layer: str, x: torch.Tensor, unit: int, rule: str) -> torch.Tensor:
    """Per image, the input-space signal of channel ``unit``'s largest activation, propagated back by ``rule``.

    Equivalent to the paper's "set every activation of the layer to zero except one and propagate back": the
    gradient of that one activation. Images do not interact in eval mode, so a batch gives each image its own.
    """
    was_training = model.training
    model.eval()
    inputs = x.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad(), relu_rule(model, rule):
            peak = forward_to(model, layer, inputs)[:, unit].flatten(1).amax(dim=1)
            (grad,) = torch.autograd.grad(peak.sum(), inputs)
    finally:
        model.train(was_training)
    return grad.detach()
