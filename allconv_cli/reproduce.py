"""``allconv reproduce``: the paper's Table 3 experiment, one Optuna grid study per network, on search's machinery.

A reproduction is a search with a fixed grid (the paper trained each network once per lr in {0.25, 0.1, 0.05, 0.01}),
so each network is one study (:func:`allconv_cli.search.study.run_study`) with everything a study has: resume,
many hosts on one ``--storage``, lost workers' trials retried. Its name hashes every setting that changes what a trial
learns, so a smoke run and the real one never mix. Protocols: ``paper`` (all training images; the lr picked by test
accuracy, as the paper did) and ``validated`` (picked on a validation split by :func:`allconv_cli.paper.validated_key`,
then retrained on all training images and tested once). Why it is built so: docs/design.md.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from allconv_cli import paper
from allconv_cli.errors import AllconvError
from allconv_cli.paper import BASES, BRANCHES, TABLE3
from allconv_cli.search.plan import SearchSettings, default_storage_url, heartbeat_settings
from allconv_cli.tracking.schema import StudyState, Tag

KIND = "reproduce"
DEFAULT_EXPERIMENT = "allconv-reproduce"
# The paper's hyperparameters other than the lr (Section 3.2.1), fixed in every study's space, so the space logged
# with the study states them even if TrainConfig's defaults ever change.
PAPER_FIXED: dict[str, Any] = {
    k: v for k, v in {**paper.PROTOCOL, **paper.OUR_CHOICES}.items() if k not in ("dataset", "preprocess")
}  # the data fields come from the command line (--dataset fake, --preprocess for smoke runs)
OBJECTIVE = {"paper": "test_accuracy", "validated": "val_accuracy"}


# --------------------------------------------------------------------------------------------------------------------
# parsing the lists of the command line


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _parse_names(text: str, flag: str, what: str, allowed: Sequence[str], normalise: Callable[[str], str]) -> list[
        str]:
    """Comma list -> ``normalise``d allowed names, deduplicated in order; an unknown one names itself."""
    out: list[str] = []
    for item in _items(text):
        name = normalise(item)
        if name not in allowed:
            raise AllconvError(f"{flag}: unknown {what} {item!r}: choose from {', '.join(allowed)}")
        if name not in out:
            out.append(name)
    if not out:
        raise AllconvError(f"{flag} {text!r}: give at least one of {', '.join(allowed)}")
    return out


def parse_models(text: str) -> list[str]:
    """``"A,c"`` -> ``["A", "C"]``; an unknown base names itself and the allowed ones."""
    return _parse_names(text, "--models", "base network", BASES, str.upper)


def parse_branches(text: str) -> list[str]:
    """``"allcnn,Strided"`` -> ``["allcnn", "strided"]``."""
    return _parse_names(text, "--branches", "branch", BRANCHES, str.lower)


def parse_lrs(text: str) -> list[float]:
    out: list[float] = []
    for item in _items(text):
        try:
            value = float(item)
        except ValueError:
            value = float("nan")
        if not (value > 0 and value < float("inf")):
            raise AllconvError(f"--lrs: {item!r} is not a learning rate: give numbers > 0, e.g. "
                               f"{','.join(f'{lr:g}' for lr in paper.LRS)}")
        if value not in out:
            out.append(value)
    if not out:
        raise AllconvError(f"--lrs {text!r}: give at least one learning rate, e.g. 0.05")
    return out


# --------------------------------------------------------------------------------------------------------------------
# the plan


@dataclass
class ReproducePlan:
    """What ``allconv reproduce`` was asked to do; one study per (protocol, network)."""

    models: list[str] = field(default_factory=lambda: list(BASES))
    branches: list[str] = field(default_factory=lambda: list(BRANCHES))
    protocols: list[str] = field(default_factory=lambda: ["paper"])
    lrs: list[float] = field(default_factory=lambda: list(paper.LRS))
    epochs: int = paper.EPOCHS
    data: dict[str, Any] = field(default_factory=dict)  # dataset, data_dir, subset, val_size, preprocess, seed, device
    experiment: str = DEFAULT_EXPERIMENT
    storage_url: str | None = None  # None: search's default, sqlite:///optuna.db in the working directory
    workers: int = 1
    collapse_retries: int | None = None  # None: TrainConfig's default

    def networks(self) -> list[tuple[str, str]]:
        """In the paper's Table 3 order, whatever order the options listed them in."""
        return [key for key in TABLE3 if key[0] in self.models and key[1] in self.branches]

    def studies(self) -> list[tuple[str, str, str]]:
        return [(protocol, base, branch) for protocol in self.protocols for base, branch in self.networks()]


def base_config(plan: ReproducePlan, base: str, branch: str, protocol: str) -> dict[str, Any]:
    """The TrainConfig of every trial of one study, before the lr is set by the grid."""
    from allconv_cli.config import TrainConfig

    data = dict(plan.data)
    if protocol == "paper":
        data["val_size"] = 0  # the paper trained on all 50,000 training images
    elif int(data.get("val_size", 5000)) <= 0:
        raise AllconvError("--protocol validated selects the lr on a validation split: pass --val-size > 0")
    if plan.collapse_retries is not None:
        data["collapse_retries"] = plan.collapse_retries
    cfg = TrainConfig(model=base, branch=branch, epochs=plan.epochs, **PAPER_FIXED, **data)
    return cfg.to_dict()


def grid_space_text(lrs: Sequence[float], protocol: str) -> str:
    """The search-space YAML of a reproduction: the paper's fixed values and the lr grid (logged with the study)."""
    selection = "test error (as the paper)" if protocol == "paper" else "final validation accuracy"
    fixed = {k: v for k, v in PAPER_FIXED.items() if v is not None}
    lines = [
        "# allconv reproduce: the paper's protocol (Springenberg et al. 2015, Section 3.2.1), one trial per lr.",
        f"description: the paper's lr grid, everything else at the paper's values; lr chosen by {selection}",
        "sampler: grid",
        "fixed:",
        *(f"  {k}: {json.dumps(v)}" for k, v in fixed.items()),
        "params:",
        f"  lr: {{type: categorical, choices: {json.dumps([float(lr) for lr in lrs])}}}",
    ]
    return "\n".join(lines) + "\n"


def study_key(base: dict[str, Any], lrs: Sequence[float]) -> str:
    """8 hex digits over everything that changes what a trial learns.

    Execution details (device, data folder) are left out, so hosts with other paths share the study; so are values
    equal to TrainConfig's defaults, so a TrainConfig field added later (at its default) does not rename a study.
    """
    from allconv_cli.config import EXECUTION_FIELDS, TrainConfig

    defaults = TrainConfig().to_dict()
    learned = {
        k: v for k, v in base.items()
        if k not in EXECUTION_FIELDS and k != "lr" and (k not in defaults or v != defaults[k])
    }
    learned.update({k: base[k] for k in ("model", "branch", "epochs", "dataset", "val_size") if k in base})
    text = json.dumps({"base": learned, "lrs": sorted(float(lr) for lr in lrs)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def study_name(protocol: str, base: str, branch: str, key: str) -> str:
    return f"reproduce-{protocol}-{paper.registry_name(base, branch)}-{key}"


def search_settings(plan: ReproducePlan, protocol: str, base: str, branch: str, *, wait_for_others: bool = False,
                    heartbeat_interval: int | None = None, grace_period: int | None = None) -> SearchSettings:
    """The :class:`~allconv_cli.search.plan.SearchSettings` of one network's study."""
    from allconv_cli import spaces

    cfg = base_config(plan, base, branch, protocol)
    text = grid_space_text(plan.lrs, protocol)
    space = spaces.parse(text, source=f"allconv reproduce --protocol {protocol}", name=f"reproduce-{protocol}")
    tags = {Tag.KIND: KIND, Tag.PROTOCOL: protocol, Tag.LRS: ",".join(f"{lr:g}" for lr in plan.lrs)}
    return SearchSettings(
        study_name=study_name(protocol, base, branch, study_key(cfg, plan.lrs)),
        storage_url=plan.storage_url or default_storage_url(),
        experiment=plan.experiment,
        space_source=space.source,
        space_name=space.name,
        space_text=space.text,
        base_config=cfg,
        trials=len(plan.lrs),
        pruner="none",  # every lr trains the full schedule, as in the paper
        seed=int(cfg["seed"]),
        workers=plan.workers,
        run_tags=tags,
        objective=OBJECTIVE[protocol],
        wait_for_others=wait_for_others,
        **heartbeat_settings(heartbeat_interval, grace_period),
    )


# --------------------------------------------------------------------------------------------------------------------
# running


@dataclass(frozen=True)
class NetworkOutcome:
    protocol: str
    base: str
    branch: str
    study_name: str
    experiment: str
    state: StudyState
    parent_run_id: str
    finished: int
    target: int
    seconds: float
    final_run_id: str | None = None  # validated: the chosen lr retrained on all training images (trained here)
    final_status: str | None = None


def reproduce(plan: ReproducePlan, console: Any, *, heartbeat_interval: int | None = None,
              grace_period: int | None = None) -> list[NetworkOutcome]:
    """Run every study of ``plan``: first a pass taking the free lrs of each network, then a pass that waits for
    trials still running elsewhere (so N hosts spread over all the trials instead of waiting network by network).
    Stops at the first interruption (rerunning the command resumes)."""
    from allconv_cli.data import DataCache

    data = DataCache()  # networks of one protocol share their data: it is loaded once
    outcomes: dict[tuple[str, str, str], NetworkOutcome] = {}
    for wait in (False, True):
        for key in plan.studies():
            previous = outcomes.get(key)
            if previous is None or previous.state != StudyState.COMPLETE:
                outcomes[key] = _network(plan, key, wait, console, data, previous,
                                         heartbeat_interval=heartbeat_interval, grace_period=grace_period)
            if outcomes[key].state == StudyState.INTERRUPTED:
                return list(outcomes.values())
        if all(o.state == StudyState.COMPLETE for o in outcomes.values()):
            break
    return list(outcomes.values())


def _network(plan: ReproducePlan, key: tuple[str, str, str], wait: bool, console: Any, data: Any,
             previous: NetworkOutcome | None, **heartbeats: int | None) -> NetworkOutcome:
    """One network's study (and, validated, its final run) in this process."""
    from allconv_cli.search.study import run_study

    protocol, base, branch = key
    settings = search_settings(plan, protocol, base, branch, wait_for_others=wait, **heartbeats)
    name = TABLE3[(base, branch)].display_name
    console.rule(f"{name}, protocol {protocol}: {len(plan.lrs)} lrs x {plan.epochs} epochs ({settings.study_name})")
    started = time.perf_counter()
    outcome = run_study(settings, console, data=data)
    state, final = outcome.state, None
    if protocol == "validated" and state == StudyState.COMPLETE:
        final = final_run(outcome, name, console)
        if final is not None and final.result.status == "interrupted":
            state = StudyState.INTERRUPTED
    if state == StudyState.PENDING:
        console.print(f"{name} ({protocol}): the remaining lrs are running elsewhere; coming back to them at the end",
                      highlight=False)
    return NetworkOutcome(protocol, base, branch, settings.study_name, outcome.run.experiment, state,
                          outcome.run.parent_run_id, outcome.counts.finished, settings.trials,
                          time.perf_counter() - started + (previous.seconds if previous else 0.0),
                          final.run_id if final else None, final.result.status if final else None)


def selected_trial(study: Any) -> Any:
    """The complete trial the validated protocol picks: by :func:`~allconv_cli.paper.validated_key`, the
    report's own rule (the highest final validation accuracy; ties to the higher lr), so the final run retrains
    the run the report shows as selected."""
    from optuna.trial import TrialState


    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return max(complete, key=lambda t: paper.validated_key(t.value, t.params.get("lr")), default=None)


def final_run(outcome: Any, name: str, console: Any) -> Any:
    """Retrain the validated study's chosen lr on all training images (val_size=0, same epochs), tested once, as a
    child run tagged ``allconv.role=final`` (search's ``retrain_best``, which skips it when already done); returns
    its :class:`~allconv_cli.tracking.run.RunOutcome`, or None when no lr finished or it was trained before."""
    from allconv_cli.search.parent import retrain_best

    trial = selected_trial(outcome.study)
    if trial is None:
        console.print(f"{name} (validated): no lr finished, so there is no lr to retrain on all training images",
                      highlight=False)
        return None
    console.print(f"{name} (validated): lr {trial.params.get('lr'):g} chosen on the validation split "
                  f"(trial {trial.number}); the final run trains it on all training images", highlight=False)
    return retrain_best(outcome.study, outcome.run, console, trial=trial)
