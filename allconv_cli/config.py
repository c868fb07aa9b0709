"""Every hyperparameter of a training run, declared once: default, help, choices or range, and group.

A run is fully described by its :class:`TrainConfig`: logged to MLflow param by param, stored in every checkpoint,
rebuilt from either. The click options of ``train``/``search``/``reproduce``/``bench``, the search spaces' checks,
the study identity and the report's rerun commands are all derived from the field metadata below (torch-free).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shlex
import typing
from dataclasses import dataclass
from typing import Any

from allconv_cli import paper
from allconv_cli.errors import AllconvError

OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
INITS = ("xavier", "xavier-caffe", "gaussian", "kaiming", "torch")
DATASETS = ("cifar10", "cifar100", "fake")
PREPROCESSINGS = ("gcn-zca", "gcn-zca-coates", "standardize", "none")
AUGMENTATIONS = ("none", "flip-translate")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ENV_FAKE_SIZES = "ALLCONV_FAKE_SIZES"
ENV_DATA_DIR = "ALLCONV_DATA_DIR"
SEED_MAX = 2**32 - 1  # numpy's SeedSequence and torch.manual_seed take 32-bit seeds

# What a field is for. "network", "optimisation" and "data" change what a run learns; "execution" only how it runs
# (device, compilation, extra evaluation), so it never enters a study's identity and is never sampled.
GROUPS = ("network", "optimisation", "data", "execution")


@dataclass(frozen=True)
class Spec:
    """How one TrainConfig field is checked, offered on the command line and searched."""

    help: str
    group: str
    choices: tuple[str, ...] | None = None
    low: float | None = None  # inclusive unless low_open
    high: float | None = None  # inclusive unless high_open
    low_open: bool = False
    high_open: bool = False
    sampleable: bool = True  # a search space may sample it
    option: bool = True  # `allconv train` has a --flag for it
    envvar: str | None = None

    @property
    def execution(self) -> bool:
        return self.group == "execution"

    def bounds_text(self) -> str:
        """``> 0``, ``>= 1`` or ``in [0, 4294967295]``: how the allowed range reads in a message."""
        low, high = _number_text(self.low), _number_text(self.high)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"

    def check(self, name: str, value: Any) -> str | None:
        """None if ``value`` is allowed, else the one-line message naming it and the allowed values."""
        if value is None:
            return None
        if self.choices is not None:
            return None if value in self.choices else f"{name}={value!r}: choose one of {', '.join(self.choices)}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if not math.isfinite(value):
            return f"{name}={value}: must be a finite number {self.bounds_text()}"
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            return f"{name}={value}: must be {self.bounds_text()}"
        return None


def _number_text(value: float | None) -> str:
    """A bound as a person types it: whole numbers in full (``4294967295``, not ``4.29497e+09``), others by ``:g``."""
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _field(default: Any, help: str, group: str, **spec: Any) -> Any:
    return dataclasses.field(default=default, metadata={"spec": Spec(help=help, group=group, **spec)})


@dataclass
class TrainConfig:
    """One training run. Defaults follow the paper's CIFAR-10 protocol where it states one (:mod:`paper`)."""

    # network
    model: str = _field("C", "Base network of Table 1.", "network", choices=paper.BASES)
    branch: str = _field("allcnn", "model (max-pool), strided, convpool or allcnn (Table 2).", "network",
                         choices=paper.BRANCHES)
    bn: bool = _field(False, "BatchNorm after each conv.", "network")
    dropout_input: float = _field(paper.DROPOUT_INPUT, "Dropout on the input images.", "network", low=0, high=1,
                                  high_open=True)
    dropout_hidden: float = _field(paper.DROPOUT_HIDDEN, "Dropout after each pooling layer (or its replacement).",
                                   "network", low=0, high=1, high_open=True)
    init: str = _field(
        "xavier", "Weight initialisation (the paper states none): xavier (PyTorch's Xavier uniform), xavier-caffe "
        "(Caffe's fan-in 'xavier'), gaussian (N(0, --init-std)), kaiming (He normal) or torch (PyTorch's default).",
        "network", choices=INITS)
    init_std: float = _field(0.05, "Std of --init gaussian.", "network", low=0, low_open=True)
    head_relu: bool = _field(True, "ReLU on the class scores before the global average, as in the paper's table.",
                             "network")
    # optimisation
    optimizer: str = _field("sgd", "sgd is classic momentum (the paper's); nesterov, adam, adamw.", "optimisation",
                            choices=OPTIMIZERS)
    lr: float = _field(0.05, f"Learning rate (the paper chose from {', '.join(map(str, paper.LRS))}).",
                       "optimisation", low=0, low_open=True)
    momentum: float = _field(paper.MOMENTUM, "Momentum of sgd/nesterov (beta1 of adam).", "optimisation", low=0,
                             high=1, high_open=True)
    weight_decay: float = _field(paper.WEIGHT_DECAY, "Weight decay on every parameter.", "optimisation", low=0)
    epochs: int = _field(paper.EPOCHS, "Training epochs (the lr decays scale with them: see --milestones).",
                         "optimisation", low=1)
    milestones: tuple[int, ...] | None = _field(
        None, "Epochs after which lr x --lr-gamma, e.g. 200,250,300 [default: after 4/7, 5/7 and 6/7 of all optimizer "
        "steps: epochs 200, 250, 300 of 350; a short run decays inside an epoch, so --epochs 2 keeps the shape].",
        "optimisation", sampleable=False)
    lr_gamma: float = _field(paper.LR_GAMMA, "Factor applied to the lr at each milestone.", "optimisation", low=0,
                             high=1, low_open=True)
    batch_size: int = _field(128, "Batch size (not stated by the paper).", "optimisation", low=1)
    label_smoothing: float = _field(0.0, "Label smoothing of the cross-entropy loss.", "optimisation", low=0, high=1,
                                    high_open=True)
    augment: str = _field("none", "On-device augmentation; Table 3 used none.", "optimisation",
                          choices=AUGMENTATIONS)
    # data
    dataset: str = _field("cifar10", "Dataset.", "data", choices=DATASETS)
    data_dir: str | None = _field(None, f"torchvision root or folder of train*.npz + test.npz [env {ENV_DATA_DIR}].",
                                  "execution", envvar=ENV_DATA_DIR)
    subset: int | None = _field(None, "Train on a stratified N-image part of the training set.", "data", low=1)
    val_size: int = _field(5000, "Validation images held out of the training set (selection happens on these).",
                           "data", low=0)
    test_size: int | None = _field(
        None, "Test on a stratified N-image part of the test set (quick runs) [default: all of it].", "data", low=1,
        sampleable=False)
    preprocess: str = _field(
        "gcn-zca", "Input preprocessing, fitted on the training part: gcn-zca (the paper's GCN + ZCA, as pylearn2 made "
        "it), gcn-zca-coates (Coates' GCN, then ZCA), standardize (per channel) or none (x / 255).",
        "data", choices=PREPROCESSINGS)
    seed: int = _field(0, "Seed of the split, the init, dropout and batch order.", "data", low=0, high=SEED_MAX)
    # execution
    device: str = _field("auto", "auto, cpu, cuda or cuda:N.", "execution")
    compile: bool = _field(False, "torch.compile the model.", "execution")
    compile_mode: str = _field(
        "default", "torch.compile mode; reduce-overhead uses CUDA graphs (small batches are launch-bound).",
        "execution", choices=COMPILE_MODES)
    amp: bool = _field(True, "bf16 autocast on CUDA.", "execution")
    test_every: int = _field(0, "Also log test accuracy every N epochs (never used for selection).", "execution",
                             low=0)
    collapse_patience: int = _field(5, "Stop a run whose output is constant (dead ReLUs) for N epochs; 0 never stops.",
                                    "optimisation", low=0, sampleable=False)
    collapse_retries: int = _field(
        2, "Restart a collapsed run (dead ReLUs) up to N times with a new init and batch-order seed, same data split.",
        "optimisation", low=0, sampleable=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject impossible values with a message that names the value and the fix (the one place for ranges)."""
        for f in dataclasses.fields(self):
            message = spec(f.name).check(f.name, getattr(self, f.name))
            if message:
                raise AllconvError(message)
        if self.milestones is not None:
            self.milestones = tuple(int(m) for m in self.milestones)
            if any(m < 1 or m > self.epochs for m in self.milestones) or list(self.milestones) != sorted(
                self.milestones
            ):
                raise AllconvError(f"milestones={list(self.milestones)}: give increasing epochs in 1..{self.epochs}")

    def lr_milestones(self) -> list[float]:
        """Epochs after which the lr is multiplied by ``lr_gamma``: what the ``lr_milestones`` param records.

        ``--milestones`` as given; by default 4/7, 5/7 and 6/7 of ``--epochs``, to 3 decimals (whole numbers for
        350 epochs: 200, 250, 300). A fractional one decays after the optimizer step nearest to that point
        (:meth:`lr_milestone_steps`), so a 2-epoch run still has its three decays in the second epoch's steps.
        """
        if self.milestones is not None:
            return list(self.milestones)
        return [_number(round(self.epochs * k / 7, 3)) for k in DEFAULT_DECAYS]

    def lr_milestone_steps(self, steps_per_epoch: int) -> list[int]:
        """Optimizer steps after which the lr is multiplied by ``lr_gamma`` (``MultiStepLR`` stepped per step).

        ``--milestones`` are epochs: ``m`` is step ``m * steps_per_epoch``, the end of epoch ``m``. The default
        places the decays at 4/7, 5/7 and 6/7 of all steps: for 350 epochs exactly the ends of epochs 200, 250, 300.
        """
        if self.milestones is not None:
            return [m * steps_per_epoch for m in self.milestones]
        total = self.epochs * steps_per_epoch
        return [max(1, round(total * k / 7)) for k in DEFAULT_DECAYS]

    @property
    def registry_name(self) -> str:
        return paper.registry_name(self.model, self.branch)

    def data_config(self) -> DataConfig:
        """The data part of the run: the fields it shares with :class:`DataConfig`. ``$ALLCONV_FAKE_SIZES=TRAIN,TEST``
        resizes ``--dataset fake`` (tests, smoke runs); the sizes enter the data fingerprint, so runs record them in
        their data-hash tag (``Tag.DATA_HASH``)."""
        sizes = {}
        raw = os.environ.get(ENV_FAKE_SIZES)
        if raw and self.dataset == "fake":
            try:
                train, test = (int(v) for v in raw.split(","))
            except ValueError:
                raise AllconvError(f"${ENV_FAKE_SIZES}={raw!r}: give TRAIN,TEST image counts, e.g. 400,100") from None
            sizes = {"fake_train_size": train, "fake_test_size": test}
        return DataConfig(**{name: getattr(self, name) for name in DATA_CONFIG_FIELDS}, **sizes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["milestones"] = list(self.milestones) if self.milestones is not None else None
        return data

    def to_params(self) -> dict[str, str]:
        """Flat string params for MLflow; ``lr_milestones`` records the schedule actually used."""
        params = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in self.to_dict().items()}
        params["lr_milestones"] = json.dumps(self.lr_milestones())
        return params

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        unknown = set(data) - set(FIELD_NAMES)
        if unknown:
            raise AllconvError(f"unknown config keys {sorted(unknown)}: allowed are {sorted(FIELD_NAMES)}")
        return cls(**data)

    @classmethod
    def from_params(cls, params: dict[str, str]) -> TrainConfig:
        """Rebuild a config from MLflow params (the inverse of :meth:`to_params`)."""
        kwargs: dict[str, Any] = {}
        for name, raw in params.items():
            if name not in FIELDS:
                continue  # lr_milestones and other derived params
            base, _ = field_type(name)
            if raw == "None":
                kwargs[name] = None
            elif base is tuple:
                kwargs[name] = json.loads(raw)
            elif base is bool:
                kwargs[name] = raw == "True"
            else:
                kwargs[name] = base(raw)  # int, float or str
        return cls(**kwargs)

    def command_line(self) -> str:
        """The ``allconv train`` command that trains exactly this config again (every option spelled out)."""
        args = ["allconv", "train"]
        for name in OPTION_FIELDS:
            value = getattr(self, name)
            flag = option_flag(name)
            if value is None:
                continue
            if isinstance(value, bool):
                args.append(flag if value else f"--no-{flag[2:]}")
            elif name == "milestones":
                args += [flag, ",".join(str(m) for m in value)]
            else:
                args += [flag, str(value)]
        return shlex.join(args)


DEFAULT_DECAYS = (4, 5, 6)  # sevenths of the run after which the lr decays: the paper's 200, 250, 300 of 350 epochs


def _number(x: float) -> float | int:
    """``x`` as an int when it is whole (the param then reads [200, 250, 300], not [200.0, ...])."""
    return int(x) if x == int(x) else x


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
FIELD_NAMES: tuple[str, ...] = tuple(FIELDS)
_HINTS: dict[str, Any] = typing.get_type_hints(TrainConfig)


def field_type(name: str) -> tuple[type, bool]:
    """``(base type, None allowed)`` of field ``name`` from its real type hint: ``int | None`` -> ``(int, True)``,
    ``tuple[int, ...] | None`` -> ``(tuple, True)``, ``float`` -> ``(float, False)``."""
    hint = _HINTS[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        (hint,) = (a for a in args if a is not type(None))
    return typing.get_origin(hint) or hint, optional


def _type_text(name: str) -> str:
    hint = _HINTS[name]
    return str(hint) if typing.get_args(hint) else hint.__name__


# How each field's type reads in a message ("int | None", "tuple[int, ...] | None"), from the real type hints.
FIELD_TYPES: dict[str, str] = {name: _type_text(name) for name in FIELD_NAMES}


_KIND = {bool: "true or false", int: "an integer", float: "a number", str: "a string", tuple: "a list of integers"}


def coerce(name: str, value: Any) -> Any:
    """``value`` (from YAML or ``--set``) as the type of field ``name``; ValueError with the reason otherwise.

    YAML 1.1 reads ``1e-4`` (no dot) as a string, so numeric strings are accepted for numeric fields; an integral
    float is an int; a list of integers is a tuple."""
    base, optional = field_type(name)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} cannot be null")
    if isinstance(value, base) and not (base is not bool and isinstance(value, bool)) and base is not tuple:
        return value
    with contextlib.suppress(TypeError, ValueError):
        if base is int and not isinstance(value, bool) and (isinstance(value, str) or float(value).is_integer()):
            return int(value)
        if base is float and not isinstance(value, bool) and isinstance(value, (int, str)):
            return float(value)
        if base is tuple and isinstance(value, (list, tuple)) \
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
    raise ValueError(f"{name} is {_KIND.get(base, 'not settable here')}, not {value!r}")


def spec(name: str) -> Spec:
    return FIELDS[name].metadata["spec"]


def default(name: str) -> Any:
    return FIELDS[name].default


def check(name: str, value: Any) -> None:
    """Raise the one-line :class:`AllconvError` if ``value`` is not allowed for field ``name``: the one place where
    choices and ranges are checked, for a TrainConfig and for the library calls that take the same values."""
    message = spec(name).check(name, value)
    if message:
        raise AllconvError(message)


def option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def fields_where(**wanted: Any) -> tuple[str, ...]:
    """Field names whose Spec attributes equal ``wanted``, in declaration order (e.g. ``group="data"``)."""
    return tuple(n for n in FIELD_NAMES if all(getattr(spec(n), k) == v for k, v in wanted.items()))


OPTION_FIELDS = fields_where(option=True)
EXECUTION_FIELDS = fields_where(group="execution")  # never part of a study's identity
SAMPLEABLE = fields_where(sampleable=True, execution=False)
# Fields that change the data a trial sees: when a space samples one, each trial loads its own dataset.
DATA_FIELDS = tuple(n for n in fields_where(group="data") if spec(n).sampleable)


@dataclass(frozen=True)
class DataConfig:
    """Which images, split how, preprocessed how, and where to find and cache them: what :mod:`allconv_cli.data`
    loads. The fields it shares with :class:`TrainConfig` take their defaults and checks from TrainConfig's field
    metadata, written once above; the others are for library callers and tests (hashable, so a worker can key its
    loaded dataset by it)."""

    dataset: str = default("dataset")
    data_dir: str | None = default("data_dir")  # None: $ALLCONV_DATA_DIR, else ~/.cache/allconv/data
    subset: int | None = default("subset")
    val_size: int = default("val_size")
    test_size: int | None = default("test_size")
    preprocess: str = default("preprocess")
    seed: int = default("seed")
    fake_train_size: int = 10000  # the synthetic dataset's sizes (room for the default 5,000-image val split)
    fake_test_size: int = 1000
    zca_epsilon: float = paper.ZCA_EPSILON
    download: bool = True  # into the default cache folder only
    cache_dir: str | None = None  # None: $ALLCONV_CACHE_DIR, else ~/.cache/allconv; fitted ZCA in <dir>/preprocess
    use_cache: bool = True  # reuse and store the fitted GCN + ZCA transform on disk

    def __post_init__(self) -> None:
        """The names are checked here; the sizes against the data they pick from (:mod:`allconv_cli.data.splits`)."""
        for name in ("dataset", "preprocess"):
            check(name, getattr(self, name))


# The fields a run's DataConfig takes from its TrainConfig.
DATA_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(DataConfig) if f.name in FIELDS)
