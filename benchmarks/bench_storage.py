#!/usr/bin/env python3
"""How many trials per minute one Optuna study sustains with N workers, and when the storage becomes the bottleneck.

Two kinds of trial, each against SQLite (one file: the one-host default) and PostgreSQL (the multi-host storage):

* ``storage``: trials that do only storage work, as a search trial does it, with a trivial objective: suggest 4
  params, report one intermediate value per "epoch" and ask the pruner, tell the result; heartbeats on, as in
  ``allconv search``. The trials/min they reach is the ceiling the storage (and Optuna's client side) sets.
* ``allconv``: real tiny ``allconv search`` trials (``fake`` data, 100 images, 1 epoch, MLflow tracking: to the
  ``mlflow server`` on PostgreSQL in the PostgreSQL case, to a local SQLite MLflow store in the SQLite case), one
  ``allconv search`` process per worker, as on separate hosts.

Throughput is counted from the storage's own trial timestamps (first trial start to last trial end), so process
start-up is not in it. PostgreSQL is a private cluster started by ``tests/services.py`` (durable settings:
fsync on). Usage::

    python benchmarks/bench_storage.py                                   # storage trials, 1/2/4/8 workers, both stores
    python benchmarks/bench_storage.py --kind allconv --workers 8 --trials 24
    python benchmarks/bench_storage.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import services  # noqa: E402  (tests/services.py: the processes the service tests start)


def _storage_worker(url: str, study_name: str, seconds: float, epochs: int, heartbeat: int, start: mp.Event) -> None:
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(
        url, heartbeat_interval=heartbeat, grace_period=heartbeat * 2,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(3),
    )
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=optuna.samplers.RandomSampler(),
                              pruner=optuna.pruners.MedianPruner(n_startup_trials=5))

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-3, 0.3, log=True)
        trial.suggest_float("weight_decay", 1e-5, 1e-2, log=True)
        trial.suggest_categorical("batch_size", [64, 128, 256])
        trial.suggest_float("dropout_hidden", 0.0, 0.6)
        value = 0.0
        for epoch in range(1, epochs + 1):
            value = 1.0 - lr / epoch
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    start.wait()
    study.optimize(objective, timeout=seconds)


def _throughput(url: str, study_name: str) -> tuple[int, float]:
    """(finished trials, trials per minute) from the storage's timestamps."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=url)
    done = [t for t in study.get_trials(deepcopy=False)
            if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    if len(done) < 2:
        return len(done), 0.0
    first = min(t.datetime_start for t in done)
    last = max(t.datetime_complete for t in done)
    return len(done), len(done) / max((last - first).total_seconds(), 1e-9) * 60.0


def bench_storage(url: str, workers: int, seconds: float, epochs: int, heartbeat: int) -> tuple[int, float]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = f"bench-storage-{workers}-{time.time_ns()}"
    optuna.create_study(study_name=name, storage=url, direction="maximize")
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_storage_worker, args=(url, name, seconds, epochs, heartbeat, start))
             for _ in range(workers)]
    for p in procs:
        p.start()
    time.sleep(min(10.0, 2.0 + workers))  # let every worker import optuna and connect
    start.set()
    for p in procs:
        p.join()
    return _throughput(url, name)


def bench_allconv(url: str, tracking_uri: str, workers: int, trials: int, tmp: Path) -> tuple[int, float]:
    name = f"bench-allconv-{workers}-{time.time_ns()}"
    allconv = str(Path(sys.executable).parent / "allconv")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, ALLCONV_CACHE_DIR=str(tmp / "cache"), OMP_NUM_THREADS="1")
    env.update(ALLCONV_FAKE_SIZES="200,50")
    space = tmp / "space.yaml"
    space.write_text("description: bench\nsampler: random\nfixed: {optimizer: sgd, batch_size: 50}\n"
                     "params:\n  lr: {type: float, low: 0.01, high: 0.1, log: true}\n")
    # Create the stores first: N processes creating a new SQLite schema at once would race (one host would use
    # `allconv search --workers N`, whose launcher does this).
    import optuna
    from mlflow import MlflowClient

    optuna.storages.RDBStorage(url)
    if tracking_uri.startswith("sqlite:"):
        MlflowClient(tracking_uri).search_experiments()
    cmd = [allconv, "search", "--model", "A", "--branch", "strided", "--dataset", "fake", "--subset", "100",
           "--val-size", "50", "--preprocess", "standardize", "--bn", "--device", "cpu", "--space", str(space),
           "--pruner", "none", "--epochs", "1", "--trials", str(trials), "--storage", url, "--study-name", name,
           "--experiment", name]
    logs = [open(tmp / f"{name}-{i}.log", "wb") for i in range(workers)]  # noqa: SIM115
    procs = [subprocess.Popen(cmd, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT) for log in logs]
    codes = [p.wait() for p in procs]
    for log in logs:
        log.close()
    if any(codes):
        raise SystemExit(f"allconv search exited with {codes}; logs in {tmp}")
    return _throughput(url, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("storage", "allconv", "both"), default="storage")
    parser.add_argument("--storage", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    parser.add_argument("--workers", default="1,2,4,8", help="comma-separated worker counts")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each storage-trial measurement")
    parser.add_argument("--epochs", type=int, default=3, help="intermediate values reported per storage trial")
    parser.add_argument("--heartbeat", type=int, default=10, help="Optuna heartbeat interval of storage trials")
    parser.add_argument("--trials", type=int, default=16, help="allconv trials per measurement (all workers)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    kinds = ("storage", "allconv") if args.kind == "both" else (args.kind,)
    stores = [s.strip() for s in args.storage.split(",") if s.strip()]
    counts = [int(w) for w in args.workers.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="allconv-bench-"))
    tmp.chmod(0o755)
    pg = server = None
    results = []
    try:
        if "postgresql" in stores:
            pg = services.Postgres(tmp / "postgres", durable=True).start()
            if "allconv" in kinds:
                server = services.MlflowServer(pg.url("mlflow"), tmp / "mlflow", workers=2).start()
        print(f"{'kind':8} {'storage':10} {'workers':>7} {'trials':>6} {'trials/min':>10}", flush=True)
        for kind in kinds:
            for store in stores:
                for workers in counts:
                    if store == "sqlite":
                        url = f"sqlite:///{tmp}/optuna-{kind}-{workers}.db"
                        tracking = f"sqlite:///{tmp}/mlflow-{workers}.db"
                    else:
                        pg.reset_database("optuna")
                        url, tracking = pg.url("optuna"), server.uri if server else ""
                    if kind == "storage":
                        n, rate = bench_storage(url, workers, args.seconds, args.epochs, args.heartbeat)
                    else:
                        n, rate = bench_allconv(url, tracking, workers, args.trials, tmp)
                    results.append({"kind": kind, "storage": store, "workers": workers, "trials": n,
                                    "trials_per_minute": round(rate, 1)})
                    print(f"{kind:8} {store:10} {workers:>7} {n:>6} {rate:>10.1f}", flush=True)
    finally:
        if server:
            server.stop()
        if pg:
            pg.cleanup()
    if args.json:
        args.json.write_text(json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)  # kept when a measurement failed: its logs are there
    return 0


if __name__ == "__main__":
    sys.exit(main())
