"""``allconv search``: parse the options, run one study session (``search.study.run_study``), print it."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

import click
from click.core import ParameterSource

from allconv_cli import stores
from allconv_cli.cli import main
from allconv_cli.cli.options import data_options, experiment_option, hyperparameter_options, network_options
from allconv_cli.search import plan


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
              help="Create the storage, the study, the MLflow experiment and parent run, train nothing: run once "
                   "before starting workers on a cluster (they run the same command without --prepare).")
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
    if not worker_plan:  # before torch, MLflow and Optuna are imported: an unusable store fails in milliseconds
        stores.check_tracking_store(write=not summarize_only)
        stores.check_sqlite_writable(storage_url or plan.default_storage_url(), "the Optuna storage",
                                     f"pass --storage with a folder you can write; {stores.DOCKER_HINT}")
    if register and not retrain_best:
        raise click.UsageError("--register names the --retrain-best run's model: add --retrain-best")
    if prepare_only and (summarize_only or retrain_best):
        raise click.UsageError("--prepare trains nothing: drop --summarize / --retrain-best")
    from rich.console import Console

    from allconv_cli.search import study, view

    if threading.current_thread() is threading.main_thread():  # (not when a test runs the CLI in a thread)
        # a cluster stops a job with SIGTERM: checkpoint the running trial and stop as on Ctrl-C
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    if worker_plan:
        sys.exit(study.run_worker_process(worker_plan, worker_index))
    # a log (CI, `| tee`) gets one line per message; a terminal, lines wrapped between words; survives `| tee`
    console = view.pipe_safe(Console(soft_wrap=not sys.stdout.isatty()))
    ctx = click.get_current_context()
    given = {k for k in ctx.params if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE,
                                                                       ParameterSource.ENVIRONMENT)}
    run_options = {k: options.pop(k) for k in ("experiment", "pruner", "workers", "timeout", "heartbeat_interval",
                                               "grace_period", "max_retry")}
    settings, notes = plan.plan_search(space_name, options, given, overrides, trials=trials, storage_url=storage_url,
                                       study_name=study_name, **run_options)
    for note in notes:
        console.print(f"note: {note}", highlight=False)
    outcome = study.run_study(settings, console, summarize_only=summarize_only, prepare_only=prepare_only)
    _print_outcome(console, outcome, started, summarize_only or prepare_only)
    if retrain_best:
        _retrain(console, outcome, final_epochs, register)
    # the address whole on one logical line (the terminal wraps it; a click or a copy gets all of it)
    console.print(study.parent.study_address(outcome.run), highlight=False, soft_wrap=True)


def _print_outcome(console: Any, outcome: Any, started: float, ran_nothing: bool) -> None:
    """The summary table, the wall time, and what to do next; exit 130 after an interruption."""
    from allconv_cli.search import view
    from allconv_cli.tracking.schema import StudyState

    if outcome.summary is not None:
        console.print(view.summary_table(outcome.summary, outcome.run.settings))
    if not ran_nothing:
        total = time.perf_counter() - started
        setup = total - outcome.trials_seconds - outcome.summary_seconds
        console.print(f"Wall time {total:,.1f} s: start-up and data {setup:,.1f} s, trials "
                      f"{outcome.trials_seconds:,.1f} s, summary {outcome.summary_seconds:,.1f} s", highlight=False)
        if not outcome.ran and outcome.state == StudyState.COMPLETE:
            console.print("Pass a larger --trials to add more trials.")
    if outcome.state == StudyState.INTERRUPTED:
        console.print("Interrupted: the running trial was checkpointed. Rerun the same command to resume the study.")
        sys.exit(130)
    if outcome.state == StudyState.TIMEOUT:
        console.print("Timeout reached: rerun the same command to add the remaining trials.")


def _retrain(console: Any, outcome: Any, final_epochs: int | None, register: str | None) -> None:
    from allconv_cli.search import parent

    final = parent.retrain_best(outcome.study, outcome.run, console, final_epochs, register=register)
    if final is not None:
        test = final.result.test_error
        console.print(f"Final run {final.run_id}: {final.result.status}, test error "
                      f"{'-' if test is None else f'{test:.2f}%'}")
        if final.result.status == "interrupted":
            sys.exit(130)
