"""``allconv search`` (Optuna studies tracked in MLflow) and ``allconv spaces`` (the shipped search spaces)."""

from __future__ import annotations

import sys
import time
from typing import Any

import click
from click.core import ParameterSource

from allconv_cli.cli import main
from allconv_cli.cli.options import data_options, experiment_option, hyperparameter_options, network_options
from allconv_cli.errors import AllconvError

PRUNERS = ("median", "hyperband", "none")  # duplicated from allconv_cli.search, which imports torch


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
@click.option("--pruner", type=click.Choice(PRUNERS), default="median", show_default=True,
              help="Stop unpromising trials early on their per-epoch validation accuracy.")
@click.option("--storage", envvar="ALLCONV_STORAGE", metavar="URL",
              help="Optuna storage, any SQLAlchemy URL (postgresql://user:pw@host/db for many hosts) "
                   "[default: sqlite:///optuna.db in this folder; env ALLCONV_STORAGE].")
@click.option("--study-name", help="[default: allconv_<model>_<branch>-<space>, e.g. allconv_b_convpool-default]")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Trial processes on this machine, sharing the storage (GPUs assigned round-robin).")
@click.option("--timeout", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Start no new trial after this many seconds (running trials finish).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Set any TrainConfig field for every trial (e.g. --set lr_gamma=0.2); repeatable.")
@click.option("--summarize", "summarize_only", is_flag=True,
              help="Run no trial: write the study's summary (best params, CSV, plots) to its MLflow parent run.")
@click.option("--retrain-best", is_flag=True,
              help="Afterwards, train the best config on train+validation and evaluate it once on the test set.")
@click.option("--final-epochs", type=click.IntRange(min=1),
              help="Epochs of the --retrain-best run [default: the study's --epochs].")
@click.option("--worker", "worker_plan", hidden=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--worker-index", hidden=True, type=int, default=0)
@click.option("--heartbeat-interval", hidden=True, type=click.IntRange(min=1), default=20,
              envvar="ALLCONV_HEARTBEAT_INTERVAL", help="Seconds between a running trial's heartbeats.")
@click.option("--grace-period", hidden=True, type=click.IntRange(min=1), default=60,
              envvar="ALLCONV_HEARTBEAT_GRACE", help="Seconds without a heartbeat after which a trial is retried.")
@click.option("--max-retry", hidden=True, type=click.IntRange(min=0), default=3, envvar="ALLCONV_MAX_RETRY",
              help="Retries of a trial whose worker was lost.")
def search_command(space_name: str, trials: int, pruner: str, storage: str | None, study_name: str | None,
                   workers: int, timeout: float | None, overrides: tuple[str, ...], summarize_only: bool,
                   retrain_best: bool, final_epochs: int | None, worker_plan: str | None, worker_index: int,
                   heartbeat_interval: int, grace_period: int, max_retry: int, experiment: str,
                   **options: Any) -> None:
    """Search hyperparameters with Optuna; every trial is an MLflow run nested under the study's run.

    The objective is the validation accuracy after the last epoch, maximised; the test set is only recorded. Values
    the space does not sample come from the options (explicit options also override the space's fixed values), e.g.

      allconv search --model B --branch convpool --trials 40

    Rerunning the same command resumes the study; then run `mlflow ui` here to compare the trials.
    """
    started = time.perf_counter()
    from rich.console import Console

    from allconv_cli import search, spaces
    from allconv_cli.config import TrainConfig

    if worker_plan:
        sys.exit(search.run_worker_process(worker_plan, worker_index))
    console = Console(soft_wrap=True)  # messages stay one line each (logs, CI), tables still fit the width
    space = spaces.load(space_name)
    ctx = click.get_current_context()
    cli_values = {k: v for k, v in options.items() if k in spaces.FIELD_TYPES}
    explicit = {k for k in cli_values if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE,
                                                                          ParameterSource.ENVIRONMENT)}
    sets = _parse_sets(overrides)
    base = {**cli_values, **space.fixed, **{k: cli_values[k] for k in explicit}, **sets}
    given = explicit | set(sets)
    for key in sorted(given & set(space.params)):
        console.print(f"note: {_flag(key, key in sets)} is ignored: the space {space.name} samples {key}")
    for key in sorted(given & set(space.fixed)):
        if base[key] != space.fixed[key]:
            console.print(f"note: {_flag(key, key in sets)} overrides the space's fixed {key}={space.fixed[key]!r}")
    base = TrainConfig(**base).to_dict()
    space.check_base(base)
    if base["val_size"] <= 0 and "val_size" not in space.params:
        raise AllconvError("a search selects on the validation split: pass --val-size > 0 (use --retrain-best to "
                           "train the winner on train+validation afterwards)")
    target = trials
    grid = space.grid_size()
    if grid is not None and trials > grid:
        target = grid
        if ctx.get_parameter_source("trials") == ParameterSource.COMMANDLINE:
            console.print(f"note: the grid of {space.name} has {grid} points: the study runs {grid} trials")
    storage_url = storage or search.default_storage_url()
    settings = search.SearchSettings(
        study_name=study_name or search.default_study_name(base["model"], base["branch"], space.name),
        storage_url=storage_url, experiment=experiment, space_source=space.source, space_name=space.name,
        space_text=space.text, base_config=base, trials=target, pruner=pruner, seed=int(base["seed"]),
        heartbeat_interval=heartbeat_interval, grace_period=max(grace_period, heartbeat_interval + 1),
        max_retry=max_retry, workers=workers, explicit=sorted(given),
    )
    rdb = search.open_storage(storage_url, heartbeat_interval=settings.heartbeat_interval,
                              grace_period=settings.grace_period, max_retry=max_retry)
    data = search.DataCache() if workers == 1 else None  # in-process trials reuse what is loaded here
    if not summarize_only:
        search.preload_data(settings, data)  # data errors before a study or a parent run exists
    setup_done = trials_done = time.perf_counter()
    if summarize_only:  # only reads: it must not create an empty study under a mistyped name
        study, creator = search.load_study(settings, rdb), True
    else:
        study, creator = search.create_or_load_study(settings, rdb)
    settings.parent_run_id = search.ensure_parent_run(study, settings, space, creator=creator)
    settings.experiment = _experiment_of(settings.parent_run_id, experiment, console)
    shown = search.safe_url(storage_url)
    status = "done"
    if not summarize_only:
        with search.host_lock(settings):
            requeued = search.requeue_interrupted(study)
        counts = search.count_trials(study.get_trials(deepcopy=False))
        if counts.finished or counts.running or counts.waiting:
            extra = f"; re-queued interrupted trial(s) {', '.join(map(str, requeued))}" if requeued else ""
            console.print(f"Resuming study {settings.study_name} in {shown}: {counts.finished} of {target} trials "
                          f"finished{extra}", highlight=False)
        else:
            console.print(f"Study {settings.study_name} in {shown}, space {space.source}: {target} trials, "
                          f"{pruner} pruner, {workers} worker(s)", highlight=False)
        if counts.finished >= target and not counts.running and not counts.waiting:
            console.print(f"The study already has {counts.finished} finished trials (--trials {target}): nothing "
                          f"to run; pass a larger --trials to add more.")
        else:
            settings.deadline = time.time() + timeout if timeout is not None else None
            search.open_parent(settings.parent_run_id)
            status = search.run_search(settings, study, rdb, console, data)
            search.close_parent(settings.parent_run_id, status, settings)
        trials_done = time.perf_counter()
    summary = search.summarize(study, settings, console)
    console.print(search.summary_table(summary, settings))
    if not summarize_only:
        now = time.perf_counter()
        console.print(f"Wall time {now - started:,.1f} s: start-up and data {setup_done - started:,.1f} s, trials "
                      f"{trials_done - setup_done:,.1f} s, summary {now - trials_done:,.1f} s", highlight=False)
    if status == "interrupted":
        console.print("Interrupted: the running trial was checkpointed. Rerun the same command to resume the study.")
        sys.exit(130)
    if status == "timeout":
        console.print("Timeout reached: rerun the same command to add the remaining trials.")
    if retrain_best:
        outcome = search.retrain_best(study, settings, console, final_epochs)
        if outcome is not None:
            result = outcome.result
            test = "-" if result.test_accuracy is None else f"{100 * (1 - result.test_accuracy):.2f}%"
            console.print(f"Final run {outcome.run_id}: {result.status}, test error {test}")
            if result.status == "interrupted":
                sys.exit(130)
    console.print("Compare the trials: run `mlflow ui` in this folder.")


def _flag(key: str, from_set: bool) -> str:
    return f"--set {key}" if from_set else f"--{key.replace('_', '-')}"


def _parse_sets(overrides: tuple[str, ...]) -> dict[str, Any]:
    """``--set key=value``: the value is read as YAML (numbers, true/false, lists), then typed by the field."""
    import yaml

    from allconv_cli import spaces

    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise AllconvError(f"--set {item!r}: write KEY=VALUE, e.g. --set lr_gamma=0.2")
        if key not in spaces.FIXABLE:
            allowed = ", ".join(spaces.FIXABLE)
            raise AllconvError(f"--set {item!r}: unknown hyperparameter {key!r}: allowed are {allowed}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
            out[key] = spaces.coerce(key, value)
        except (yaml.YAMLError, ValueError) as exc:
            raise AllconvError(f"--set {item!r}: {' '.join(str(exc).split())}") from None
    return out


def _experiment_of(run_id: str, wanted: str, console: Any) -> str:
    """Children go where the parent is, so the UI nests them; say so if that is not --experiment."""
    from allconv_cli import tracking

    run = tracking.get_run(run_id)
    name = tracking.client().get_experiment(run.info.experiment_id).name
    if name != wanted:
        console.print(f"note: the study's MLflow runs are in experiment {name!r} (not {wanted!r}): continuing there")
    return name
