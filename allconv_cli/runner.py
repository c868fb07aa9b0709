"""One tracked training run: load data, open (or reopen) an MLflow run, train through the engine, record the end.

``allconv train``, every search trial and ``allconv reproduce`` go through :func:`run_tracked`, so they log the
same params, metrics, checkpoints and model, and resume the same way.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from allconv_cli import tracking
from allconv_cli.config import TrainConfig
from allconv_cli.data import Dataset, load_dataset
from allconv_cli.engine import CheckpointError, HookList, Hooks, TrainResult, load_checkpoint, resolve_device, train


@dataclass
class RunOutcome:
    run_id: str
    result: TrainResult
    resumed_from_epoch: int = 0
    checkpoint_problem: str = ""  # set when a resume checkpoint was unusable and the run restarted from scratch


def prepare_data(cfg: TrainConfig, device_name: str | None = None) -> Dataset:
    """Load, split and preprocess on the CPU, then move the whole dataset to the training device once."""
    device = resolve_device(device_name or cfg.device)
    return load_dataset(cfg.data_config(), device=device).to(device, channels_last=True)  # ZCA fit on the GPU too


def run_tracked(
    cfg: TrainConfig,
    *,
    experiment: str,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    resume_run_id: str | None = None,
    checkpoint_from_run: str | None = None,
    restart_on_bad_checkpoint: bool = False,
    hooks: Sequence[Hooks] = (),
    data: Dataset | None = None,
    log_model: bool = True,
    checkpoint_every: int = 1,
    on_run_created: Callable[[str], None] | None = None,
) -> RunOutcome:
    """Train ``cfg`` as an MLflow run.

    ``resume_run_id`` continues that run from its last checkpoint. ``checkpoint_from_run`` starts a *new* run from
    another run's last checkpoint (a search trial retried after its worker died). A checkpoint that cannot be read
    raises, unless ``restart_on_bad_checkpoint``: then the problem is recorded and training starts from scratch.
    ``on_run_created`` gets the run id as soon as the run exists, before training: a search trial records it in
    Optuna then, so a retry of a trial whose worker dies mid-training can find that run's checkpoint.
    """
    device = resolve_device(cfg.device)
    source_run = resume_run_id or checkpoint_from_run
    resume_path, problem, start_epoch = None, "", 0
    if source_run:
        try:
            resume_path = tracking.download_checkpoint(source_run)
            start_epoch = load_checkpoint(resume_path)["epoch"]
        except CheckpointError as exc:
            if not restart_on_bad_checkpoint:
                raise
            resume_path, problem = None, str(exc)
        except Exception as exc:  # no checkpoint was uploaded yet: nothing to resume
            if not restart_on_bad_checkpoint:
                raise
            resume_path, problem = None, f"no usable checkpoint in run {source_run}: {exc}"
    data = data if data is not None else prepare_data(cfg)
    if resume_run_id:
        run_id = resume_run_id
        tracking.reopen_run(run_id)
    else:
        run_id = tracking.start_run(
            cfg,
            experiment=experiment,
            run_name=run_name,
            parent_run_id=parent_run_id,
            tags=tags,
            device=device,
            data_fingerprint=data.fingerprint,
        )
    if on_run_created is not None:
        on_run_created(run_id)
    if problem:
        tracking.client().set_tag(run_id, f"{tracking.TAG}checkpoint_problem", problem[:5000])
    if checkpoint_from_run:
        tracking.client().set_tag(run_id, f"{tracking.TAG}resumed_from_run", checkpoint_from_run)
    all_hooks = HookList([tracking.MlflowHooks(run_id, checkpoint_every), *hooks])
    with tempfile.TemporaryDirectory(prefix="allconv-ckpt-") as checkpoint_dir:
        try:
            result = train(
                cfg,
                data,
                device=device,
                checkpoint_dir=Path(checkpoint_dir),
                hooks=all_hooks,
                resume_from=resume_path,
            )
        except BaseException as exc:
            with contextlib.suppress(Exception):
                interrupted = isinstance(exc, KeyboardInterrupt)
                tracking.mark_failed(run_id, f"{type(exc).__name__}: {exc}", "KILLED" if interrupted else "FAILED")
            raise
        tracking.finish_run(run_id, result, log_model=log_model)
    return RunOutcome(run_id, result, resumed_from_epoch=start_epoch if resume_path else 0, checkpoint_problem=problem)
