"""Click options generated from :class:`~allconv_cli.config.TrainConfig`'s field metadata (torch-free).

Defaults, help texts, choices and ranges are declared once in ``config.py``; every command that takes training
options spells them through :func:`field_option`, so ``train``, ``search``, ``reproduce`` and ``bench`` agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from allconv_cli import config

F = Callable[..., Any]


def _milestones(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of epochs, e.g. 200,250,300") from None


def _click_type(name: str) -> Any:
    spec, (base, _) = config.spec(name), config.field_type(name)
    if spec.choices is not None:
        return click.Choice(spec.choices, case_sensitive=name != "model")
    if name == "data_dir":
        return click.Path(file_okay=False)
    # Ranges are not click's: TrainConfig.validate checks them, one message for every way a config is made
    # (options, --set, a space's fixed values, stored params).
    return base if base in (int, float) else None


def field_option(name: str, **overrides: Any) -> Callable[[F], F]:
    """The ``--flag`` of one TrainConfig field, with its declared default, help, choices and envvar."""
    spec, (base, _) = config.spec(name), config.field_type(name)
    flag = config.option_flag(name)
    kwargs: dict[str, Any] = {"help": spec.help, "show_default": True}
    if base is bool:
        flag = f"{flag}/--no-{flag[2:]}"
    if name == "milestones":
        kwargs["callback"] = _milestones
    else:
        kwargs["type"] = _click_type(name)
    default = config.default(name)
    if default is not None:
        kwargs["default"] = default
    if spec.envvar:
        kwargs["envvar"] = spec.envvar
    kwargs.update(overrides)
    return click.option(flag, name, **kwargs)


def _apply(names: tuple[str, ...], **overrides: Any) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        for name in reversed(names):
            fn = field_option(name, **overrides.get(name, {}))(fn)
        return fn

    return decorate


NETWORK_OPTIONS = ("model", "branch")
DATA_OPTIONS = (*config.fields_where(group="data"), "data_dir", "device")
HYPERPARAMETER_OPTIONS = tuple(
    n for n in config.OPTION_FIELDS if n not in NETWORK_OPTIONS and n not in DATA_OPTIONS
)

network_options = _apply(NETWORK_OPTIONS)
data_options = _apply(DATA_OPTIONS)
hyperparameter_options = _apply(HYPERPARAMETER_OPTIONS)


def experiment_option(default: str) -> Callable[[F], F]:
    return click.option(
        "--experiment",
        default=default,
        show_default=True,
        envvar="MLFLOW_EXPERIMENT_NAME",
        help="MLflow experiment [env MLFLOW_EXPERIMENT_NAME].",
    )
