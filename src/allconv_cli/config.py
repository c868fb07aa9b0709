"""Every hyperparameter of a training run, in one typed dataclass.

A run is fully described by its :class:`TrainConfig`: it is logged to MLflow param by param, stored in every
checkpoint, and rebuilt from either, so any row of a report can be rerun exactly. Defaults are the paper's
CIFAR-10 protocol (Section 3.2.1); the batch size is not stated in the paper and defaults to 128.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from allconv_cli.errors import AllconvError

OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEVICES_HELP = "auto (cuda if available), cpu, cuda, cuda:N"
ENV_FAKE_SIZES = "ALLCONV_FAKE_SIZES"


@dataclass
class TrainConfig:
    # network
    model: str = "C"
    branch: str = "allcnn"
    bn: bool = False
    dropout_input: float = 0.2
    dropout_hidden: float = 0.5
    init: str = "xavier"
    init_std: float = 0.05
    head_relu: bool = True
    # optimisation (the paper's: SGD, classic momentum 0.9, wd 1e-3, lr x0.1 after epochs 200, 250, 300 of 350)
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-3
    epochs: int = 350
    milestones: tuple[int, ...] | None = None  # None: at 4/7, 5/7, 6/7 of `epochs` (200, 250, 300 for 350)
    lr_gamma: float = 0.1
    batch_size: int = 128
    label_smoothing: float = 0.0
    augment: str = "none"
    # data
    dataset: str = "cifar10"
    data_dir: str | None = None
    subset: int | None = None
    val_size: int = 5000
    test_size: int | None = None  # evaluate on a stratified N-image part of the test set (quick runs); None: all
    preprocess: str = "gcn-zca"
    # execution
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
    amp: bool = True  # bf16 autocast, used on CUDA only
    test_every: int = 0  # also evaluate the test set every N epochs (0: only at the end); never used for selection
    collapse_patience: int = 5  # stop as "collapsed" after N epochs of constant output (dead ReLUs); 0: never
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, logged but not used by the engine

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject impossible values with a message that names the value and the fix."""
        checks = [
            (self.optimizer in OPTIMIZERS, f"optimizer={self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}"),
            (self.lr > 0, f"lr={self.lr}: the learning rate must be > 0"),
            (self.epochs >= 1, f"epochs={self.epochs}: train for at least 1 epoch"),
            (self.batch_size >= 1, f"batch_size={self.batch_size}: use a batch size >= 1"),
            (self.weight_decay >= 0, f"weight_decay={self.weight_decay}: must be >= 0"),
            (0 <= self.momentum < 1, f"momentum={self.momentum}: must be in [0, 1)"),
            (0 <= self.label_smoothing < 1, f"label_smoothing={self.label_smoothing}: must be in [0, 1)"),
            (self.test_every >= 0, f"test_every={self.test_every}: must be >= 0"),
            (self.collapse_patience >= 0, f"collapse_patience={self.collapse_patience}: must be >= 0 (0 disables)"),
            (
                self.compile_mode in COMPILE_MODES,
                f"compile_mode={self.compile_mode!r}: choose one of {', '.join(COMPILE_MODES)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise AllconvError(message)
        if self.milestones is not None:
            self.milestones = tuple(int(m) for m in self.milestones)
            if any(m < 1 or m > self.epochs for m in self.milestones) or list(self.milestones) != sorted(
                self.milestones
            ):
                raise AllconvError(f"milestones={list(self.milestones)}: give increasing epochs in 1..{self.epochs}")

    def lr_milestones(self) -> list[int]:
        """Epochs after which the lr is multiplied by ``lr_gamma`` (``MultiStepLR`` semantics)."""
        if self.milestones is not None:
            return list(self.milestones)
        return [max(1, round(self.epochs * k / 7)) for k in (4, 5, 6)]

    def data_config(self):  # -> DataConfig; imported lazily because data.py pulls in torch
        """The data part of the run. ``$ALLCONV_FAKE_SIZES=TRAIN,TEST`` resizes ``--dataset fake`` (tests, smoke
        runs); the sizes enter the data fingerprint, so runs record them in their ``allconv.data_hash`` tag."""
        from allconv_cli.data import DataConfig

        sizes = {}
        raw = os.environ.get(ENV_FAKE_SIZES)
        if raw and self.dataset == "fake":
            try:
                train, test = (int(v) for v in raw.split(","))
            except ValueError:
                raise AllconvError(f"${ENV_FAKE_SIZES}={raw!r}: give TRAIN,TEST image counts, e.g. 400,100") from None
            sizes = {"fake_train_size": train, "fake_test_size": test}
        return DataConfig(
            dataset=self.dataset,
            data_dir=self.data_dir,
            subset=self.subset,
            val_size=self.val_size,
            test_size=self.test_size,
            preprocess=self.preprocess,
            seed=self.seed,
            **sizes,
        )

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
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise AllconvError(f"unknown config keys {sorted(unknown)}: allowed are {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_params(cls, params: dict[str, str]) -> TrainConfig:
        """Rebuild a config from MLflow params (the inverse of :meth:`to_params`)."""
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in params:
                continue
            raw, kind = params[f.name], str(f.type)
            if raw == "None":
                kwargs[f.name] = None
            elif kind.startswith(("tuple", "dict")):
                kwargs[f.name] = json.loads(raw)
            elif kind == "bool":
                kwargs[f.name] = raw == "True"
            elif kind.startswith("int"):
                kwargs[f.name] = int(raw)
            elif kind.startswith("float"):
                kwargs[f.name] = float(raw)
            else:
                kwargs[f.name] = raw
        return cls(**kwargs)
