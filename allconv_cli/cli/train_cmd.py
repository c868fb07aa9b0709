"""``allconv train``: one tracked training run with the paper's protocol as defaults."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import click

from allconv_cli.cli import main
from allconv_cli.cli.options import (
    data_options,
    experiment_option,
    hyperparameter_options,
    network_options,
)


@main.command("train")
@network_options
@hyperparameter_options
@data_options
@experiment_option("allconv")
@click.option("--run-name", help="MLflow run name [default: the network's name].")
@click.option(
    "--resume",
    "resume_run_id",
    metavar="RUN_ID",
    help="Continue this MLflow run from its last checkpoint (its logged config is used).",
)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Upload the rolling 'last' checkpoint to MLflow every N epochs.",
)
@click.option("--register", metavar="NAME",
              help="Register the finished run's model (raw uint8 images in, probabilities out) as NAME in MLflow's "
                   "model registry.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end (progress goes to stderr).")
def train_command(
    resume_run_id: str | None,
    experiment: str,
    run_name: str | None,
    checkpoint_every: int,
    register: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Train one network and log params, per-epoch metrics, checkpoints and the model to MLflow.

    Defaults are the paper's CIFAR-10 protocol: SGD with momentum 0.9, lr 0.05, weight decay 0.001, 350 epochs,
    lr x0.1 after epochs 200, 250 and 300, dropout 20%/50%, GCN + ZCA whitening, no augmentation.
    """
    from allconv_cli.stores import check_tracking_store

    check_tracking_store(write=not resume_run_id)  # before torch and MLflow are imported: fails in milliseconds

    from rich.console import Console

    from allconv_cli.config import TrainConfig
    from allconv_cli.progress import summary_table
    from allconv_cli.tracking import store
    from allconv_cli.tracking.schema import Status

    console = Console(stderr=as_json)
    if resume_run_id:
        resumed = _resumable(resume_run_id, console, as_json)
        if resumed is None:
            return
        cfg, experiment_name = resumed
    else:
        cfg, experiment_name = TrainConfig(**options), experiment
    outcome = _train(console, cfg, experiment=experiment_name, run_name=run_name or cfg.registry_name,
                     resume_run_id=resume_run_id, checkpoint_every=checkpoint_every, register=register)
    result = outcome.result
    if as_json:
        click.echo(_outcome_json(outcome, experiment_name))
    else:
        console.print(summary_table(result, outcome.run_id))
    run = store.get_run(outcome.run_id)
    where = "" if store.tracking_uri().startswith("http") else " (after `mlflow ui` in this folder)"
    console.print(f"Open the run{where}: {store.ui_url(run.info.experiment_id, outcome.run_id)}", soft_wrap=True)
    if result.status == Status.INTERRUPTED:
        console.print(f"Interrupted: resume with  allconv train --resume {outcome.run_id}", highlight=False,
                      soft_wrap=True)
        sys.exit(130)


def _train(console: Any, cfg: Any, *, run_name: str, **kwargs: Any) -> Any:
    """The run in the terminal view: its stages (data, GCN + ZCA, the step measured for the estimate, the network),
    the estimate, then its epochs with the time left."""
    from allconv_cli.data import load_onto
    from allconv_cli.engine import resolve_device
    from allconv_cli.estimate import Sizes
    from allconv_cli.progress import TerminalView, measure_run
    from allconv_cli.tracking.run import run_tracked

    with TerminalView(console) as view:
        data = load_onto(cfg.data_config(), resolve_device(cfg.device), view.stage)
        expected = measure_run(view, cfg, Sizes.of(data), data.num_classes, study=False)
        view.stage("starting the MLflow run, building the network")
        progress = view.track(run_name, expected_epoch=expected.epoch_seconds if expected else None,
                              expected_eval=expected.eval_seconds if expected else 0.0)
        return run_tracked(
            cfg, run_name=run_name, hooks=[progress], data=data,
            on_retry=lambda dead, number, seed: view.say(
                f"run {dead.run_id} collapsed ({dead.reason}); restarting as attempt {number} of "
                f"{cfg.collapse_retries + 1} with seed {seed} (same data split)"),
            **kwargs,
        )


def _resumable(run_id: str, console: Any, as_json: bool) -> tuple[Any, str] | None:
    """The config and experiment of the run to resume; None (having said so) when it already finished."""
    from allconv_cli.config import TrainConfig
    from allconv_cli.tracking import store
    from allconv_cli.tracking.schema import Metric, Status

    run = store.get_run(run_id)
    done = store.finished_epochs(run)
    if done is not None:  # says so and stops: no epoch trained, no second model logged
        console.print(f"Run {run_id} already finished ({done} epochs): nothing to resume; start a new run "
                      "with allconv train (e.g. with more --epochs)", highlight=False, soft_wrap=True)
        if as_json:
            metrics = run.data.metrics
            click.echo(json.dumps({"run_id": run_id, "status": Status.FINISHED.value, "epochs": done,
                                   "val_accuracy": metrics.get(Metric.FINAL_VAL_ACCURACY),
                                   "test_accuracy": metrics.get(Metric.TEST_ACCURACY), "resumed": False}))
        return None
    cfg = TrainConfig.from_params(run.data.params)
    experiment_name = store.experiment_name(run_id)
    console.print(f"Resuming run {run_id} ({cfg.model}/{cfg.branch}) in experiment {experiment_name!r}")
    return cfg, experiment_name


def _outcome_json(outcome: Any, experiment_name: str) -> str:
    """``--json``: how the run ended, in one object (the tracking URI without secrets)."""
    from allconv_cli.tracking import store

    result = outcome.result
    return json.dumps({
        "run_id": outcome.run_id, "status": result.status, "reason": result.reason,
        "epochs": result.epochs_completed, "val_accuracy": result.val_accuracy,
        "best_val_accuracy": result.best_val_accuracy, "best_epoch": result.best_epoch,
        "test_accuracy": result.test_accuracy, "test_loss": result.test_loss,
        "images_per_second": result.images_per_second, "seconds": result.seconds,
        "tracking_uri": store.shown_uri(), "experiment": experiment_name,
        "attempts": [dataclasses.asdict(a) for a in outcome.attempts],
    })
