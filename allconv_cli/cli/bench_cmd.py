"""``allconv bench``: training and evaluation throughput of one network on this machine."""

from __future__ import annotations

import json
from typing import Any

import click

from allconv_cli.cli import main
from allconv_cli.cli.options import field_option, network_options


@main.command("bench")
@network_options
@field_option("batch_size")
@click.option("--steps", type=click.IntRange(min=1), help="Timed training steps [default: 200 on GPU, 20 on CPU].")
@click.option("--warmup", type=click.IntRange(min=1), help="Untimed steps first [default: 30 on GPU, 3 on CPU].")
@field_option("device")
@field_option("compile")
@field_option("compile_mode")
@field_option("amp")
@field_option("bn")
@click.option("--baseline", is_flag=True, help="Also time a plain DataLoader + NCHW loop and print the ratio.")
@click.option(
    "--baseline-workers",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="DataLoader worker processes of the baseline.",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Repeat the timing (alternating with --baseline) and keep the best round of each.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def bench_command(
    model: str,
    branch: str,
    batch_size: int,
    steps: int | None,
    warmup: int | None,
    device: str,
    compile: bool,
    compile_mode: str,
    amp: bool,
    bn: bool,
    baseline: bool,
    baseline_workers: int,
    rounds: int,
    as_json: bool,
) -> None:
    """Time training steps and evaluation on synthetic data (after a warm-up) and print images/s."""
    from rich.console import Console

    from allconv_cli.bench import bench
    from allconv_cli.config import TrainConfig
    from allconv_cli.estimate import describe_device
    from allconv_cli.progress import TerminalView

    chosen, where = describe_device(device)
    on_gpu = chosen.type == "cuda"
    cfg = TrainConfig(model=model, branch=branch, batch_size=batch_size, device=device, compile=compile,
                      compile_mode=compile_mode, amp=amp, bn=bn)
    steps, warmup = steps or (200 if on_gpu else 20), warmup or (30 if on_gpu else 3)
    console = Console(stderr=as_json)  # --json keeps stdout to the one JSON object
    with TerminalView(console) as view:
        view.say(f"allconv bench: {cfg.registry_name}, batch {cfg.batch_size}, on {where}: {warmup} warm-up + "
                 f"{steps} timed training steps, then an evaluation pass"
                 + (", then the same steps as a plain DataLoader + NCHW loop (--baseline)" if baseline else "")
                 + (f", best of {rounds} rounds" if rounds > 1 else ""))
        result = bench(cfg, steps=steps, warmup=warmup, rounds=rounds, baseline=baseline,
                       baseline_workers=baseline_workers, say=view.stage)
    if as_json:
        click.echo(json.dumps(result.as_dict()))
        return
    console.print(_table(cfg, result))


def _table(cfg: Any, result: Any) -> Any:
    """The figures, and what one epoch of the default CIFAR-10 split takes at this speed."""
    from rich.table import Table

    from allconv_cli.config import DataConfig
    from allconv_cli.estimate import Estimate, Measurement, Sizes, duration

    measured = Measurement(result.device, result.device == "cpu", result.ms_per_step / 1000,
                           1 / result.eval_images_per_second, cfg.batch_size)
    epoch = Estimate(measured, Sizes.nominal(DataConfig()), cfg.epochs)
    table = Table(title=f"allconv bench: {cfg.registry_name}, batch {cfg.batch_size}", show_header=False)
    rows = [
        ("device", result.device),
        ("train images/s", f"{result.train_images_per_second:,.0f}"),
        ("ms per step", f"{result.ms_per_step:.2f}"),
        ("eval images/s", f"{result.eval_images_per_second:,.0f}"),
        ("peak memory", f"{result.peak_memory_mb:,.0f} MB"),
        ("compile / bf16", f"{cfg.compile_mode if result.compile else False} / {result.amp}"),
        ("CIFAR-10 epoch", f"~{duration(epoch.epoch_seconds)} ({epoch.steps_per_epoch:,} steps + "
                           f"{epoch.sizes.val:,} validation images)"),
    ]
    if result.baseline_images_per_second is not None:
        rows += [
            ("baseline images/s", f"{result.baseline_images_per_second:,.0f} (DataLoader + NCHW float32)"),
            ("speed-up", f"{result.speedup_vs_baseline:.2f}x"),
        ]
    for row in rows:
        table.add_row(*row)
    return table
