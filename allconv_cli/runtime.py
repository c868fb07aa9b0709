"""Process-wide settings of the libraries allconv drives, applied once by the CLI (never on import).

MLflow's own HTTP retries are switched off so that :func:`allconv_cli.tracking.retry.retrying` is the one retry layer,
with one bounded total (``ALLCONV_TRACKING_RETRY_SECONDS``). None of MLflow's console output reaches the terminal:
its "View run ... at" lines are switched off, and its log records (the system-metrics monitor's warnings, set-up
chatter) go to a log file, named once on stderr when the first record is written; the retry layer says in our own
words when a store stops answering and when it is back. Torch-free and MLflow-free: the CLI calls it before
importing either, and it also works after MLflow was imported (MLflow's own handlers are replaced).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ENV_RETRY_SECONDS = "ALLCONV_TRACKING_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0  # total back-off of one tracking call before it fails (a server restart fits in it)
HTTP_TIMEOUT_SECONDS = 30  # one MLflow HTTP request (MLflow's default is 120)
ENV_CACHE_DIR = "ALLCONV_CACHE_DIR"  # also the preprocessing cache's folder (data.preprocess)
DEFAULT_CACHE_DIR = "~/.cache/allconv"
MLFLOW_LOG = "mlflow.log"

# Loggers whose warnings and errors go to the log file instead of the terminal: MLflow's (its system-metrics monitor
# included), and the libraries it drives for us (the SQL store's migrations, its HTTP connections). Their INFO lines
# are chatter ("Started monitoring system metrics", "Creating initial MLflow database tables...") and are dropped.
_FILE_LOGGERS = ("mlflow", "alembic", "sqlalchemy.engine", "urllib3")


def configure() -> None:
    """Environment defaults (the user's own settings win, worker processes inherit them) and MLflow's loggers."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HTTP_TIMEOUT_SECONDS))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "🏃 View run ... at:" on stdout
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # MLflow's import would put a stderr handler back
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")  # no git in the Docker image: no 15-line GitPython help
    handler = LogFile(mlflow_log_path())
    for name in _FILE_LOGGERS:
        logger = logging.getLogger(name)
        for old in logger.handlers:
            if isinstance(old, LogFile):
                old.close()
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(logging.WARNING)


def quiet_optuna() -> None:
    """For a study session: Optuna's warnings about the experimental features allconv uses knowingly (heartbeats,
    metric names) and its per-trial log lines (the search prints its own) would tear the live view."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def mlflow_log_path() -> Path:
    """Where MLflow's messages go: ``$ALLCONV_CACHE_DIR/mlflow.log``, else ``~/.cache/allconv/mlflow.log``."""
    return Path(os.environ.get(ENV_CACHE_DIR) or DEFAULT_CACHE_DIR).expanduser() / MLFLOW_LOG


class LogFile(logging.FileHandler):
    """A log file opened at its first record, which also says once on stderr where the records go. A file that
    cannot be written drops the records (MLflow's messages must never stop a run or reach the terminal)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, delay=True, encoding="utf-8")
        self.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            try:
                Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
                self.stream = self._open()
            except OSError:
                return
        if self.baseFilename not in _ANNOUNCED:
            _ANNOUNCED.add(self.baseFilename)
            print(f"allconv: MLflow's messages are written to {self.baseFilename}", file=sys.stderr, flush=True)
        super().emit(record)


_ANNOUNCED: set[str] = set()  # log files already named on stderr by this process


def retry_budget() -> float:
    """Seconds of back-off one tracking call may spend on transient failures."""
    raw = os.environ.get(ENV_RETRY_SECONDS)
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_RETRY_SECONDS
    except ValueError:
        return DEFAULT_RETRY_SECONDS
