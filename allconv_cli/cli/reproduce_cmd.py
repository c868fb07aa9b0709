"""``allconv reproduce``: the paper's Table 3 experiment (one Optuna grid study per network, tracked in MLflow)."""

from __future__ import annotations

import sys
import time
from typing import Any

import click
from click.core import ParameterSource

from allconv_cli import paper
from allconv_cli.cli import main
from allconv_cli.cli.options import data_options, experiment_option, field_option


@main.command("reproduce")
@click.option("--models", default=",".join(paper.BASES), show_default=True, metavar="LIST",
              help="Base networks of Table 1, comma-separated.")
@click.option("--branches", default=",".join(paper.BRANCHES), show_default=True, metavar="LIST",
              help="Variants of Table 2, comma-separated.")
@click.option("--protocol", type=click.Choice([*paper.PROTOCOLS, "both"]), default="paper", show_default=True,
              help="paper: all training images, lr picked on the TEST set (as the paper did). validated: lr picked "
                   "on a --val-size validation split, then retrained on all training images and tested once, the "
                   "honest number. both: run the two.")
@click.option("--lrs", default=",".join(f"{lr:g}" for lr in paper.LRS), show_default=True, metavar="LIST",
              help="The learning-rate grid: one trial per lr and network.")
@click.option("--epochs", type=click.IntRange(min=1), default=paper.EPOCHS, show_default=True,
              help="Epochs per trial; lr x0.1 after 4/7, 5/7 and 6/7 of them (200, 250, 300 of 350).")
@field_option("collapse_retries")
@data_options
@experiment_option("allconv-reproduce")
@click.option("--storage", envvar="ALLCONV_STORAGE", metavar="URL",
              help="Optuna storage shared by every process of the reproduction (as allconv search) "
                   "[default: sqlite:///optuna.db in this folder; env ALLCONV_STORAGE].")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Trial processes on this machine (GPUs round-robin); a network has len(--lrs) trials, so more "
                   "workers than lrs only help across hosts or with another invocation.")
@click.option("--heartbeat-interval", hidden=True, type=click.IntRange(min=1), envvar="ALLCONV_HEARTBEAT_INTERVAL")
@click.option("--grace-period", hidden=True, type=click.IntRange(min=1), envvar="ALLCONV_HEARTBEAT_GRACE")
def reproduce_command(models: str, branches: str, protocol: str, lrs: str, epochs: int, collapse_retries: int,
                      experiment: str, storage: str | None, workers: int, heartbeat_interval: int | None,
                      grace_period: int | None, **data: Any) -> None:
    """Train the paper's networks once per learning rate of its grid and compare with Table 3.

    Each selected network is an Optuna study with a grid sampler over --lrs (an MLflow parent run with one child
    run per lr, in --experiment); every other hyperparameter is the paper's: SGD with momentum 0.9, weight decay
    0.001, dropout 20%/50%, GCN + ZCA whitening, no augmentation. A run that collapses (dead ReLUs) is restarted
    with a new seed, same data split, up to --collapse-retries times. Under --protocol validated the chosen lr is
    then retrained on all training images (a final run, same epochs) and tested once. Rerunning the same command
    resumes; running it on several hosts with one --storage and MLFLOW_TRACKING_URI splits the trials. The full
    Table 3:

      allconv reproduce --protocol both

    Then `allconv report` prints the comparison.
    """
    from allconv_cli import report, reproduce
    from allconv_cli.search import view
    from allconv_cli.tracking.schema import StudyState

    plan = reproduce.ReproducePlan(
        models=reproduce.parse_models(models),
        branches=reproduce.parse_branches(branches),
        protocols=list(paper.PROTOCOLS) if protocol == "both" else [protocol],
        lrs=reproduce.parse_lrs(lrs),
        epochs=epochs,
        data=data,
        experiment=experiment,
        storage_url=storage,
        workers=workers,
        collapse_retries=collapse_retries,
    )
    for protocol_name, base, branch in plan.studies():  # every bad value is reported before anything starts
        reproduce.base_config(plan, base, branch, protocol_name)
    console = view.pipe_safe(report.report_console())  # Ctrl-C with `| tee`: no broken pipe mid-checkpoint
    ctx = click.get_current_context()
    if "paper" in plan.protocols and ctx.get_parameter_source("val_size") == ParameterSource.COMMANDLINE:
        console.print("note: --protocol paper trains on all training images: --val-size applies to validated only")
    studies = plan.studies()
    console.print(f"Reproducing {len(plan.networks())} network(s) x {len(plan.lrs)} lrs x {epochs} epochs, "
                  f"protocol {', '.join(plan.protocols)}: {len(studies) * len(plan.lrs)} trials in MLflow "
                  f"experiment {experiment!r}", highlight=False)
    started = time.perf_counter()
    outcomes = reproduce.reproduce(plan, console, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    seconds = time.perf_counter() - started
    experiments = sorted({experiment} | {o.experiment for o in outcomes})
    wanted = {(o.base, o.branch) for o in outcomes}
    report.render_rich(report.build_report(experiments, networks=wanted, include_studies=False), console)
    console.print(f"{sum(o.state == StudyState.COMPLETE for o in outcomes)} of {len(studies)} studies complete in "
                  f"{seconds:,.0f} s; the full table: allconv report", highlight=False)
    if any(o.state == StudyState.INTERRUPTED for o in outcomes):
        console.print("Interrupted: the running trial was checkpointed. Rerun the same command to resume.")
        sys.exit(130)
    if any(o.state != StudyState.COMPLETE for o in outcomes):
        console.print("Some trials are still running in other processes: rerun the same command to wait for them.")
