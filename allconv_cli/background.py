"""One background thread for a training run's slow records, so the epoch loop never waits on a disk or a network.

Checkpoint writes, their uploads and metric logging take tens of milliseconds to seconds (a remote store, a
retry after a server restart) while an epoch on a GPU takes about one. :class:`BackgroundWriter` runs them on one
thread, in the order they were handed over, so a checkpoint is written before it is uploaded and epoch N's
records land before epoch N+1's. Torch-free and MLflow-free: it runs whatever callables it is given.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

_STOP = object()


class BackgroundWriter:
    """Runs jobs on one worker thread, in submission order; errors come back to the submitting thread.

    * **Bounded**: at most ``maxsize`` jobs wait; ``submit`` then blocks, so training cannot run ahead of its
      records without bound (each checkpoint job holds a copy of the weights).
    * **Errors are not swallowed**: the first exception a job raises is raised again on the submitting thread by the
      next :meth:`submit`, :meth:`flush` or :meth:`close`; the jobs after it are skipped (a checkpoint uploaded
      after a failed one would leave the store out of order).
    * **Nothing is lost**: :meth:`close` (and leaving the ``with`` block, also by an exception or Ctrl-C) waits until
      every job handed over has run. An exception already on its way out wins; a job's error then rides along as a
      note on it. A second Ctrl-C during that wait interrupts the wait (the thread is a daemon): a checkpoint is
      written atomically, so the file on disk is then the previous complete one.
    """

    def __init__(self, maxsize: int = 4, name: str = "allconv-writer") -> None:
        self._jobs: queue.Queue[Any] = queue.Queue(maxsize)
        self._failed = False  # a job raised: skip the rest
        self._error: BaseException | None = None  # not yet raised on the submitting side
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[..., object], /, *args: Any, **kwargs: Any) -> None:
        """Queue ``job(*args, **kwargs)``; waits while the queue is full. Raises an earlier job's error first."""
        self._raise_error()
        if self._closed:
            raise RuntimeError("BackgroundWriter.submit after close")
        self._jobs.put((job, args, kwargs))

    def flush(self) -> None:
        """Wait until every job handed over has run; raise the first error one of them raised."""
        self._jobs.join()
        self._raise_error()

    def close(self) -> None:
        """Flush, then stop the thread. Idempotent."""
        if not self._closed:
            self._closed = True
            self._jobs.put(_STOP)
            self._thread.join()
        self._raise_error()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except BaseException as late:  # the exception on its way out says more; keep this one visible on it
            if late is not exc:
                exc.add_note(f"also, in the background writer: {type(late).__name__}: {late}")

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            try:
                if item is _STOP:
                    return
                if not self._failed:
                    job, args, kwargs = item
                    job(*args, **kwargs)
            except BaseException as exc:  # handed to the submitting thread, which decides what it means
                self._failed, self._error = True, exc
            finally:
                self._jobs.task_done()
