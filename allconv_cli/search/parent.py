"""The study's MLflow parent run: found or created once, its state kept, and given the summary (best params, every
trial as CSV, plots); and the retraining of the best trial's config as its child.

The parent is found again through the study's user attribute ``allconv.parent_run_id`` (failing that, by the tags
``allconv.study_uid`` + ``allconv.role=study``). Only the process that created the study creates it; the others wait
for its id. Everything goes through the tracking door (:mod:`allconv_cli.tracking.store`).
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
from allconv_cli.data import load_onto
from allconv_cli.engine import resolve_device
from allconv_cli.errors import AllconvError, first_line
from allconv_cli.progress import TerminalView
from allconv_cli.search.budget import count_trials
from allconv_cli.search.plan import OBJECTIVES, SearchSettings, StudyRun
from allconv_cli.search.storage import wait_for_attr
from allconv_cli.stores import safe_url
from allconv_cli.tracking import store
from allconv_cli.tracking.run import RunOutcome, run_tracked
from allconv_cli.tracking.schema import (
    BEST_PARAM_PREFIX,
    Artifact,
    Metric,
    MlflowTag,
    Param,
    Role,
    StudyAttr,
    StudyState,
    Tag,
    TrialAttr,
)


def ensure_parent_run(study: optuna.Study, settings: SearchSettings, creator: bool = True) -> str:
    """The study's one parent run: the one recorded on the study, else the one tagged for it, else a new one.

    If the recorded run is gone (deleted), processes that notice at once each write one and re-read: the last
    write wins and the others delete theirs. ``settings.run_tags`` are (re)set on it either way.
    """
    recorded = study.user_attrs.get(StudyAttr.PARENT_RUN_ID)
    if recorded is None and not creator:
        recorded = wait_for_attr(study, StudyAttr.PARENT_RUN_ID).get(StudyAttr.PARENT_RUN_ID)
    if store.run_alive(recorded):
        store.try_set_tags(recorded, settings.run_tags)  # also on parents made before the tags existed
        return recorded
    uid = study.user_attrs.get(StudyAttr.STUDY_UID, "")
    found = store.find_runs(settings.experiment, f"tags.`{Tag.STUDY_UID}` = '{uid}' and tags.`{Tag.ROLE}` = "
                            f"'{Role.STUDY}'", order_by=["attributes.start_time ASC"], max_results=1)
    run_id = found[0].info.run_id if found else _create_parent(study, settings)
    study.set_user_attr(StudyAttr.PARENT_RUN_ID, run_id)
    if not creator or recorded is not None:
        time.sleep(0.5)  # others may be writing theirs right now: settle on the last write
    winner = study.user_attrs.get(StudyAttr.PARENT_RUN_ID, run_id)
    if not found and winner != run_id:
        with contextlib.suppress(Exception):
            store.delete_run(run_id)
    store.try_set_tags(winner, settings.run_tags)
    return winner


def _create_parent(study: optuna.Study, settings: SearchSettings) -> str:
    space = settings.space()
    cfg = TrainConfig(**settings.base_config)
    tags = {Tag.ROLE: Role.STUDY, Tag.STUDY_NAME: settings.study_name,
            Tag.STUDY_UID: study.user_attrs.get(StudyAttr.STUDY_UID, ""), Tag.STORAGE: safe_url(settings.storage_url),
            Tag.SPACE: space.name, Tag.SPACE_SHA: space.sha, Tag.SAMPLER: space.sampler, Tag.PRUNER: settings.pruner,
            **store.config_tags(cfg),
            MlflowTag.NOTE: f"Optuna study {settings.study_name}: {space.description or space.source}",
            **settings.run_tags}
    run_id = store.create_run(settings.experiment, tags, run_name=settings.study_name)
    params = {k: v for k, v in cfg.to_params().items() if k not in space.params}
    store.log_params(run_id, {**params, Param.OBJECTIVE: OBJECTIVES[settings.objective]})
    store.log_text(run_id, space.text, Artifact.SPACE)
    entry = paper.TABLE3.get((cfg.model, cfg.branch))
    if entry is not None:
        store.log_metrics(run_id, {Metric.PAPER_TEST_ERROR: entry.error,
                                   Metric.PAPER_2020_TEST_ERROR: entry.error_2020})
    return run_id


def experiment_of(run_id: str, wanted: str, console: Console) -> str:
    """Children go where the parent is, so the UI nests them; say so if that is not ``wanted``."""
    name = store.experiment_name(run_id) or wanted
    if name != wanted:
        console.print(f"note: the study's MLflow runs are in experiment {name!r} (not {wanted!r}): continuing there")
    return name


def set_state(run_id: str, state: StudyState, settings: SearchSettings) -> None:
    """The study's state on its parent run: RUNNING while trials run, ended as the session ended."""
    store.try_set_tags(run_id, {Tag.STUDY_STATE: state, Tag.TARGET_TRIALS: str(settings.trials)})
    with contextlib.suppress(Exception):
        store.set_run_status(run_id, state.mlflow)


def close_lost_run(lost_run: str, new_run: str, trial_number: int) -> None:
    """The run of a lost worker may still be RUNNING in MLflow: mark it failed and point to its retry."""
    with contextlib.suppress(Exception):
        if store.get_run(lost_run).info.status == "RUNNING":
            store.mark_failed(lost_run, f"worker lost; retried as trial {trial_number} in run {new_run}")
            store.try_set_tags(lost_run, {Tag.TRIAL_STATE: "failed"})
        store.try_set_tags(lost_run, {Tag.RETRIED_AS: new_run})


# --------------------------------------------------------------------------------------------------------------------
# the summary on the parent run


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def best_config(trial: FrozenTrial) -> TrainConfig | None:
    run_id = trial.user_attrs.get(TrialAttr.MLFLOW_RUN_ID)
    try:
        return TrainConfig.from_params(store.get_run(run_id).data.params) if run_id else None
    except Exception:
        return None


def note_estimate(study: optuna.Study, run: StudyRun, estimate: str) -> None:
    """The session's time estimate into the parent run's description, before the first trial trains."""
    if estimate:
        finished = count_trials(study.get_trials(deepcopy=False)).finished
        best = _best_summary(study, run.settings.space())
        store.try_set_tags(run.parent_run_id, {MlflowTag.NOTE: describe_study(run.settings, finished, best, estimate)})


def summarize(study: optuna.Study, run: StudyRun, console: Console, estimate: str = "") -> dict[str, Any]:
    """Best params (JSON + tags), metrics, every trial as CSV and the plots, logged to the parent run; ``estimate``
    (the session's time estimate) stays in its description."""
    settings, parent_id = run.settings, run.parent_run_id
    space = settings.space()
    c = count_trials(study.get_trials(deepcopy=False))
    summary: dict[str, Any] = {
        "study_name": settings.study_name, "storage": safe_url(settings.storage_url), "space": space.name,
        "target_trials": settings.trials, "finished": c.finished, "complete": c.complete, "pruned": c.pruned,
        "failed": c.failed, "running": c.running, "parent_run_id": parent_id, "best": _best_summary(study, space),
    }
    metrics: dict[str, float | None] = {Metric.N_COMPLETE: c.complete, Metric.N_PRUNED: c.pruned,
                                        Metric.N_FAILED: c.failed}
    tags: dict[str, str] = {}
    best = summary["best"]
    if best is not None:
        metrics |= {Metric.BEST_VAL_ACCURACY: best["val_accuracy"],
                    Metric.BEST_TRIAL_TEST_ACCURACY: best["test_accuracy"],
                    Metric.BEST_TRIAL_TEST_ERROR: paper.error_percent(best["test_accuracy"])}
        tags = {Tag.BEST_TRIAL: str(best["trial"]), Tag.BEST_RUN_ID: str(best["mlflow_run_id"]),
                **{f"{BEST_PARAM_PREFIX}{k}": str(v) for k, v in best["config"].items()}}
    tags[MlflowTag.NOTE] = describe_study(settings, c.finished, best, estimate)
    store.log_metrics(parent_id, metrics, step=c.finished)
    store.set_tags(parent_id, tags)
    with tempfile.TemporaryDirectory(prefix="allconv-summary-") as tmp:
        folder = Path(tmp)
        (folder / "best_params.json").write_text(json.dumps(summary, indent=2, default=str))
        with contextlib.suppress(Exception):
            study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "datetime_start",
                                          "datetime_complete", "duration")).to_csv(folder / "trials.csv", index=False)
        for note in _plots(study, folder):
            console.print(f"note: {note}", highlight=False)
        store.log_artifacts(parent_id, str(folder), Artifact.SUMMARY)
    return summary


def _best_summary(study: optuna.Study, space: Any) -> dict[str, Any] | None:
    best = best_trial(study)
    if best is None:
        return None
    cfg = best_config(best)
    run_id = best.user_attrs.get(TrialAttr.MLFLOW_RUN_ID)
    test_acc = None
    if run_id:
        with contextlib.suppress(Exception):
            test_acc = store.get_run(run_id).data.metrics.get(Metric.TEST_ACCURACY)
    config = {k: getattr(cfg, k) for k in space.params} if cfg is not None else dict(best.params)
    return {"trial": best.number, "val_accuracy": best.value, "test_accuracy": test_acc,
            "params": dict(best.params), "config": config, "mlflow_run_id": run_id}


def describe_study(settings: SearchSettings, finished: int, best: dict[str, Any] | None, estimate: str = "") -> str:
    """The parent run's description (MLflow shows it on the run's page): what the study is, the time estimate of
    the last session that ran trials, and how its best trial compares with the paper's Table 3 error."""
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
    if estimate:
        lines.append(estimate)
    return "\n\n".join(lines)


def _plots(study: optuna.Study, folder: Path) -> list[str]:
    """PNG plots with matplotlib (no plotly); returns notes for the plots that were skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    notes: list[str] = []

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

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's plot/importance chatter about small studies
        save("optimization_history.png", lambda: ovm.plot_optimization_history(study, target_name="val accuracy"))
        save("intermediate_values.png", lambda: ovm.plot_intermediate_values(study))
        notes += _importances(study, folder, plt)
    return notes


def _importances(study: optuna.Study, folder: Path, plt: Any) -> list[str]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    importances: dict[str, float] = {}
    if len(complete) < 2:
        note = f"parameter importances need at least 2 complete trials (the study has {len(complete)})"
    elif not study.best_trial.params:
        note = "parameter importances: the space samples no parameter"
    else:
        try:
            importances = optuna.importance.get_param_importances(study)
            note = "" if importances else "parameter importances: no parameter varies across the complete trials"
        except Exception as exc:
            note = f"parameter importances could not be computed: {first_line(exc)}"
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
    if note:
        (folder / "param_importances.txt").write_text(note + "\n")
    return [note] if note else []


# --------------------------------------------------------------------------------------------------------------------
# retraining the winner


def retrain_best(study: optuna.Study, run: StudyRun, console: Console, final_epochs: int | None = None,
                 register: str | None = None, trial: FrozenTrial | None = None) -> RunOutcome | None:
    """Train the best trial's config (or ``trial``'s) on train + validation (val_size=0) for the full schedule; test
    once. ``register`` registers its raw-image model under that name. None when it was done before."""
    settings, parent_id = run.settings, run.parent_run_id
    best = trial or best_trial(study)
    if best is None:
        raise AllconvError(f"study {settings.study_name!r} has no complete trial yet: nothing to retrain")
    cfg = best_config(best)
    if cfg is None:
        raise AllconvError(f"the best trial {best.number} has no readable MLflow run: cannot rebuild its config")
    cfg = dataclasses.replace(cfg, val_size=0, epochs=final_epochs or cfg.epochs,
                              device=settings.base_config.get("device", cfg.device))
    uid = study.user_attrs.get(StudyAttr.STUDY_UID, "")
    done = store.find_runs(run.experiment, f"tags.`{Tag.STUDY_UID}` = '{uid}' and tags.`{Tag.ROLE}` = '{Role.FINAL}'"
                           f" and tags.`{Tag.BEST_TRIAL}` = '{best.number}' and attributes.status = 'FINISHED'"
                           f" and params.epochs = '{cfg.epochs}'", max_results=1)
    if done:
        console.print(f"The best trial {best.number} was already retrained in run {done[0].info.run_id}.")
        return None
    tags = {Tag.ROLE: Role.FINAL, Tag.STUDY_NAME: settings.study_name, Tag.STUDY_UID: uid,
            Tag.BEST_TRIAL: str(best.number), Tag.SOURCE_RUN: str(best.user_attrs.get(TrialAttr.MLFLOW_RUN_ID))}
    console.print(f"Retraining trial {best.number}'s config on train+validation for {cfg.epochs} epochs")
    with TerminalView(console) as view:
        data = load_onto(cfg.data_config(), resolve_device(cfg.device), view.stage)
        view.stage("the final run: starting its MLflow run, building the network")
        outcome = run_tracked(cfg, experiment=run.experiment, run_name="final-best", parent_run_id=parent_id,
                              tags=tags, hooks=[view.track(f"final (trial {best.number})")], data=data,
                              log_model=True, register=register)
    result = outcome.result
    store.log_metrics(parent_id, {Metric.FINAL_TEST_ACCURACY: result.test_accuracy,
                                  Metric.FINAL_TEST_ERROR: result.test_error})
    store.set_tags(parent_id, {Tag.FINAL_RUN_ID: outcome.run_id})
    return outcome


def study_address(run: StudyRun) -> str:
    """Where to look at the study: its parent run's page in MLflow's training-runs view (trials are its children)."""
    exp_id = store.get_run(run.parent_run_id).info.experiment_id
    where = "" if store.tracking_uri().startswith("http") else " (after `mlflow ui` in this folder)"
    return f"Open the study{where}: {store.ui_url(exp_id, run.parent_run_id)}"

