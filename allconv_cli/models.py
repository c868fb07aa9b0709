"""The paper's twelve CIFAR networks, generated from one declarative table.

Tables 1 and 2 of the paper describe three base networks (A, B, C) and four ways of treating their two pooling
layers (the "branches"). The torch-free :mod:`.architectures` holds them as a layer table (``BASE_LAYERS``,
``layer_plan``), and ``build`` turns a plan into modules: every layer is its own module object, so no weights are
shared by accident (one of the 2020 reproduction's bugs). The nets speak timm's model API
(forward_features/forward_head, reset_classifier, feature_info, pretrained_cfg), so
``timm.create_model("allconv_c_allcnn")`` gives what timm users expect; timm itself is imported only by
:func:`register_timm`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from allconv_cli.architectures import (  # noqa: F401  (the layer table, re-exported: models.layer_plan etc.)
    ARCHITECTURES,
    BASE_LAYERS,
    CLASSIFIER,
    LayerSpec,
    layer_plan,
    param_count,
)
from allconv_cli.config import INITS
from allconv_cli.errors import AllconvError
from allconv_cli.paper import BASES, BRANCHES, TABLE3, registry_name


class ConvBlock(nn.Module):
    """Conv, optional BatchNorm (before the ReLU, as Ioffe & Szegedy), optional ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padded: bool, bn: bool, relu: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2 if padded else 0, bias=not bn)
        self.bn = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class GlobalAvgPool(nn.Module):
    """Average over the spatial map (6x6 here) and flatten to logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class AllConvNet(nn.Module):
    """One of the twelve networks; built by :func:`build`, layers named conv1, pool1, drop1, ... in order.

    In timm's terms the features are everything before the last conv (192 x 6 x 6 for a 32 x 32 input), the
    classifier is that 1x1 conv to the classes (with its optional BN and ReLU), and the pooling is the global average
    that follows it, as in the paper. All of them stay in ``layers``, so state-dict keys do not depend on the API.
    """

    def __init__(self, layers: OrderedDict[str, nn.Module], name: str, num_classes: int, *,
                 head_options: dict[str, bool], init: tuple[str, float], in_chans: int = 3,
                 global_pool: str = "avg") -> None:
        super().__init__()
        self.layers = nn.Sequential(layers)
        self.name = name
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self._head_options = head_options  # bn and relu of a new head (reset_classifier)
        self._init = init  # (scheme, std) the net is initialised with
        self._read_layout()

    def _read_layout(self) -> None:
        """Find timm's pieces in ``layers``, from the modules themselves: the classifier (the layer before ``gap``),
        the channels it sees, and the feature taps (each pooling stage's output, then the features)."""
        names = [name for name, _ in self.layers.named_children()]
        self._head_index = names.index("gap") - 1
        self.head_name = names[self._head_index]
        channels, reduction, last, info = self.in_chans, 1, "", []
        for name, layer in list(self.layers.named_children())[: self._head_index]:
            if isinstance(layer, ConvBlock):
                channels, reduction, last = layer.conv.out_channels, reduction * layer.conv.stride[0], name
            elif isinstance(layer, nn.MaxPool2d):
                reduction, last = reduction * layer.stride, name
            elif isinstance(layer, nn.Dropout) and last:  # the dropout after a pooling stage, not the input's
                info.append({"num_chs": channels, "reduction": reduction, "module": f"layers.{last}"})
        info.append({"num_chs": channels, "reduction": reduction, "module": f"layers.{last}"})
        self.num_features = self.head_hidden_size = channels
        self.feature_info = info

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Nets pickled before they spoke timm's API (models logged to MLflow by earlier versions) still load."""
        super().__setstate__(state)
        if "head_name" not in state:
            head = self.layers[-2]
            self.in_chans = self.layers.conv1.conv.in_channels
            self.global_pool = "avg"
            self._head_options = {"bn": isinstance(head.bn, nn.BatchNorm2d), "relu": isinstance(head.relu, nn.ReLU)}
            self._init = ("xavier", 0.05)  # not recorded then; the default
            self._read_layout()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The unpooled feature map the classifier sees: (N, num_features, 6, 6) for 32 x 32 inputs."""
        for index, layer in enumerate(self.layers):
            if index == self._head_index:
                break
            x = layer(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Classifier then global average (the paper's order); ``pre_logits``: the pooled features instead."""
        if pre_logits:
            return self.layers.gap(x)
        return self.layers.gap(self.get_classifier()(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return getattr(self.layers, self.head_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new, freshly initialised classifier for ``num_classes`` (0: none, ``forward`` returns the pooled
        features); ``global_pool`` ``avg`` or ``""`` (no pooling: ``forward`` returns maps)."""
        _check_num_classes(num_classes)
        if global_pool is not None:
            self.layers.gap = _global_pool(global_pool)
            self.global_pool = global_pool
        reference = next(self.parameters())
        head = _classifier(self.num_features, num_classes, **self._head_options)
        _init_weights(head, *self._init)
        setattr(self.layers, self.head_name, head.to(device=reference.device, dtype=reference.dtype))
        self.num_classes = num_classes


def _check_num_classes(num_classes: int) -> None:
    if num_classes < 2 and num_classes != 0:
        raise AllconvError(f"num_classes={num_classes} is too small: use 2 or more (0 for no classifier)")


def _global_pool(kind: str) -> nn.Module:
    if kind not in ("avg", ""):
        raise AllconvError(f"global_pool={kind!r}: use 'avg' (the paper's global average) or '' (no pooling)")
    return GlobalAvgPool() if kind == "avg" else nn.Identity()


def _classifier(cin: int, num_classes: int, *, bn: bool, relu: bool) -> nn.Module:
    """The 1x1 conv to the classes, or ``nn.Identity`` for ``num_classes`` 0."""
    return ConvBlock(cin, num_classes, 1, 1, True, bn, relu) if num_classes else nn.Identity()


def _init_weights(model: nn.Module, init: str, std: float) -> None:
    """Initialise every conv of ``model`` by scheme ``init`` (the paper states none; config.py's ``init`` help says
    which is ours and why). With fan_in = C_in K K and fan_out = C_out K K:

    - ``xavier``: PyTorch's Xavier/Glorot uniform, fan average: U(+-sqrt(6 / (fan_in + fan_out))); biases 0.
    - ``xavier-caffe``: Caffe's "xavier" filler (its default variance_norm FAN_IN), the Caffe All-CNN recipe's:
      U(+-sqrt(3 / fan_in)); biases 0 (Caffe's constant filler).
    - ``gaussian``: N(0, std) for weights and biases, as the neon/TensorFlow All-CNN-C port (std 0.05).
    - ``kaiming``: He normal for ReLU, N(0, 2 / fan_in); biases 0.
    - ``torch``: PyTorch's default (U(+-1 / sqrt(fan_in)) for weights and biases), left as built.
    """
    if init not in INITS:
        raise AllconvError(f"unknown init {init!r}: choose one of {', '.join(INITS)}")
    if init == "torch":
        return
    for module in model.modules():
        if not isinstance(module, nn.Conv2d):
            continue
        if init == "xavier":
            nn.init.xavier_uniform_(module.weight)
        elif init == "xavier-caffe":
            bound = (3.0 / module.weight[0].numel()) ** 0.5  # weight (C_out, C_in, K, K): one filter is fan_in values
            nn.init.uniform_(module.weight, -bound, bound)
        elif init == "kaiming":
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        else:
            nn.init.normal_(module.weight, 0.0, std)
        if module.bias is not None:
            if init == "gaussian":
                nn.init.normal_(module.bias, 0.0, std)
            else:
                nn.init.zeros_(module.bias)


def build(
    base: str,
    branch: str,
    *,
    num_classes: int = 10,
    bn: bool = False,
    dropout_input: float = 0.2,
    dropout_hidden: float = 0.5,
    init: str = "xavier",
    init_std: float = 0.05,
    head_relu: bool = True,
    in_chans: int = 3,
    global_pool: str = "avg",
) -> AllConvNet:
    """Build network ``base``/``branch``; defaults are the paper's (dropout 20% input, 50% after each pooling stage).

    ``num_classes`` 0 leaves out the classifier (timm's convention: the net then returns its pooled features).
    """
    for name, rate in (("dropout_input", dropout_input), ("dropout_hidden", dropout_hidden)):
        if not 0.0 <= rate < 1.0:
            raise AllconvError(f"{name}={rate} is out of range: use a probability in [0, 1)")
    _check_num_classes(num_classes)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    counts = {"conv": 0, "pool": 0, "dropout": 0}
    channels = in_chans
    for spec in layer_plan(base, branch):
        if spec.kind == "conv":
            counts["conv"] += 1
            name = f"conv{counts['conv']}"
            if spec.head:
                layers[name] = _classifier(channels, num_classes, bn=bn, relu=head_relu)
            else:
                layers[name] = ConvBlock(channels, spec.out, spec.kernel, spec.stride, spec.padded, bn, True)
                channels = spec.out
        elif spec.kind == "pool":
            counts["pool"] += 1
            layers[f"pool{counts['pool']}"] = nn.MaxPool2d(3, stride=2, padding=1)
        elif spec.kind == "dropout":
            rate = dropout_input if spec.dropout == "input" else dropout_hidden
            layers[f"drop{counts['dropout']}"] = nn.Dropout(rate)
            counts["dropout"] += 1
        else:
            layers["gap"] = _global_pool(global_pool)
    model = AllConvNet(layers, registry_name(base, branch), num_classes, head_options={"bn": bn, "relu": head_relu},
                       init=(init, init_std), in_chans=in_chans, global_pool=global_pool)
    _init_weights(model, init, init_std)
    model.pretrained_cfg = model.default_cfg = pretrained_cfg_of(base, branch)
    return model


def parse_name(name: str) -> tuple[str, str]:
    """``allconv_c_allcnn`` or ``C/allcnn`` or ``c-allcnn`` -> ("C", "allcnn")."""
    cleaned = name.lower().removeprefix("allconv_").replace("/", "_").replace("-", "_")
    base, _, branch = cleaned.partition("_")
    if base.upper() not in BASES or branch not in BRANCHES:
        names = ", ".join(registry_name(b, br) for b, br in ARCHITECTURES)
        raise AllconvError(f"unknown network {name!r}: choose one of {names}")
    return base.upper(), branch



def count_params(model: nn.Module) -> int:
    """Parameters of a built module (:func:`allconv_cli.architectures.param_count` gives a network's without torch)."""
    return sum(p.numel() for p in model.parameters())


def describe(base: str, branch: str, num_classes: int = 10) -> dict[str, Any]:
    """One row of ``allconv models``: our exact parameter count next to the paper's printed figures."""
    entry = TABLE3[(base, branch)]
    return {
        "name": registry_name(base, branch),
        "base": base,
        "branch": branch,
        "display_name": entry.display_name,
        "params": count_params(build(base, branch, num_classes=num_classes, init="torch")),
        "paper_params": entry.params_printed,
        "paper_error": entry.error,
    }


def summary(
    base: str, branch: str, num_classes: int = 10, **options: Any
) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(layer name, module repr, output shape, parameters) for each top-level layer on a 1x3x32x32 input."""
    model = build(base, branch, num_classes=num_classes, **options).eval()
    rows = []
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        for name, module in model.layers.named_children():
            x = module(x)
            text = repr(module.conv) if isinstance(module, ConvBlock) else repr(module)
            if isinstance(module, ConvBlock) and not isinstance(module.bn, nn.Identity):
                text += " + BN"
            if isinstance(module, ConvBlock) and not isinstance(module.relu, nn.Identity):
                text += " + ReLU"
            rows.append((name, text, tuple(x.shape[1:]), count_params(module)))
    return rows


def pretrained_cfg_of(base: str, branch: str) -> dict[str, Any]:
    """timm's pretrained config of network ``base``/``branch``: input, feature-map size and layer names (no weights).

    timm's transforms can only normalise per channel, and the nets train on allconv's GCN + ZCA inputs
    (:mod:`allconv_cli.data.preprocess`), which no mean/std expresses: mean 0 and std 1 keep pixels on the 0..1 scale
    of ``--preprocess none``.
    """
    head = sum(spec.kind == "conv" for spec in layer_plan(base, branch))  # the classifier is the last conv
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (6, 6),
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        "first_conv": "layers.conv1.conv",
        "classifier": f"layers.conv{head}.conv",
        "description": f"{TABLE3[(base, branch)].display_name} (Springenberg et al. 2015), untrained",
        "paper_name": "Striving for Simplicity: The All Convolutional Net",
        "paper_ids": "arXiv:1412.6806",
    }


# The nets' pretrained cfgs in timm's form; register_timm fills it and timm's register_model reads it from this module.
default_cfgs: dict[str, Any] = {}
_registered = False


def _build_for_timm(base: str, branch: str, *, drop_rate: float | None = None, **kwargs: Any) -> AllConvNet:
    """:func:`build` with timm's generic ``drop_rate`` as the dropout after the pooling stages."""
    if drop_rate is not None:
        kwargs.setdefault("dropout_hidden", drop_rate)
    return build(base, branch, **kwargs)


def _entrypoint(base: str, branch: str) -> Callable[..., AllConvNet]:
    name = registry_name(base, branch)

    def create(pretrained: bool = False, **kwargs: Any) -> AllConvNet:
        if pretrained:
            raise ValueError("allconv networks have no pretrained weights: train one with `allconv train`")
        from timm.models import build_model_with_cfg

        # the pooling stages' outputs and the final features; flatten_sequential reaches into ``layers``
        feature_cfg = {"flatten_sequential": True, "out_indices": (0, 1, 2)}
        return build_model_with_cfg(partial(_build_for_timm, base, branch), name, pretrained,
                                    feature_cfg=feature_cfg, **kwargs)

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f"{TABLE3[(base, branch)].display_name} from Springenberg et al. 2015 (arXiv:1412.6806)."
    return create


def register_timm() -> None:
    """Make ``timm.create_model("allconv_c_allcnn", num_classes=100)`` work, with the nets' pretrained cfgs in timm's
    registry. Idempotent."""
    global _registered, default_cfgs
    if _registered:
        return
    from timm.models import generate_default_cfgs, register_model

    default_cfgs = generate_default_cfgs({name: pretrained_cfg_of(b, br) for (b, br), name in ARCHITECTURES.items()})
    for base, branch in ARCHITECTURES:
        fn = _entrypoint(base, branch)
        globals()[fn.__name__] = register_model(fn)
    _registered = True
