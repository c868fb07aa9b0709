"""``allconv search``: Optuna studies whose every trial is a tracked MLflow run; ``allconv reproduce`` runs on it too.

The entry point is :func:`run_study` (``session.py``); the other modules each hold one concern: the plan
(``settings``), the Optuna storage and study identity (``storage``), counting trials (``budget``), samplers that keep
processes from repeating each other (``sampling``), a worker's ask/train/tell loop (``worker``), worker processes
(``launcher``), the MLflow parent run and summary (``parent_run``) and the terminal view (``view``). Why it works
this way: docs/scaling.md.

Importing this package is cheap (no torch, Optuna or MLflow): the names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "budget": ("SURPLUS_ATTR", "Counts", "count_trials", "superseded"),
    "launcher": ("gpu_assignment",),
    "parent_run": ("retrain_best", "study_address"),
    "session": ("StudyOutcome", "quiet_libraries", "run_study", "run_worker_process"),
    "settings": ("PRUNERS", "SearchSettings", "StudyRun", "default_storage_url", "default_study_name", "plan_search",
                 "safe_url"),
    "sampling": ("make_sampler", "trial_seed"),
    "storage": ("make_pruner", "open_storage"),
    "view": ("pipe_safe", "summary_table"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
