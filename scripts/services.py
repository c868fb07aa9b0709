#!/usr/bin/env python3
"""Start PostgreSQL and an MLflow tracking server on 127.0.0.1 for a local multi-process study, as plain processes;
create the workers' user on a basic-auth MLflow server.

    python scripts/services.py up --dir /tmp/allconv-services      # prints the export lines, Ctrl-C stops both
    python scripts/services.py add-user allconv                    # docker-compose.yml and deploy/k8s run this

`up`: the services of docker-compose.yml without Docker; the code is tests/services.py, the same the test fixtures
start, so what CI checks is what this runs. The database password is $POSTGRES_PASSWORD, or generated; either way it
is printed nowhere: the printed PGPASSFILE (0600) holds it.

`add-user NAME`: creates NAME on the MLflow server at $MLFLOW_TRACKING_URI (basic auth) with the password in
$ALLCONV_USER_PASSWORD, or sets that password when NAME exists; the admin's credentials are
$MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD. Passwords come from the environment only, never arguments.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import services  # tests/services.py (this file runs as __main__, so the name is free)

ADD_USER_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "ALLCONV_USER_PASSWORD")


def add_user(username: str, wait: float) -> int:
    """Wait for the server's /health (a Kubernetes init container may start first), then create or update."""
    missing = [name for name in ADD_USER_ENV if not os.environ.get(name)]
    if missing:
        print(f"Error: add-user needs {', '.join(missing)} set in the environment (the new user's password in "
              "ALLCONV_USER_PASSWORD, the admin's in MLFLOW_TRACKING_USERNAME/PASSWORD)", file=sys.stderr)
        return 2
    uri = os.environ["MLFLOW_TRACKING_URI"]
    from mlflow.exceptions import MlflowException

    try:
        services.wait_healthy(uri, wait)
        done = services.add_mlflow_user(uri, username, os.environ["ALLCONV_USER_PASSWORD"])
    except (services.ServiceError, MlflowException) as exc:
        message = exc.message if isinstance(exc, MlflowException) else str(exc)
        print(f"Error: cannot add the MLflow user {username!r} at {services.safe_url(uri)}: {message}",
              file=sys.stderr)
        return 1
    print(f"MLflow user {username!r} {done} at {services.safe_url(uri)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start PostgreSQL and the MLflow server, print the exports, stop on Ctrl-C")
    up.add_argument("--dir", type=Path, help="folder for the cluster, artifacts and logs [default: a new temp dir]")
    up.add_argument("--pg-port", type=int)
    up.add_argument("--mlflow-port", type=int, default=5000)
    add = sub.add_parser("add-user", help="create a user on a basic-auth MLflow server, or set its password")
    add.add_argument("username")
    add.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the server [300]")
    args = parser.parse_args(argv)
    if args.command == "add-user":
        return add_user(args.username, args.wait)

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)  # also when started in the background, where SIGINT is ignored
    signal.signal(signal.SIGTERM, interrupt)
    try:
        services.serve(args.dir or Path(tempfile.mkdtemp(prefix="allconv-services-")), args.pg_port, args.mlflow_port,
                       os.environ.get("POSTGRES_PASSWORD") or None)
    except services.ServiceError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
