"""The study's MLflow parent run: found or created once, opened and closed around trials, and given the summary
(best params, every trial as CSV, plots); and the retraining of the best trial's config as its child.

The parent is found again through the study's user attribute ``allconv.parent_run_id`` (and, failing that, by the
tags ``allconv.study_uid`` + ``allconv.role=study``); hosts started independently settle on the first id written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from allconv_cli import paper
from allconv_cli.config import TrainConfig
from allconv_cli.errors import AllconvError
from allconv_cli.progress import RichProgress
from allconv_cli.search.budget import count_trials
from allconv_cli.search.settings import OBJECTIVES, SearchSettings, StudyRun, first_line, safe_url
from allconv_cli.search.storage import PARENT_ATTR, UID_ATTR, wait_for_attr
from allconv_cli.tracked_run import RunOutcome, prepare_data, run_tracked
from allconv_cli.tracking import store
from allconv_cli.tracking.store import TAG

STUDY_STATE = {"done": "complete", "timeout": "incomplete", "pending": "incomplete", "interrupted": "interrupted",
               "exhausted": "exhausted", "failed": "failed"}
RUN_END = {"interrupted": "KILLED", "failed": "FAILED"}  # every other status ends the parent FINISHED


def _run_alive(run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        run = store.get_run(run_id)
    except Exception:
        return False
    return run.info.lifecycle_stage == "active"


def ensure_parent_run(study: optuna.Study, settings: SearchSettings, creator: bool = True) -> str:
    """The study's one parent run: the one recorded on the study, else the one tagged for it, else a new one.

    The process that created the study creates the parent (before any worker of it starts); processes that only
    loaded the study wait for its id. If the recorded run is gone (deleted), racing processes each write one and
    re-read: the last write wins and the losers delete theirs. ``settings.run_tags`` are (re)set on it either way.
    """
    stored = study.user_attrs.get(PARENT_ATTR)
    if stored is None and not creator:
        stored = wait_for_attr(study, PARENT_ATTR).get(PARENT_ATTR)
    if _run_alive(stored):
        store.try_set_tags(stored, settings.run_tags)  # also on parents made before the tags existed
        return stored
    mlc = store.client()
    exp_id = store.experiment_id(settings.experiment)
    uid = study.user_attrs.get(UID_ATTR, "")
    found = store.retrying(
        mlc.search_runs, [exp_id],
        filter_string=f"tags.`{TAG}study_uid` = '{uid}' and tags.`{TAG}role` = 'study'",
        order_by=["attributes.start_time ASC"], max_results=1,
    )
    created = not found
    run_id = found[0].info.run_id if found else _create_parent(exp_id, study, settings)
    study.set_user_attr(PARENT_ATTR, run_id)
    if not creator or stored is not None:
        time.sleep(0.5)  # others may be writing theirs right now: settle on the last write
    winner = study.user_attrs.get(PARENT_ATTR, run_id)
    if created and winner != run_id:
        with contextlib.suppress(Exception):
            mlc.delete_run(run_id)
    store.try_set_tags(winner, settings.run_tags)
    return winner


def _create_parent(exp_id: str, study: optuna.Study, settings: SearchSettings) -> str:
    space = settings.space()
    cfg = TrainConfig(**settings.base_config)
    tags = {
        f"{TAG}role": "study",
        f"{TAG}study_name": settings.study_name,
        f"{TAG}study_uid": study.user_attrs.get(UID_ATTR, ""),
        f"{TAG}storage": safe_url(settings.storage_url),
        f"{TAG}space": space.name,
        f"{TAG}space_sha": space.sha,
        f"{TAG}sampler": space.sampler,
        f"{TAG}pruner": settings.pruner,
        **store.config_tags(cfg),
        "mlflow.note.content": f"Optuna study {settings.study_name}: {space.description or space.source}",
        **settings.run_tags,
    }
    run = store.retrying(store.client().create_run, exp_id, tags=store.context_tags(tags),
                            run_name=settings.study_name)
    run_id = run.info.run_id
    params = {k: v for k, v in cfg.to_params().items() if k not in space.params}
    store.log_params(run_id, {**params, "objective": OBJECTIVES[settings.objective]})
    store.retrying(store.client().log_text, run_id, space.text, "space.yaml")
    entry = paper.TABLE3.get((cfg.model, cfg.branch))
    if entry is not None:
        store.log_metrics(run_id, {"paper_test_error": entry.error, "paper_2020_test_error": entry.error_2020})
    return run_id


def experiment_of(run_id: str, wanted: str, console: Console) -> str:
    """Children go where the parent is, so the UI nests them; say so if that is not ``wanted``."""
    run = store.get_run(run_id)
    name = store.retrying(store.client().get_experiment, run.info.experiment_id).name or wanted
    if name != wanted:
        console.print(f"note: the study's MLflow runs are in experiment {name!r} (not {wanted!r}): continuing there")
    return name


def open_parent(run_id: str) -> None:
    with contextlib.suppress(Exception):
        store.retrying(store.client().update_run, run_id, status="RUNNING")
    store.try_set_tags(run_id, {f"{TAG}study_state": "running"})


def close_parent(run_id: str, status: str, settings: SearchSettings) -> None:
    state = STUDY_STATE.get(status, status)
    store.try_set_tags(run_id, {f"{TAG}study_state": state, f"{TAG}target_trials": str(settings.trials)})
    with contextlib.suppress(Exception):
        store.retrying(store.client().set_terminated, run_id, RUN_END.get(status, "FINISHED"))


# --------------------------------------------------------------------------------------------------------------------
# the summary on the parent run


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def best_config(trial: FrozenTrial) -> TrainConfig | None:
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        return None
    try:
        return TrainConfig.from_params(store.get_run(run_id).data.params)
    except Exception:
        return None


def summarize(study: optuna.Study, run: StudyRun, console: Console) -> dict[str, Any]:
    """Best params (JSON + tags), metrics, every trial as CSV and the plots, logged to the parent run."""
    settings, parent = run.settings, run.parent_run_id
    space = settings.space()
    c = count_trials(study.get_trials(deepcopy=False))
    best = best_trial(study)
    summary: dict[str, Any] = {
        "study_name": settings.study_name, "storage": safe_url(settings.storage_url), "space": space.name,
        "target_trials": settings.trials, "finished": c.finished, "complete": c.complete, "pruned": c.pruned,
        "failed": c.failed, "running": c.running, "parent_run_id": parent, "best": None,
    }
    metrics: dict[str, float | None] = {"n_complete": c.complete, "n_pruned": c.pruned, "n_failed": c.failed}
    tags: dict[str, str] = {}
    if best is not None:
        cfg = best_config(best)
        config = {k: getattr(cfg, k) for k in space.params} if cfg is not None else dict(best.params)
        run_id = best.user_attrs.get("mlflow_run_id")
        test_acc = None
        if run_id:
            with contextlib.suppress(Exception):
                test_acc = store.get_run(run_id).data.metrics.get("test_accuracy")
        summary["best"] = {"trial": best.number, "val_accuracy": best.value, "test_accuracy": test_acc,
                           "params": dict(best.params), "config": config, "mlflow_run_id": run_id}
        metrics |= {"best_val_accuracy": best.value, "best_trial_test_accuracy": test_acc,
                    "best_trial_test_error": paper.error_percent(test_acc)}
        tags = {f"{TAG}best_trial": str(best.number), f"{TAG}best_run_id": str(run_id),
                **{f"best.{k}": str(v) for k, v in config.items()}}
    tags["mlflow.note.content"] = describe_study(settings, c.finished, summary["best"])
    if parent:
        store.log_metrics(parent, metrics, step=c.finished)
        store.set_tags(parent, tags)
        with tempfile.TemporaryDirectory(prefix="allconv-summary-") as tmp:
            folder = Path(tmp)
            (folder / "best_params.json").write_text(json.dumps(summary, indent=2, default=str))
            with contextlib.suppress(Exception):
                study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "datetime_start",
                                              "datetime_complete", "duration")).to_csv(folder / "trials.csv",
                                                                                      index=False)
            for note in _plots(study, folder):
                console.print(f"note: {note}", highlight=False)
            store.retrying(store.client().log_artifacts, parent, str(folder), "summary")
    return summary


def describe_study(settings: SearchSettings, finished: int, best: dict[str, Any] | None) -> str:
    """The parent run's description (MLflow shows it on the run's page): what the study is, and how its best trial
    compares with the paper's Table 3 error for the same network."""
    cfg = TrainConfig(**settings.base_config)
    space = settings.space()
    lines = [f"Optuna study **{settings.study_name}** of {cfg.registry_name}: space `{space.name}` "
             f"({space.description or space.source}), {finished} of {settings.trials} trials finished, "
             f"{settings.pruner} pruner. Each trial is a child run; selection is on the validation split."]
    entry = paper.TABLE3.get((cfg.model, cfg.branch))
    if best is not None:
        error = paper.error_percent(best.get("test_accuracy"))
        line = f"Best trial {best['trial']}: validation accuracy {100 * best['val_accuracy']:.2f}%"
        if error is not None:
            line += f", its test error {error:.2f}% (recorded, never used to select)"
        if entry is not None:
            line += f"; the paper's {entry.display_name}: {entry.error:.2f}% (350 epochs, all 50,000 images)"
        lines.append(line + ".")
    return "\n\n".join(lines)


def _plots(study: optuna.Study, folder: Path) -> list[str]:
    """PNG plots with matplotlib (no plotly); returns notes for the plots that were skipped."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's plot/importance chatter about small studies
            return _draw_plots(study, folder)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _draw_plots(study: optuna.Study, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    notes: list[str] = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    def save(name: str, draw: Any) -> None:
        try:
            ax = draw()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(9, 5)
            fig.tight_layout()
            fig.savefig(folder / name, dpi=110)
        except Exception as exc:
            notes.append(f"{name} skipped: {first_line(exc)}")
        finally:
            plt.close("all")

    save("optimization_history.png", lambda: ovm.plot_optimization_history(study, target_name="val accuracy"))
    save("intermediate_values.png", lambda: ovm.plot_intermediate_values(study))
    note = ""
    if len(complete) < 2:
        note = f"parameter importances need at least 2 complete trials (the study has {len(complete)})"
    elif not study.best_trial.params:
        note = "parameter importances: the space samples no parameter"
    else:
        try:
            importances = optuna.importance.get_param_importances(study)
        except Exception as exc:
            importances, note = {}, f"parameter importances could not be computed: {first_line(exc)}"
        if importances:
            fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(importances)))
            names = list(importances)[::-1]
            ax.barh(names, [importances[n] for n in names], color="tab:blue")
            ax.set_xlabel("importance for val accuracy (PED-ANOVA, normalised)")
            ax.set_title(f"Parameter importances ({len(complete)} complete trials)")
            fig.tight_layout()
            fig.savefig(folder / "param_importances.png", dpi=110)
            plt.close(fig)
            (folder / "param_importances.json").write_text(json.dumps(importances, indent=2))
        elif not note:
            note = "parameter importances: no parameter varies across the complete trials"
    if note:
        (folder / "param_importances.txt").write_text(note + "\n")
        notes.append(note)
    return notes


# --------------------------------------------------------------------------------------------------------------------
# retraining the winner


def retrain_best(study: optuna.Study, run: StudyRun, console: Console, final_epochs: int | None = None,
                 register: str | None = None, trial: FrozenTrial | None = None) -> RunOutcome | None:
    """Train the best trial's config (or ``trial``'s) on train + validation (val_size=0) for the full schedule; test
    once. ``register`` registers its raw-image model under that name."""
    settings, parent = run.settings, run.parent_run_id
    best = trial or best_trial(study)
    if best is None:
        raise AllconvError(f"study {settings.study_name!r} has no complete trial yet: nothing to retrain")
    cfg = best_config(best)
    if cfg is None:
        raise AllconvError(f"the best trial {best.number} has no readable MLflow run: cannot rebuild its config")
    device = settings.base_config.get("device", cfg.device)
    cfg = dataclasses.replace(cfg, val_size=0, epochs=final_epochs or cfg.epochs, device=device)
    uid = study.user_attrs.get(UID_ATTR, "")
    done = store.retrying(
        store.client().search_runs, [store.experiment_id(run.experiment)],
        filter_string=(f"tags.`{TAG}study_uid` = '{uid}' and tags.`{TAG}role` = 'final'"
                       f" and tags.`{TAG}best_trial` = '{best.number}' and attributes.status = 'FINISHED'"
                       f" and params.epochs = '{cfg.epochs}'"),
        max_results=1,
    )
    if done:
        console.print(f"The best trial {best.number} was already retrained in run {done[0].info.run_id}.")
        return None
    tags = {f"{TAG}role": "final", f"{TAG}study_name": settings.study_name, f"{TAG}study_uid": uid,
            f"{TAG}best_trial": str(best.number), f"{TAG}source_run": str(best.user_attrs.get("mlflow_run_id"))}
    data = prepare_data(cfg)
    console.print(f"Retraining trial {best.number}'s config on train+validation for {cfg.epochs} epochs")
    with RichProgress(console, f"final (trial {best.number})") as progress:
        outcome = run_tracked(cfg, experiment=run.experiment, run_name="final-best", parent_run_id=parent,
                              tags=tags, hooks=[progress], data=data, log_model=True, register=register)
    if parent:
        result = outcome.result
        store.log_metrics(parent, {"final_test_accuracy": result.test_accuracy,
                                      "final_test_error": result.test_error})
        store.set_tags(parent, {f"{TAG}final_run_id": outcome.run_id})
    return outcome


def study_address(run: StudyRun) -> str:
    """The line that tells where to look at the study: its parent run's page in MLflow's training-runs view (the
    trials are listed there as child runs)."""
    exp_id = store.get_run(run.parent_run_id).info.experiment_id
    where = "" if store.tracking_uri().startswith("http") else " (after `mlflow ui` in this folder)"
    return f"Open the study{where}: {store.ui_url(exp_id, run.parent_run_id)}"
