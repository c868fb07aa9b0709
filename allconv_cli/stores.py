"""Fail-fast checks of where runs and studies are written: a local folder nobody can write fails in milliseconds.

Without them MLflow and SQLAlchemy retry an unwritable SQLite file for about two minutes and end in a traceback.
Torch-, MLflow- and Optuna-free, so the CLI can call them before anything heavy is imported or created.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from allconv_cli.errors import AllconvError, StoreUnavailable

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow >= 3.7's own default, artifacts in ./mlruns
DOCKER_HINT = "in Docker, run the container as the folder's owner: docker run --user $(id -u):$(id -g) ..."


# Query parameters that carry secrets in database and server URLs (psycopg accepts ?password=...).
_SECRET_KEY = re.compile(r"pass(word)?|pwd|secret|token|sslkey|api[_-]?key", re.IGNORECASE)


def safe_url(url: str) -> str:
    """``url`` with every secret replaced by ``***``: the password of ``user:password@`` (which may itself hold
    ``@``: the user part ends at the last ``@`` before the query) and secret query parameters. A string that is not
    a URL but could hold a secret (an ``@`` or ``=``) is hidden whole. The one way an address is printed or stored."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***" if ("@" in url or "=" in url) else url
    main, question, query = rest.partition("?")
    userinfo, at, hostpart = main.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        main = f"{user}{':***' if colon else ''}@{hostpart}"
    if question:
        items = (item.partition("=") for item in query.split("&"))
        query = "&".join(f"{k}=***" if eq and _SECRET_KEY.search(k) else f"{k}{eq}{v}" for k, eq, v in items)
    return f"{scheme}://{main}{question}{query}"


def tracking_uri() -> str:
    """The MLflow tracking URI every part of allconv uses: ``$MLFLOW_TRACKING_URI`` (``mlflow.set_tracking_uri`` sets
    it too), else MLflow's own default. The one place it is resolved; print it through :func:`safe_url`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///...`` URL (relative to the working directory), None for any other URL."""
    if not url.startswith("sqlite:"):
        return None
    rest = url.split(":///", 1)[1] if ":///" in url else ""
    rest = rest.split("?", 1)[0]
    if not rest or rest == ":memory:":
        return None
    return Path(unquote(rest)) if rest.startswith("/") else Path.cwd() / unquote(rest)


def local_path(uri: str) -> Path | None:
    """The folder or file a local tracking/artifact URI points at (``file:``, ``sqlite:``, a plain path)."""
    if uri.startswith("sqlite:"):
        return sqlite_path(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri).expanduser().absolute()
    return None


def check_writable_dir(folder: Path, what: str, fix: str) -> None:
    """Create a temporary file in ``folder`` (or its first existing parent) and remove it; else one-line error.

    A real write, not ``os.access``: root passes ``access`` checks even on a read-only mount.
    """
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".allconv-write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise AllconvError(f"cannot write {what} in {probe} ({reason}): {fix}") from None


def check_sqlite_writable(url: str, what: str, fix: str) -> None:
    """For a SQLite URL: its folder must take a new file, and an existing database file must be writable."""
    path = sqlite_path(url)
    if path is None:
        return
    check_writable_dir(path.parent, what, fix)
    if path.exists():
        try:
            with open(path, "r+b"):
                pass
        except OSError as exc:
            raise AllconvError(f"cannot write {what} {path} ({exc.strerror}): {fix}") from None


def check_tracking_store(write: bool = True) -> str:
    """Check the tracking store before anything is created; returns its URI.

    ``write``: a local store (SQLite file or folder, and ``./mlruns`` for artifacts) must be writable: one line
    naming the folder and the fix instead of MLflow's two minutes of retries. ``write=False`` (resume, visualize)
    only reads: a local SQLite file that does not exist is an error, not a new empty database. Once it passed, a
    process does not check again: later, mid-study, a store that stops answering is an outage for the retry layer
    to ride out, not a start-up error.
    """
    uri = tracking_uri()
    if (uri, write) in _CHECKED:
        return uri
    fix = f"run in a folder you can write, or set MLFLOW_TRACKING_URI to another store; {DOCKER_HINT}"
    try:
        path = sqlite_path(uri) if uri.startswith("sqlite:") else local_path(uri)
    except ValueError as exc:  # e.g. "http://[bad": urlparse's own complaint
        raise AllconvError(_not_a_url(uri, exc)) from None
    if not write:
        if path is not None and not path.exists():
            raise AllconvError(f"no MLflow store at {path}: run allconv train or search here first, or set "
                               "MLFLOW_TRACKING_URI to the store that holds the run")
        return uri
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    elif uri.startswith("sqlite:"):
        check_sqlite_writable(uri, "the MLflow database", fix)
        check_writable_dir(Path.cwd() / "mlruns", "the MLflow artifact location", fix)  # MLflow's default root
    elif path is not None:
        check_writable_dir(path, "the MLflow store", fix)
    _CHECKED.add((uri, write))
    return uri


_CHECKED: set[tuple[str, bool]] = set()  # (uri, write) of the checks this process passed


def check_server(uri: str, timeout: float = 5.0) -> None:
    """An MLflow tracking server must answer its ``/health`` endpoint, and take our credentials, before a run or a
    study is started: a worker without them fails in a second with one line, not after minutes of retries."""
    import urllib.error
    import urllib.request

    base = uri.rstrip("/")
    try:
        with urllib.request.urlopen(base + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError as exc:  # it answered: an auth proxy or an old server without /health
        if exc.code >= 500:
            raise StoreUnavailable(_no_answer(uri, f"HTTP {exc.code}")) from None
    except ValueError as exc:
        raise AllconvError(_not_a_url(uri, exc)) from None
    except OSError as exc:  # refused, reset, timed out, unknown host: a wrong address, or a server (re)starting
        raise StoreUnavailable(_no_answer(uri, str(getattr(exc, "reason", exc)))) from None
    request = urllib.request.Request(base + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default",
                                     headers=_auth_header())
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        refused = auth_refusal(exc.code, uri)
        if refused:
            raise AllconvError(refused) from None
    except (OSError, ValueError):
        return  # it answered /health: what fails now is retried (and reported) by the tracking layer


def _not_a_url(uri: str, exc: ValueError) -> str:
    return (f"MLFLOW_TRACKING_URI={safe_url(uri)} is not a URL ({exc}): set it to the MLflow server's http(s):// "
            "address or a sqlite:/// file")


def _no_answer(uri: str, cause: str) -> str:
    return (f"the MLflow server {safe_url(uri)} does not answer ({cause}): start it (see docs/scaling.md), check "
            "MLFLOW_TRACKING_URI, or try again once it is up")


def auth_refusal(status: int, uri: str) -> str:
    """The one line for an MLflow server that refuses who we are (401) or what we ask (403); empty otherwise."""
    if status == 401:
        return (f"the MLflow server {safe_url(uri)} refused the credentials (HTTP 401): set MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD to a user of that server")
    if status == 403:
        return (f"the MLflow server {safe_url(uri)} refused access (HTTP 403: a user without permission on this "
                "experiment, or a host name the server's --allowed-hosts does not list): check "
                "MLFLOW_TRACKING_USERNAME, the experiment's permissions and the server's --allowed-hosts")
    return ""


def _auth_header() -> dict[str, str]:
    """The header MLflow's client would send: basic auth from MLFLOW_TRACKING_USERNAME/PASSWORD, or a token."""
    import base64

    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}
