"""``allconv search``: Optuna studies whose every trial is a tracked MLflow run; ``allconv reproduce`` runs on it too.

Modules, one concern each: ``plan`` (what a session is asked to do; torch- and Optuna-free, for the CLI), ``study``
(the session, its workers and a trial's objective: the trial's path), ``storage`` (the Optuna storage and study),
``budget`` (which trials count against ``--trials``), ``distinct`` (no configuration trained twice), ``parent`` (the
MLflow parent run and summary), ``launcher`` (worker processes), ``view`` (the terminal). This file imports nothing.
"""
