"""The paper's twelve CIFAR networks as timm models, built from the layer table in :mod:`.architectures`.

Cut like timm's ``models/vgg.py``: a declarative table (torch-free, so the report can count parameters without
torch) says what each network is; :class:`AllConvNet` builds it into ``features`` and ``head``, every layer its own
module object (no weights shared by accident, one of the 2020 reproduction's bugs); timm's model API reads off those
two; one plain entry point per network at the end. :func:`register_timm` hands the entry points to timm when timm is
imported (:mod:`._timm_hook`), so training, which builds nets with :func:`build`, never imports timm.
"""

# No ``from __future__ import annotations`` here: torch.fx copies ``forward``'s annotations into the code it
# generates, and a string annotation ("torch.Tensor") comes out as a name TorchScript cannot resolve.
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from allconv_cli import config
from allconv_cli.architectures import ARCHITECTURES, LayerSpec, layer_plan
from allconv_cli.errors import AllconvError
from allconv_cli.paper import TABLE3, registry_name


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


class ClassifierHead(nn.Module):
    """The paper's head: a conv to the classes (1x1, with the net's BatchNorm choice and an optional ReLU), then the
    global average. timm's conventions: ``fc`` is ``nn.Identity`` for ``num_classes`` 0 and ``global_pool`` for
    pool type ``""`` (no pooling)."""

    def __init__(self, in_chs: int, num_classes: int, *, kernel: int, bn: bool, relu: bool, pool_type: str = "avg"
                 ) -> None:
        super().__init__()
        self.in_chs, self.kernel, self.use_bn, self.use_relu = in_chs, kernel, bn, relu
        self.fc = self._classifier(num_classes)
        self.global_pool = _global_pool(pool_type)

    def _classifier(self, num_classes: int) -> nn.Module:
        if num_classes < 2 and num_classes != 0:
            raise AllconvError(f"num_classes={num_classes} is too small: use 2 or more (0 for no classifier)")
        if not num_classes:
            return nn.Identity()
        return ConvBlock(self.in_chs, num_classes, self.kernel, 1, True, self.use_bn, self.use_relu)

    def reset(self, num_classes: int, pool_type: str | None = None) -> None:
        """A new (default-initialised) classifier for ``num_classes``, and a new pooling if ``pool_type`` is given."""
        self.fc = self._classifier(num_classes)
        if pool_type is not None:
            self.global_pool = _global_pool(pool_type)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.global_pool(x if pre_logits else self.fc(x))


def _global_pool(kind: str) -> nn.Module:
    if kind not in ("avg", ""):
        raise AllconvError(f"global_pool={kind!r}: use 'avg' (the paper's global average) or '' (no pooling)")
    return GlobalAvgPool() if kind == "avg" else nn.Identity()


def _features(plan: list[LayerSpec], in_chans: int, bn: bool, dropout_input: float, dropout_hidden: float
              ) -> tuple[nn.Sequential, list[dict[str, Any]], int]:
    """``features`` from the plan's layers before the classifier, named drop0, conv1, pool1, drop1, ... in order;
    timm's feature taps (each pooling stage's output, where its dropout follows, then the final features); channels."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    info: list[dict[str, Any]] = []
    channels, reduction, convs, pools, drops, last = in_chans, 1, 0, 0, 0, ""
    for spec in plan:
        if spec.kind == "conv":
            convs += 1
            last = f"conv{convs}"
            layers[last] = ConvBlock(channels, spec.out, spec.kernel, spec.stride, spec.padded, bn, True)
            channels, reduction = spec.out, reduction * spec.stride
        elif spec.kind == "pool":
            pools += 1
            last = f"pool{pools}"
            layers[last] = nn.MaxPool2d(spec.kernel, stride=spec.stride, padding=spec.kernel // 2)
            reduction *= spec.stride
        else:  # dropout: on the input images (drop0), then after each pooling stage
            if spec.dropout == "hidden":
                info.append({"num_chs": channels, "reduction": reduction, "module": f"features.{last}"})
            layers[f"drop{drops}"] = nn.Dropout(dropout_input if spec.dropout == "input" else dropout_hidden)
            drops += 1
    info.append({"num_chs": channels, "reduction": reduction, "module": f"features.{last}"})
    return nn.Sequential(layers), info, channels


def init_weights(model: nn.Module, init: str, std: float) -> None:
    """Initialise every conv of ``model`` by scheme ``init`` (the paper states none; docs/protocol.md says which is
    ours and why). With fan_in = C_in K K and fan_out = C_out K K:

    - ``xavier``: PyTorch's Xavier/Glorot uniform, fan average: U(+-sqrt(6 / (fan_in + fan_out))); biases 0.
    - ``xavier-caffe``: Caffe's "xavier" filler (its default variance_norm FAN_IN), the Caffe All-CNN recipe's:
      U(+-sqrt(3 / fan_in)); biases 0 (Caffe's constant filler).
    - ``gaussian``: N(0, std) for weights and biases, as the neon/TensorFlow All-CNN-C port (std 0.05).
    - ``kaiming``: He normal for ReLU, N(0, 2 / fan_in); biases 0.
    - ``torch``: PyTorch's default (U(+-1 / sqrt(fan_in)) for weights and biases), left as built.
    """
    config.check("init", init)
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


class AllConvNet(nn.Module):
    """Network ``base`` (A, B, C) in variant ``branch`` (Table 2); the defaults are TrainConfig's (the paper's
    dropout: 20% on the input, 50% after each pooling stage). In timm's terms ``features`` is every layer before the
    classifier (192 x 6 x 6 for a 32 x 32 input) and ``head`` the 1x1 conv to the classes with the global average
    after it, in the paper's order. ``drop_rate`` is timm's name for ``dropout_hidden`` and wins when given;
    ``num_classes`` 0 leaves the classifier out (the net returns its pooled features)."""

    def __init__(self, base: str = "C", branch: str = "allcnn", num_classes: int = 10, in_chans: int = 3,
                 global_pool: str = "avg", *, bn: bool = config.default("bn"),
                 dropout_input: float = config.default("dropout_input"),
                 dropout_hidden: float = config.default("dropout_hidden"), init: str = config.default("init"),
                 init_std: float = config.default("init_std"), head_relu: bool = config.default("head_relu"),
                 drop_rate: float | None = None) -> None:
        super().__init__()
        dropout_hidden = dropout_hidden if drop_rate is None else drop_rate
        for name, value in (("dropout_input", dropout_input), ("dropout_hidden", dropout_hidden), ("init", init),
                            ("init_std", init_std)):
            config.check(name, value)
        *body, classifier, _gap = layer_plan(base, branch)  # every plan ends in the classifier conv, then the average
        self.features, self.feature_info, self.num_features = _features(body, in_chans, bn, dropout_input,
                                                                        dropout_hidden)
        self.head = ClassifierHead(self.num_features, num_classes, kernel=classifier.kernel, bn=bn, relu=head_relu,
                                   pool_type=global_pool)
        self.head_hidden_size = self.num_features
        self.head_name = f"conv{sum(spec.kind == 'conv' for spec in body) + 1}"  # the paper's name of the classifier
        self.num_classes, self.in_chans, self.init = num_classes, in_chans, (init, init_std)
        init_weights(self, init, init_std)
        self.pretrained_cfg = self.default_cfg = pretrained_cfg_of(base, branch)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The unpooled feature map the classifier sees: (N, num_features, 6, 6) for 32 x 32 inputs."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Classifier then global average (the paper's order); ``pre_logits``: the pooled features instead."""
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes``, initialised as the net was (0: none, ``forward`` returns the pooled
        features); ``global_pool`` ``avg`` or ``""`` (no pooling: ``forward`` returns maps)."""
        reference = next(self.features.parameters())
        self.head.reset(num_classes, global_pool)
        init_weights(self.head, *self.init)
        self.head.to(device=reference.device, dtype=reference.dtype)
        self.num_classes = num_classes

    def named_layers(self) -> list[tuple[str, nn.Module]]:
        """Every layer in forward order under the paper's names: the features (drop0, conv1, pool1, ...), the
        classifier conv (conv9 in All-CNN-C) and ``gap``. ``allconv models --summary`` and ``visualize`` walk these."""
        return [*self.features.named_children(), (self.head_name, self.head.fc), ("gap", self.head.global_pool)]

    def _tap_layers(self) -> list[int]:
        """Where in ``features`` each ``feature_info`` tap is."""
        names = [name for name, _ in self.features.named_children()]
        return [names.index(info["module"].removeprefix("features.")) for info in self.feature_info]

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's feature API: the ``feature_info`` taps picked by ``indices`` (None: all, n: the last n, a list:
        those) on the way through ``features``, and the final features. There is no norm layer; NCHW only."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: allconv networks give NCHW maps only")
        taps = _take_indices(len(self.feature_info), indices)
        ends = self._tap_layers()
        wanted = {ends[i] for i in taps}
        stop = max(wanted) if stop_early else len(self.features) - 1
        intermediates = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in wanted:
                intermediates.append(x)
            if index == stop:
                break
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the layers (and taps) after the last tap ``indices`` needs, and the classifier (timm's feature getter
        calls this); returns the taps kept."""
        taps = _take_indices(len(self.feature_info), indices)
        keep = self._tap_layers()[max(taps)]
        if prune_head or keep < len(self.features) - 1:
            self.features, self.feature_info = self.features[: keep + 1], self.feature_info[: max(taps) + 1]
            self.num_features = self.head_hidden_size = self.head.in_chs = self.feature_info[max(taps)]["num_chs"]
            self.reset_classifier(0, "")
        return taps


def _take_indices(count: int, indices: int | list[int] | None) -> list[int]:
    """timm's ``indices`` over ``count`` taps: None all, an int the last n, a list those (negative from the end)."""
    if indices is None or isinstance(indices, int):
        n = count if indices is None else indices
        if not 0 < n <= count:
            raise ValueError(f"indices={indices}: take the last 1 to {count} taps")
        return list(range(count - n, count))
    taken = [i + count if i < 0 else i for i in indices]
    if not all(0 <= i < count for i in taken):
        raise ValueError(f"indices={list(indices)}: tap indices run 0..{count - 1} (or -{count}..-1)")
    return taken


def build(base: str, branch: str, **options: Any) -> AllConvNet:
    """Network ``base``/``branch`` with :class:`AllConvNet`'s keyword ``options``: what training uses, no timm."""
    return AllConvNet(base, branch, **options)


def from_config(cfg: config.TrainConfig, num_classes: int) -> AllConvNet:
    """The network a run trains. TrainConfig's ``network`` fields are :class:`AllConvNet`'s keywords (``model`` is its
    ``base``), so a new network option is a field plus its use in the builder, with no keyword list to keep in step."""
    options = {name: getattr(cfg, name) for name in config.fields_where(group="network")}
    return AllConvNet(options.pop("model"), num_classes=num_classes, **options)


def count_params(model: nn.Module) -> int:
    """Parameters of a built module (:func:`allconv_cli.architectures.param_count` gives a network's without torch)."""
    return sum(p.numel() for p in model.parameters())


def summary(base: str, branch: str, num_classes: int = 10, **options: Any
            ) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(layer name, module repr, output shape, parameters) for each layer on a 1x3x32x32 input."""
    model = build(base, branch, num_classes=num_classes, **options).eval()
    rows = []
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        for name, module in model.named_layers():
            x = module(x)
            text = repr(module)
            if isinstance(module, ConvBlock):
                text = repr(module.conv) + " + BN" * isinstance(module.bn, nn.BatchNorm2d) + (
                    " + ReLU" * isinstance(module.relu, nn.ReLU))
            rows.append((name, text, tuple(x.shape[1:]), count_params(module)))
    return rows


def pretrained_cfg_of(base: str, branch: str) -> dict[str, Any]:
    """timm's pretrained config of network ``base``/``branch``: input, feature-map size and layer names (no weights).

    timm's transforms can only normalise per channel, and the nets train on allconv's GCN + ZCA inputs
    (:mod:`allconv_cli.data.preprocess`), which no mean/std expresses: mean 0 and std 1 keep pixels on the 0..1 scale
    of ``--preprocess none``.
    """
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (6, 6),
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        "first_conv": "features.conv1.conv",
        "classifier": "head.fc.conv",
        "description": f"{TABLE3[(base, branch)].display_name} (Springenberg et al. 2015), untrained",
        "paper_name": "Striving for Simplicity: The All Convolutional Net",
        "paper_ids": "arXiv:1412.6806",
    }


# timm's register_model reads each entry point's cfg from this module's ``default_cfgs``.
default_cfgs: dict[str, dict[str, Any]] = {name: pretrained_cfg_of(*key) for key, name in ARCHITECTURES.items()}


def _create(base: str, branch: str, pretrained: bool, **kwargs: Any) -> AllConvNet:
    """timm's builder around :class:`AllConvNet`: pretrained cfg, timm's keywords, ``features_only`` (taps: the two
    pooling stages and the final features)."""
    if pretrained:
        raise ValueError("allconv networks have no pretrained weights: train one with `allconv train`")
    from timm.models import build_model_with_cfg

    feature_cfg = {"flatten_sequential": True, "out_indices": (0, 1, 2), **kwargs.pop("feature_cfg", {})}
    return build_model_with_cfg(AllConvNet, registry_name(base, branch), pretrained, feature_cfg=feature_cfg,
                                base=base, branch=branch, **kwargs)


def allconv_a_model(pretrained: bool = False, **kwargs: Any) -> AllConvNet:
    """Model A: 5x5 convs, each stage ending in 3x3 max-pooling."""
    return _create("A", "model", pretrained, **kwargs)


def allconv_a_strided(pretrained: bool = False, **kwargs: Any) -> AllConvNet:
    """Strided-CNN-A: Model A without pools, the conv before each strides 2."""
    return _create("A", "strided", pretrained, **kwargs)


def allconv_a_convpool(pretrained: bool = False, **kwargs: Any) -> AllConvNet:
    """ConvPool-CNN-A: Model A with a 3x3 conv before each pool."""
    return _create("A", "convpool", pretrained, **kwargs)


def allconv_a_allcnn(pretrained: bool = False, **kwargs: Any) -> AllConvNet:
    """All-CNN-A: Model A with each pool replaced by a 3x3 conv of stride 2."""
    return _create("A", "allcnn", pretrained, **kwargs)


def allconv_b_model(pretrained: bool = False, **kwargs: Any) -> AllConvNet:
    """Model B: 5x5 convs each followed by a 1x1 conv, each stage ending in 3x3 max-pooling."""
    return _create("B", "model", pretrained, **kwargs)


def allconv_b_strided(pretrained: bool = False, **kwargs: Any) -> AllConvNet:
    """Strided-CNN-B: Model B without pools, the 1x1 conv before each strides 2."""
    return _create("B", "strided", pretrained, **kwargs)


def allconv_b_convpool(pretrained: bool = False, **kwargs: Any) -> AllConvNet:
    """ConvPool-CNN-B: Model B with a 3x3 conv before each pool."""
    return _create("B", "convpool", pretrained, **kwargs)


def allconv_b_allcnn(pretrained: bool = False, **kwargs: Any) -> AllConvNet:
    """All-CNN-B: Model B with each pool replaced by a 3x3 conv of stride 2."""
    return _create("B", "allcnn", pretrained, **kwargs)


def allconv_c_model(pretrained: bool = False, **kwargs: Any) -> AllConvNet:
    """Model C: pairs of 3x3 convs, each stage ending in 3x3 max-pooling."""
    return _create("C", "model", pretrained, **kwargs)


def allconv_c_strided(pretrained: bool = False, **kwargs: Any) -> AllConvNet:
    """Strided-CNN-C: Model C without pools, the conv before each strides 2."""
    return _create("C", "strided", pretrained, **kwargs)


def allconv_c_convpool(pretrained: bool = False, **kwargs: Any) -> AllConvNet:
    """ConvPool-CNN-C: Model C with a 3x3 conv before each pool."""
    return _create("C", "convpool", pretrained, **kwargs)


def allconv_c_allcnn(pretrained: bool = False, **kwargs: Any) -> AllConvNet:
    """All-CNN-C: Model C with each pool replaced by a 3x3 conv of stride 2."""
    return _create("C", "allcnn", pretrained, **kwargs)


ENTRYPOINTS = (allconv_a_model, allconv_a_strided, allconv_a_convpool, allconv_a_allcnn,
               allconv_b_model, allconv_b_strided, allconv_b_convpool, allconv_b_allcnn,
               allconv_c_model, allconv_c_strided, allconv_c_convpool, allconv_c_allcnn)


def register_timm() -> None:
    """Hand the twelve entry points (with ``default_cfgs``) to timm's registry, so ``timm.create_model(
    "allconv_c_allcnn", num_classes=100)`` works. Idempotent."""
    from timm.models import is_model, register_model

    for entrypoint in ENTRYPOINTS:
        if not is_model(entrypoint.__name__):
            register_model(entrypoint)
