"""The twelve networks of Tables 1 and 2 as a declarative layer table, their names and exact parameter counts
(torch-free).

``BASE_LAYERS`` holds the three bases as layer tokens and ``layer_plan`` applies a branch to a base; :mod:`.models`
builds modules from the plan, and :func:`param_count` counts the same plan's parameters arithmetically, so the report
can state every network's exact size, and ``allconv models`` read a name, without importing torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from allconv_cli.config import check
from allconv_cli.errors import AllconvError
from allconv_cli.paper import BASES, BRANCHES, TABLE3, registry_name

# Table 1: one token per layer. "convK-C" is a KxK conv with C output channels, "same" padded; "pool" is the
# 3x3 max-pool with stride 2 that the branches rewrite.
BASE_LAYERS: dict[str, tuple[str, ...]] = {
    "A": ("conv5-96", "pool", "conv5-192", "pool"),
    "B": ("conv5-96", "conv1-96", "pool", "conv5-192", "conv1-192", "pool"),
    "C": ("conv3-96", "conv3-96", "pool", "conv3-192", "conv3-192", "pool"),
}
# Shared by all bases: the unpadded 3x3 conv (8x8 -> 6x6), a 1x1 conv, a 1x1 conv to the classes, global average.
CLASSIFIER: tuple[str, ...] = ("conv3-192-valid", "conv1-192", "conv1-classes")

# The twelve networks: (base, branch) -> registry name.
ARCHITECTURES: dict[tuple[str, str], str] = {(b, br): registry_name(b, br) for b in BASES for br in BRANCHES}


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a plan. ``out == 0`` means "num_classes"."""

    kind: str  # conv | pool | dropout | gap
    kernel: int = 0
    out: int = 0
    stride: int = 1
    padded: bool = True
    dropout: str = ""  # "input" or "hidden" for dropout layers
    head: bool = False  # the last conv, whose ReLU is optional


def conv_spec(token: str) -> LayerSpec:
    """``conv3-192-valid`` -> LayerSpec("conv", kernel=3, out=192, padded=False); ``-classes`` marks the head."""
    _, kernel, out, *flags = token.replace("conv", "conv-", 1).split("-")
    return LayerSpec(
        "conv",
        kernel=int(kernel),
        out=0 if out == "classes" else int(out),
        padded="valid" not in flags,
        head=out == "classes",
    )


def layer_plan(base: str, branch: str) -> list[LayerSpec]:
    """The layers of network ``base`` (A, B, C) in variant ``branch``, as Table 2 describes them."""
    base = base.upper()
    check("model", base)
    check("branch", branch)
    plan = [LayerSpec("dropout", dropout="input")]
    for token in BASE_LAYERS[base]:
        if token != "pool":
            plan.append(conv_spec(token))
            continue
        channels = plan[-1].out
        if branch == "model":
            plan.append(LayerSpec("pool", kernel=3, stride=2))
        elif branch == "strided":  # drop the pool, the conv before it strides instead
            plan[-1] = dataclasses.replace(plan[-1], stride=2)
        elif branch == "convpool":  # an extra conv so that the parameter count matches allcnn
            plan += [LayerSpec("conv", kernel=3, out=channels), LayerSpec("pool", kernel=3, stride=2)]
        else:  # allcnn: a strided conv learns the pooling
            plan.append(LayerSpec("conv", kernel=3, out=channels, stride=2))
        plan.append(LayerSpec("dropout", dropout="hidden"))
    plan += [conv_spec(token) for token in CLASSIFIER]
    plan.append(LayerSpec("gap"))
    return plan


def parse_name(name: str) -> tuple[str, str]:
    """``(base, branch)`` of a network named as the registry does (``allconv_c_allcnn``, ``C/allcnn``, ``c-allcnn``)
    or as the paper does (``All-CNN-C``, ``Model A``, ``ConvPool-CNN-B``), in any case."""
    wanted = " ".join(name.lower().split())
    for key, entry in TABLE3.items():
        if wanted == entry.display_name.lower():
            return key
    base, _, branch = wanted.removeprefix("allconv_").replace("/", "_").replace("-", "_").partition("_")
    if (base.upper(), branch) in ARCHITECTURES:
        return base.upper(), branch
    raise AllconvError(f"unknown network {name!r}: use a registry name ({', '.join(ARCHITECTURES.values())}) or a "
                       f"paper name ({', '.join(entry.display_name for entry in TABLE3.values())})")


def param_count(base: str, branch: str, num_classes: int = 10, bn: bool = False, in_chans: int = 3) -> int:
    """Exact trainable parameters of network ``base``/``branch`` as :func:`allconv_cli.models.build` makes it: per
    conv, C_in x C_out x K x K weights plus C_out biases, or, with ``bn``, no bias and BatchNorm's C_out scales and
    C_out shifts (its running statistics are buffers). ``num_classes`` 0: no classifier conv."""
    total, channels = 0, in_chans
    for spec in layer_plan(base, branch):
        if spec.kind != "conv":
            continue
        out = num_classes if spec.head else spec.out
        if out == 0:
            continue
        total += channels * out * spec.kernel * spec.kernel + (2 * out if bn else out)
        channels = out
    return total


def describe(base: str, branch: str, num_classes: int = 10) -> dict[str, Any]:
    """One row of ``allconv models``: our exact parameter count next to the paper's printed figures."""
    entry = TABLE3[(base, branch)]
    return {
        "name": registry_name(base, branch),
        "base": base,
        "branch": branch,
        "display_name": entry.display_name,
        "params": param_count(base, branch, num_classes),
        "paper_params": entry.params_printed,
        "paper_error": entry.error,
    }
