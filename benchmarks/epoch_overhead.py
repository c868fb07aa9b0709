#!/usr/bin/env python3
"""What one epoch costs beyond its training step: evaluation, checkpoint, upload and metric logging, measured.

A tracked run (:func:`allconv_cli.tracking.run.run_tracked`, as ``allconv train`` makes it) on fake data on this
machine's CPU, ``--subset 1000 --val-size 100``, 8 epochs, against (a) a local SQLite MLflow store (MLflow's default
``sqlite:///mlflow.db`` in a temporary folder) and (b) an ``mlflow server`` on that kind of store
(``tests/services.py``). Per epoch it reports:

* **train**: the training step, ``engine.train_epoch`` from call to return (timed around the call);
* **eval**: from ``train_epoch``'s return to the ``on_epoch_end`` hook: the evaluation pass (and the divergence,
  schedule and collapse bookkeeping around it);
* **cycle**: from one ``train_epoch`` call to the next: everything the training thread does for one epoch.

``cycle - train`` is the epoch's overhead; ``cycle - train - eval`` the part that is neither training nor
evaluation (checkpoint, upload, metric logging, hooks, when they run on the training thread). The last epoch has no
next call, so cycles are epochs 1..7; ``end`` is the time from the last ``on_epoch_end`` until ``run_tracked``
returns (final test pass, the wait for the background writes, the final tags). Only public names are used, so the
same script measures an older checkout: ``PYTHONPATH=/path/to/checkout python benchmarks/epoch_overhead.py``.

Usage::

    python benchmarks/epoch_overhead.py                 # both stores
    python benchmarks/epoch_overhead.py --store sqlite --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import services  # tests/services.py: the mlflow server the service tests start


def measure(store: str, args: argparse.Namespace) -> dict[str, object]:
    """One tracked run against ``store`` (sqlite or server) in a fresh temporary folder; the timings per epoch."""
    from allconv_cli import engine, runtime
    from allconv_cli.config import TrainConfig
    from allconv_cli.tracking.run import run_tracked

    runtime.configure()
    folder, home = Path(tempfile.mkdtemp(prefix=f"allconv-overhead-{store}-")), Path.cwd()
    os.chdir(folder)
    server = None
    if store == "server":
        server = services.MlflowServer(f"sqlite:///{folder / 'server.db'}", folder / "server").start()
        os.environ["MLFLOW_TRACKING_URI"] = server.uri
    else:
        os.environ["MLFLOW_TRACKING_URI"] = "sqlite:///mlflow.db"
    starts: list[float] = []
    ends: list[float] = []
    epoch_ends: list[float] = []
    real_epoch = engine.train_epoch

    def timed_epoch(*a, **kw):
        starts.append(time.perf_counter())
        try:
            return real_epoch(*a, **kw)
        finally:
            ends.append(time.perf_counter())

    class Clock(engine.Hooks):
        def on_epoch_end(self, metrics) -> None:
            epoch_ends.append(time.perf_counter())

    cfg = TrainConfig(model=args.model, branch=args.branch, dataset="fake", subset=args.subset,
                      val_size=args.val_size, preprocess="standardize", epochs=args.epochs, device="cpu",
                      collapse_patience=0, seed=0)
    engine.train_epoch = timed_epoch
    try:
        outcome = run_tracked(cfg, experiment="epoch-overhead", hooks=[Clock()], log_model=False)
        returned = time.perf_counter()
    finally:
        engine.train_epoch = real_epoch
        if server is not None:
            server.stop()
        del os.environ["MLFLOW_TRACKING_URI"]
        os.chdir(home)
        shutil.rmtree(folder, ignore_errors=True)
    return summary(store, str(outcome.result.status), starts, ends, epoch_ends, returned)


def summary(store: str, status: str, starts: list[float], ends: list[float], epoch_ends: list[float],
            returned: float) -> dict[str, object]:
    """Per-epoch train, eval and cycle times (ms) from the clock readings, and their medians."""
    n = len(starts)
    rows = [{"epoch": i + 1,
             "train_ms": 1000 * (ends[i] - starts[i]),
             "eval_ms": 1000 * (epoch_ends[i] - ends[i]),
             "cycle_ms": 1000 * (starts[i + 1] - starts[i]) if i + 1 < n else None} for i in range(n)]
    cycles = [r for r in rows if r["cycle_ms"] is not None]
    return {
        "store": store,
        "status": status,
        "epochs": rows,
        "median_train_ms": statistics.median(r["train_ms"] for r in rows),
        "median_eval_ms": statistics.median(r["eval_ms"] for r in rows),
        "median_cycle_ms": statistics.median(r["cycle_ms"] for r in cycles),
        "median_cycle_minus_train_ms": statistics.median(r["cycle_ms"] - r["train_ms"] for r in cycles),
        "median_cycle_minus_train_minus_eval_ms": statistics.median(
            r["cycle_ms"] - r["train_ms"] - r["eval_ms"] for r in cycles),
        "end_ms": 1000 * (returned - epoch_ends[-1]),
    }


def report(result: dict[str, object]) -> None:
    print(f"\n{result['store']}: status {result['status']}")
    print(f"{'epoch':>5} {'train ms':>9} {'eval ms':>8} {'cycle ms':>9} {'cycle-train':>12}")
    for r in result["epochs"]:
        cycle = r["cycle_ms"]
        over = "" if cycle is None else f"{cycle - r['train_ms']:12.1f}"
        print(f"{r['epoch']:>5} {r['train_ms']:9.1f} {r['eval_ms']:8.1f} {'' if cycle is None else f'{cycle:9.1f}'}"
              f" {over}")
    print(f"median: train {result['median_train_ms']:.1f} ms, eval {result['median_eval_ms']:.1f} ms, cycle "
          f"{result['median_cycle_ms']:.1f} ms; cycle - train {result['median_cycle_minus_train_ms']:.1f} ms "
          f"(without eval {result['median_cycle_minus_train_minus_eval_ms']:.1f} ms); after the last epoch "
          f"{result['end_ms']:.0f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=("sqlite", "server", "both"), default="both")
    parser.add_argument("--model", default="A")
    parser.add_argument("--branch", default="strided")
    parser.add_argument("--subset", type=int, default=1000)
    parser.add_argument("--val-size", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--json", type=Path, help="Also write the figures to this file.")
    args = parser.parse_args()
    import allconv_cli

    print(f"epoch overhead of {Path(allconv_cli.__file__).parent}: fake data, model {args.model}/{args.branch}, "
          f"--subset {args.subset} --val-size {args.val_size}, {args.epochs} epochs, CPU", flush=True)
    results = []
    for store in ("sqlite", "server") if args.store == "both" else (args.store,):
        results.append(measure(store, args))
        report(results[-1])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
