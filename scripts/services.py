#!/usr/bin/env python3
"""Start PostgreSQL and an MLflow tracking server on 127.0.0.1 for a local multi-process study, as plain processes.

    python scripts/services.py up --dir /tmp/allconv-services      # prints the two export lines, Ctrl-C stops both

The services are those of docker-compose.yml without Docker; the code is tests/services.py, the same the test
fixtures start, so what CI checks is what this runs.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import services  # tests/services.py (this file runs as __main__, so the name is free)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start PostgreSQL and the MLflow server, print the URLs, stop on Ctrl-C")
    up.add_argument("--dir", type=Path, help="folder for the cluster, artifacts and logs [default: a new temp dir]")
    up.add_argument("--pg-port", type=int)
    up.add_argument("--mlflow-port", type=int, default=5000)
    args = parser.parse_args(argv)

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)  # also when started in the background, where SIGINT is ignored
    signal.signal(signal.SIGTERM, interrupt)
    try:
        services.serve(args.dir or Path(tempfile.mkdtemp(prefix="allconv-services-")), args.pg_port, args.mlflow_port)
    except services.ServiceError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
