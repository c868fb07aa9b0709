"""The one retry layer of the tracking store, and what it says when the store goes away and comes back.

MLflow's own HTTP retries are off (:func:`allconv_cli.runtime.configure`), so a restarting tracking server is ridden
out here, within one bounded total per call. This is also the one place that sees an outage start and end, so it
says both on stderr, once per outage and process.
"""

from __future__ import annotations

import errno
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from mlflow.exceptions import MlflowException

from allconv_cli import runtime, stores
from allconv_cli.errors import AllconvError, StoreUnavailable, first_line

T = TypeVar("T")


def shown_uri() -> str:
    """The tracking URI as it may be printed or stored: secrets replaced by ``***``."""
    return stores.safe_url(stores.tracking_uri())


def retrying(fn: Callable[..., T], *args: Any, budget: float | None = None, **kwargs: Any) -> T:
    """Call ``fn``, retrying transient failures (a tracking server restarting) with exponential back-off.

    The one retry layer: :func:`allconv_cli.runtime.configure` turns MLflow's own HTTP retries off, and the back-off
    here stops once it would exceed ``budget`` seconds (``$ALLCONV_TRACKING_RETRY_SECONDS``, default 120), so a
    call fails after at most that plus one request timeout, with :class:`~allconv_cli.errors.StoreUnavailable` (a
    search re-queues the trial it stopped). Unwritable storage fails at once. Being where an
    outage is seen, it says (once per outage, on stderr) when the store stopped answering and when it came back.
    """
    limit = runtime.retry_budget() if budget is None else budget
    started, delay = time.monotonic(), 1.0
    while True:
        try:
            result = fn(*args, **kwargs)
        except (MlflowException, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
                raise AllconvError(  # a full or read-only artifact location: retrying cannot help
                    f"cannot write {exc.filename or 'MLflow artifacts'}: {exc.strerror} (the MLflow artifact "
                    f"location must be writable and have free space; or set MLFLOW_TRACKING_URI; {stores.DOCKER_HINT})"
                ) from exc
            refused = stores.auth_refusal(_AUTH_STATUS.get(getattr(exc, "error_code", ""), 0), stores.tracking_uri())
            if refused:  # wrong or missing credentials, or no permission: no retry fixes that
                raise AllconvError(refused) from exc
            if not _transient(exc):
                raise
            elapsed = time.monotonic() - started
            if elapsed + delay > limit:
                raise StoreUnavailable(
                    f"the MLflow store {shown_uri()} did not answer for {elapsed:.0f} s ({_masked(exc)}): "
                    f"start it or set MLFLOW_TRACKING_URI; ${runtime.ENV_RETRY_SECONDS} sets how long to retry"
                ) from exc
            _OUTAGE.down(limit)
            time.sleep(delay)
            delay *= 2
        else:
            if _OUTAGE.since is not None:
                _OUTAGE.up()
            return result


class _Outage:
    """Whether the store is known to be down, shared by every thread of the process: one line when it stops
    answering, one when it answers again (not one per retried call)."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.lock = threading.Lock()

    def down(self, limit: float) -> None:
        """The line names no cause (the library's would be a paragraph of connection-pool text); the error that
        ends the retries quotes it."""
        with self.lock:
            if self.since is None:
                self.since = time.monotonic()
                _say(f"the MLflow store {shown_uri()} does not answer: retrying for up to {limit:.0f} s")

    def up(self) -> None:
        with self.lock:
            if self.since is not None:
                _say(f"the MLflow store {shown_uri()} answers again (after {time.monotonic() - self.since:.0f} s)")
                self.since = None


_OUTAGE = _Outage()


def _say(line: str) -> None:
    """Our own line about the store, on stderr (the live views redirect it above their bars)."""
    print(f"allconv: {line}", file=sys.stderr, flush=True)


def _masked(exc: BaseException) -> str:
    """An exception's first line with every URL in it shown through ``safe_url`` (a message may quote the URI)."""
    masked = re.sub(r"[a-z][a-z0-9+.-]*://[^\s'\"<>]+", lambda m: stores.safe_url(m.group()), first_line(exc))
    return masked[:200]


_AUTH_STATUS = {"UNAUTHENTICATED": 401, "CUSTOMER_UNAUTHORIZED": 401, "PERMISSION_DENIED": 403}
# Local storage errors that no retry fixes: no space, quota, read-only file system, no permission.
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def _transient(exc: Exception) -> bool:
    if isinstance(exc, OSError):
        return True
    code = getattr(exc, "error_code", "")
    return code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "") or "Connection" in str(exc)
