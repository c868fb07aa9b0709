"""``allconv search``: parse the options, run one study session (:func:`allconv_cli.search.run_study`), print it."""

from __future__ import annotations

import sys
import time
from typing import Any

import click
from click.core import ParameterSource

from allconv_cli import stores
from allconv_cli.cli import main
from allconv_cli.cli.options import data_options, experiment_option, hyperparameter_options, network_options
from allconv_cli.search import settings as plan


@main.command("search")
@network_options
@hyperparameter_options
@data_options
@experiment_option("allconv")
@click.option("--space", "space_name", default="default", show_default=True, metavar="NAME|FILE",
              help="A shipped search space (see 'allconv spaces') or a path to a .yaml file.")
@click.option("--trials", type=click.IntRange(min=1), default=40, show_default=True,
              help="Finished trials the study should hold; rerunning adds trials up to this total. A grid is capped "
                   "at its size.")
@click.option("--pruner", type=click.Choice(plan.PRUNERS), default=plan.DEFAULT_PRUNER, show_default=True,
              help="Stop unpromising trials early on their per-epoch validation accuracy.")
@click.option("--storage", "storage_url", envvar="ALLCONV_STORAGE", metavar="URL",
              help="Optuna storage, any SQLAlchemy URL (postgresql://user:pw@host/db for many hosts) "
                   f"[default: sqlite:///{plan.DEFAULT_STORAGE_FILE} in this folder; env ALLCONV_STORAGE].")
@click.option("--study-name", help="[default: allconv_<model>_<branch>-<space>, e.g. allconv_b_convpool-default]")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Trial processes on this machine, sharing the storage (GPUs assigned round-robin).")
@click.option("--timeout", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Start no new trial after this many seconds (running trials finish).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Set any TrainConfig field for every trial (e.g. --set lr_gamma=0.2); repeatable.")
@click.option("--summarize", "summarize_only", is_flag=True,
              help="Run no trial: write the study's summary (best params, CSV, plots) to its MLflow parent run.")
@click.option("--prepare", "prepare_only", is_flag=True,
              help="Run no trial: create the storage tables, the study, its MLflow experiment and parent run, then "
                   "exit. Run it once before the workers of a cluster (deploy/slurm), with the same options.")
@click.option("--retrain-best", is_flag=True,
              help="Afterwards, train the best config on train+validation and evaluate it once on the test set.")
@click.option("--final-epochs", type=click.IntRange(min=1),
              help="Epochs of the --retrain-best run [default: the study's --epochs].")
@click.option("--register", metavar="NAME",
              help="With --retrain-best: register the final run's model (raw images in) as NAME in MLflow's registry.")
@click.option("--worker", "worker_plan", hidden=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--worker-index", hidden=True, type=int, default=0)
@click.option("--heartbeat-interval", hidden=True, type=click.IntRange(min=1), default=plan.DEFAULT_HEARTBEAT_INTERVAL,
              envvar="ALLCONV_HEARTBEAT_INTERVAL", help="Seconds between a running trial's heartbeats.")
@click.option("--grace-period", hidden=True, type=click.IntRange(min=1), default=plan.DEFAULT_GRACE_PERIOD,
              envvar="ALLCONV_HEARTBEAT_GRACE", help="Seconds without a heartbeat after which a trial is retried.")
@click.option("--max-retry", hidden=True, type=click.IntRange(min=0), default=plan.DEFAULT_MAX_RETRY,
              envvar="ALLCONV_MAX_RETRY", help="Retries of a trial whose worker was lost.")
def search_command(space_name: str, trials: int, overrides: tuple[str, ...], summarize_only: bool, prepare_only: bool,
                   retrain_best: bool, final_epochs: int | None, register: str | None, worker_plan: str | None,
                   worker_index: int, storage_url: str | None, study_name: str | None, **options: Any) -> None:
    """Search hyperparameters with Optuna; every trial is an MLflow run nested under the study's run.

    The objective is the validation accuracy after the last epoch, maximised; the test set is only recorded. Values
    the space does not sample come from the options (explicit options also override the space's fixed values), e.g.

      allconv search --model B --branch convpool --trials 40

    Rerunning the same command resumes the study; then run `mlflow ui` here to compare the trials.
    """
    started = time.perf_counter()
    _refuse_conflicts(register, retrain_best, prepare_only, summarize_only)
    if not worker_plan:  # before torch, MLflow and Optuna are imported: an unusable store fails in milliseconds
        stores.check_tracking_store(write=not summarize_only)
        stores.check_sqlite_writable(storage_url or plan.default_storage_url(), "the Optuna storage",
                                     f"pass --storage with a folder you can write; {stores.DOCKER_HINT}")
    from rich.console import Console

    from allconv_cli import search

    if worker_plan:
        sys.exit(search.run_worker_process(worker_plan, worker_index))
    console = search.pipe_safe(Console(soft_wrap=True))  # one line per message (logs, CI); survives `| tee`
    ctx = click.get_current_context()
    given = {k for k in ctx.params if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE,
                                                                       ParameterSource.ENVIRONMENT)}
    run_options = {k: options.pop(k) for k in ("experiment", "pruner", "workers", "timeout", "heartbeat_interval",
                                               "grace_period", "max_retry")}
    settings, notes = search.plan_search(space_name, options, given, overrides, trials=trials, storage_url=storage_url,
                                         study_name=study_name, **run_options)
    for note in notes:
        console.print(f"note: {note}", highlight=False)
    outcome = search.run_study(settings, console, summarize_only=summarize_only, prepare_only=prepare_only)
    if outcome.status == "prepared":
        return _say_prepared(console, outcome)
    if outcome.summary is not None:
        console.print(search.summary_table(outcome.summary, settings))
    if not summarize_only:
        total = time.perf_counter() - started
        setup = total - outcome.trials_seconds - outcome.summary_seconds
        console.print(f"Wall time {total:,.1f} s: start-up and data {setup:,.1f} s, trials "
                      f"{outcome.trials_seconds:,.1f} s, summary {outcome.summary_seconds:,.1f} s", highlight=False)
        if not outcome.ran and outcome.status == "done":
            console.print("Pass a larger --trials to add more trials.")
    if outcome.status == "interrupted":
        console.print("Interrupted: the running trial was checkpointed. Rerun the same command to resume the study.")
        sys.exit(130)
    if outcome.status == "timeout":
        console.print("Timeout reached: rerun the same command to add the remaining trials.")
    if retrain_best:
        final = search.retrain_best(outcome.study, outcome.run, console, final_epochs, register=register)
        if final is not None:
            test = final.result.test_error
            console.print(f"Final run {final.run_id}: {final.result.status}, test error "
                          f"{'-' if test is None else f'{test:.2f}%'}")
            if final.result.status == "interrupted":
                sys.exit(130)
    console.print(search.study_address(outcome.run), highlight=False)


def _refuse_conflicts(register: str | None, retrain_best: bool, prepare_only: bool, summarize_only: bool) -> None:
    """Options that contradict each other: one usage line, exit 2, before anything is created."""
    if register and not retrain_best:
        raise click.UsageError("--register names the --retrain-best run's model: add --retrain-best")
    if prepare_only and (summarize_only or retrain_best):
        raise click.UsageError("--prepare runs no trial: drop --summarize and --retrain-best")


def _say_prepared(console: Any, outcome: Any) -> None:
    """What ``--prepare`` made, and what comes next (a cluster's prepare job log)."""
    from allconv_cli import search

    settings = outcome.run.settings
    console.print(f"Prepared study {settings.study_name} in {search.safe_url(settings.storage_url)} "
                  f"({outcome.counts.finished} of {settings.trials} trials finished); start its workers with the "
                  "same command without --prepare.", highlight=False)
    console.print(search.study_address(outcome.run), highlight=False)
