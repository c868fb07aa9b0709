"""Process-wide settings of the libraries allconv drives, applied once by the CLI (never on import).

MLflow's own HTTP retries are switched off so that :func:`allconv_cli.tracking.retrying` is the one retry layer, with
one bounded total (``ALLCONV_TRACKING_RETRY_SECONDS``); its INFO chatter and download bars stay off the terminal,
while its warnings still show. Torch-free and MLflow-free: the CLI calls it before importing either.
"""

from __future__ import annotations

import logging
import os

ENV_RETRY_SECONDS = "ALLCONV_TRACKING_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0  # total back-off of one tracking call before it fails (a server restart fits in it)
HTTP_TIMEOUT_SECONDS = 30  # one MLflow HTTP request (MLflow's default is 120)

# MLflow loggers whose INFO lines are set-up chatter ("Creating initial MLflow database tables...", migrations).
_CHATTY_LOGGERS = ("mlflow.store.db.utils", "mlflow.store.sqlalchemy_store", "mlflow.system_metrics", "alembic",
                   "alembic.runtime.migration")


def configure() -> None:
    """Environment defaults (the user's own settings win) and logger levels, inherited by worker processes."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HTTP_TIMEOUT_SECONDS))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")  # no git in the Docker image: no 15-line GitPython help
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def retry_budget() -> float:
    """Seconds of back-off one tracking call may spend on transient failures."""
    raw = os.environ.get(ENV_RETRY_SECONDS)
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_RETRY_SECONDS
    except ValueError:
        return DEFAULT_RETRY_SECONDS
