"""Option groups shared by several commands, so ``train``, ``search`` and ``reproduce`` spell them the same way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

# Duplicated from the library modules on purpose: importing them would pull in torch at ``--help`` time.
# tests/test_models.py::test_cli_choices_match_the_library checks them against models / data / config.
BASES = ("A", "B", "C")
BRANCHES = ("model", "strided", "convpool", "allcnn")
DATASETS = ("cifar10", "cifar100", "fake")
PREPROCESSINGS = ("gcn-zca", "standardize", "none")
AUGMENTATIONS = ("none", "flip-translate")
OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
INITS = ("xavier", "kaiming", "gaussian", "torch")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

F = Callable[..., Any]


def _apply(options: list[Callable[[F], F]]) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def network_options(fn: F) -> F:
    return _apply(
        [
            click.option(
                "--model",
                type=click.Choice(BASES, case_sensitive=False),
                default="C",
                show_default=True,
                help="Base network of Table 1.",
            ),
            click.option(
                "--branch",
                type=click.Choice(BRANCHES),
                default="allcnn",
                show_default=True,
                help="model (max-pool), strided, convpool or allcnn (Table 2).",
            ),
        ]
    )(fn)


def data_options(fn: F) -> F:
    return _apply(
        [
            click.option("--dataset", type=click.Choice(DATASETS), default="cifar10", show_default=True),
            click.option(
                "--data-dir",
                envvar="ALLCONV_DATA_DIR",
                type=click.Path(file_okay=False),
                help="torchvision root or folder of train*.npz + test.npz [env ALLCONV_DATA_DIR].",
            ),
            click.option("--subset", type=int, help="Train on a stratified N-image part of the training set."),
            click.option(
                "--val-size",
                type=click.IntRange(min=0),
                default=5000,
                show_default=True,
                help="Validation images held out of the training set (selection happens on these).",
            ),
            click.option(
                "--test-size",
                type=int,
                help="Test on a stratified N-image part of the test set (quick runs) [default: all of it].",
            ),
            click.option("--preprocess", type=click.Choice(PREPROCESSINGS), default="gcn-zca", show_default=True),
            click.option("--seed", type=int, default=0, show_default=True),
            click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        ]
    )(fn)


def _milestones(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of epochs, e.g. 200,250,300") from None


def hyperparameter_options(fn: F) -> F:
    return _apply(
        [
            click.option("--lr", type=float, default=0.05, show_default=True),
            click.option("--epochs", type=click.IntRange(min=1), default=350, show_default=True),
            click.option(
                "--milestones",
                callback=_milestones,
                help="Epochs after which lr x0.1, e.g. 200,250,300 [default: 4/7, 5/7, 6/7 of --epochs].",
            ),
            click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True),
            click.option(
                "--optimizer",
                type=click.Choice(OPTIMIZERS),
                default="sgd",
                show_default=True,
                help="sgd is classic momentum (the paper's); nesterov, adam, adamw.",
            ),
            click.option("--momentum", type=float, default=0.9, show_default=True),
            click.option("--weight-decay", type=float, default=1e-3, show_default=True),
            click.option("--dropout-input", type=float, default=0.2, show_default=True),
            click.option("--dropout-hidden", type=float, default=0.5, show_default=True),
            click.option("--bn/--no-bn", default=False, show_default=True, help="BatchNorm after each conv."),
            click.option("--init", type=click.Choice(INITS), default="xavier", show_default=True),
            click.option("--init-std", type=float, default=0.05, show_default=True, help="Std of --init gaussian."),
            click.option(
                "--head-relu/--no-head-relu",
                default=True,
                show_default=True,
                help="ReLU on the class scores before the global average, as in the paper's table.",
            ),
            click.option("--label-smoothing", type=float, default=0.0, show_default=True),
            click.option("--augment", type=click.Choice(AUGMENTATIONS), default="none", show_default=True),
            click.option("--compile/--no-compile", default=False, show_default=True, help="torch.compile the model."),
            click.option(
                "--compile-mode",
                type=click.Choice(COMPILE_MODES),
                default="default",
                show_default=True,
                help="torch.compile mode; reduce-overhead uses CUDA graphs (small batches are launch-bound).",
            ),
            click.option(
                "--collapse-patience",
                type=click.IntRange(min=0),
                default=5,
                show_default=True,
                help="Stop a run whose output is constant (dead ReLUs) for N epochs; 0 never stops.",
            ),
            click.option("--amp/--no-amp", default=True, show_default=True, help="bf16 autocast on CUDA."),
            click.option(
                "--test-every",
                type=click.IntRange(min=0),
                default=0,
                show_default=True,
                help="Also log test accuracy every N epochs (never used for selection).",
            ),
        ]
    )(fn)


def experiment_option(default: str) -> Callable[[F], F]:
    return click.option(
        "--experiment",
        default=default,
        show_default=True,
        envvar="MLFLOW_EXPERIMENT_NAME",
        help="MLflow experiment [env MLFLOW_EXPERIMENT_NAME].",
    )
