"""``allconv visualize``: the paper's Figures 1-3 for one trained MLflow run.

For chosen units of one layer, the images of the run's validation split that activate each unit most, next to what
plain backpropagation, the "deconvnet" and guided backpropagation reconstruct from that activation
(:mod:`allconv_cli.saliency`). The run's data is rebuilt from its logged config, so the images are the ones it held
out; the picture is written as a PNG and logged as an artifact of the run. Reconstructions are shown in the
network's input space (GCN+ZCA whitened for the paper's runs): mapped back through the inverse whitening they turn
into low-frequency colour blobs that hide the edges guided backpropagation finds.

Weights come from the run's checkpoints, read with ``weights_only=True``: never the pickled ``network`` model, whose
loading would run whatever code the run's artifacts hold.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from allconv_cli import saliency
from allconv_cli.config import TrainConfig
from allconv_cli.data import NUM_CLASSES, DataConfig, Dataset, load_onto, load_raw, pick_test_indices, split_indices
from allconv_cli.engine import build_model, load_checkpoint, resolve_device
from allconv_cli.errors import AllconvError
from allconv_cli.output_files import check_png, write_file
from allconv_cli.tracking import store
from allconv_cli.tracking.schema import Artifact, Tag

# checkpoint: checkpoints/best.pt, else checkpoints/last.pt; best, last: that one. Weights only, no pickled code.
WEIGHTS: tuple[str, ...] = ("checkpoint", "best", "last")
SPLITS: tuple[str, ...] = ("val", "test")
ARTIFACT_DIR = "visualize"
COLUMNS = ("image", *saliency.RULES)
# Figure geometry in pixels at DPI: one unit is a block of `top` rows x 4 cells under a title line.
DPI = 100
CELL_PX = 80
BLOCK_TITLE_PX = 40
COLUMN_TITLE_PX = 20
FIGURE_TITLE_PX = 60
LEFT_PX = 20


@dataclass
class Visualization:
    path: Path
    run_id: str
    layer: str
    units: list[int]
    split: str
    weights: str  # where the weights came from: runs:/<run id>/checkpoints/<kind>.pt (epoch N)
    seconds: float
    artifact: str
    notes: list[str] = field(default_factory=list)


def default_out(run_id: str, layer: str) -> Path:
    return Path(f"visualize-{run_id[:8]}-{layer}.png")


def figure_pixels(n_units: int, top: int) -> tuple[int, int]:
    """(width, height) of the PNG: units in a near-square grid of blocks, each ``top`` rows of 4 cells."""
    cols = math.ceil(math.sqrt(n_units))
    rows = math.ceil(n_units / cols)
    block_w = LEFT_PX + len(COLUMNS) * CELL_PX
    block_h = BLOCK_TITLE_PX + COLUMN_TITLE_PX + top * CELL_PX
    return cols * block_w, FIGURE_TITLE_PX + rows * block_h


def visualize_run(
    run_id: str,
    *,
    layer: str | None = None,
    units: Sequence[int] | int = 4,
    top: int = 4,
    out: Path | None = None,
    split: str = "val",
    weights: str = "checkpoint",
    data_dir: str | None = None,
    device: str = "auto",
    force: bool = False,
) -> Visualization:
    """Write the figure for ``run_id`` and log it to the run. ``units``: channel indices, or a count N (the N
    channels with the highest peak activation over the split). Bad input raises before anything is written; an
    existing ``out`` is replaced only with ``force``, a symbolic link never."""
    started = time.perf_counter()
    _check_choices(split, weights, top)
    if out is not None:
        check_png(out, "--out", force)
    run = store.get_run(run_id)
    cfg = TrainConfig.from_params(run.data.params)
    if data_dir is not None:
        cfg = dataclasses.replace(cfg, data_dir=data_dir)
    notes: list[str] = []
    if split == "val" and cfg.val_size == 0:
        split = "test"
        notes.append(f"run {run_id} held out no validation split (val_size 0): showing its test split")
    dev = resolve_device(device)
    data_cfg = cfg.data_config()
    skeleton = build_model(cfg, NUM_CLASSES[cfg.dataset]).eval()  # the run's architecture: check the choices first
    layer = layer or saliency.default_layer(skeleton)
    saliency.check_layer(skeleton, layer)
    _check_units(units, saliency.unit_count(skeleton, layer, torch.zeros(1, 3, 32, 32)), layer)
    if out is None:
        out = default_out(run_id, layer)
        check_png(out, "--out", force)
    model, source = load_weights(run_id, skeleton, weights, dev, notes)

    data = load_onto(data_cfg, dev)
    recorded = run.data.tags.get(Tag.DATA_HASH)
    if recorded and recorded != data.fingerprint:
        notes.append(f"the data rebuilt here (hash {data.fingerprint}) differs from the run's ({recorded})")
    x, labels, raw = split_with_raw(data, data_cfg, split)
    if top > len(x):
        raise AllconvError(f"top={top} is more than the {len(x)} images of the {split} split: pass --top {len(x)}")
    panels = unit_panels(model, layer, units, top, data, x, raw)
    chosen = [panel[0] for panel in panels]
    notes += [f"unit {unit} of {layer} is never active on the {split} split (dead)"
              for unit, _, values, _ in panels if max(values) <= 0]
    shown = source.removeprefix(store.run_uri(run_id, ""))  # the run is named at the start of the title
    title = (f"run {run_id[:8]}: {cfg.registry_name}, {layer}, top {top} {split} images per unit (weights: {shown})"
             "\nthrough each ReLU (input f, gradient R) backprop passes (f>0)R, deconvnet (R>0)R, "
             f"guided (f>0)(R>0)R;\nshown in the network's input space ({cfg.preprocess}), min-max normalised each")
    draw(out, title, panels, raw, labels, data.classes, force)
    artifact = f"{ARTIFACT_DIR}/{out.name}"
    store.log_artifact(run_id, out, ARTIFACT_DIR)
    return Visualization(out, run_id, layer, chosen, split, source, time.perf_counter() - started, artifact, notes)


def unit_panels(model: nn.Module, layer: str, units: Sequence[int] | int, top: int, data: Dataset, x: torch.Tensor,
                raw: np.ndarray) -> list[tuple[int, list[int], list[float], dict[str, torch.Tensor]]]:
    """Per unit (the given channels, or the ``units`` with the highest peak activation): its ``top`` images of
    ``x`` (indices and peak values) and each rule's reconstruction of them."""
    peaks = saliency.peak_activations(model, layer, x)
    chosen = list(units) if not isinstance(units, int) else peaks.amax(dim=0).argsort(descending=True)[:units].tolist()
    panels = []
    for unit in chosen:
        values, order = peaks[:, unit].topk(top)
        idx = order.cpu()
        _check_raw_matches(data, raw[idx.numpy()], x[idx])
        recon = {rule: saliency.reconstruct(model, layer, x[idx], unit, rule).cpu() for rule in saliency.RULES}
        panels.append((unit, idx.tolist(), values.cpu().tolist(), recon))
    return panels


def _check_choices(split: str, weights: str, top: int) -> None:
    if split not in SPLITS:
        raise AllconvError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if weights not in WEIGHTS:
        raise AllconvError(f"unknown weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    if top < 1:
        raise AllconvError(f"top={top}: show at least 1 image per unit")


def _check_units(units: Sequence[int] | int, channels: int, layer: str) -> None:
    if isinstance(units, int):
        if not 1 <= units <= channels:
            raise AllconvError(f"--units {units}: {layer} has {channels} units, show between 1 and {channels}")
        return
    if not units:
        raise AllconvError("--units is empty: give channel indices such as 0,3,7 or a count such as 4")
    for unit in units:
        if not 0 <= unit < channels:
            raise AllconvError(f"unit {unit} is out of range: {layer} has {channels} units (0..{channels - 1})")


def load_weights(run_id: str, skeleton: nn.Module, weights: str, device: torch.device,
                 notes: list[str]) -> tuple[nn.Module, str]:
    """The run's trained network in eval mode on ``device``, and its full ``runs:/`` address with the epoch.

    ``skeleton`` is the run's architecture; it takes the weights of ``checkpoints/best.pt`` (``checkpoint``: else
    ``last.pt``, and a note says so), read with ``weights_only=True`` so no code from the run's artifacts runs.
    The downloaded file is removed once read.
    """
    kinds = ("best", "last") if weights == "checkpoint" else (weights,)
    for kind in kinds:
        try:
            with store.checkpoint_file(run_id, kind) as path:
                state = load_checkpoint(path)
        except AllconvError as exc:
            if kind != kinds[-1]:
                notes.append(f"run {run_id} has no usable checkpoints/{kind}.pt ({exc}): using checkpoints/last.pt")
                continue
            wanted = " or ".join(f"{Artifact.CHECKPOINTS}/{k}.pt" for k in kinds)
            other = "best" if kind == "last" else "last"
            raise AllconvError(f"run {run_id} has no usable {wanted} ({exc}): try --weights {other}, or a run that "
                               "trained at least one epoch") from None
        skeleton.load_state_dict(state["model"])
        address = store.run_uri(run_id, f"{Artifact.CHECKPOINTS}/{kind}.pt")
        return skeleton.to(device).eval(), f"{address} (epoch {state.get('epoch', '?')})"
    raise AssertionError("unreachable: the last kind returns or raises")


def split_with_raw(data: Dataset, data_cfg: DataConfig, split: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The network inputs, labels and raw uint8 NHWC images of ``split``, image i of each being the same picture.

    The dataset holds preprocessed (whitened) inputs only; the raw pictures come from the same split indices
    that :func:`allconv_cli.data.load_dataset` draws, applied to the raw arrays.
    """
    x_train, y_train, x_test, y_test, _ = load_raw(data_cfg)
    if split == "val":
        assert data.val is not None
        _, _, idx = split_indices(y_train, data_cfg.val_size, data_cfg.subset, data_cfg.seed)
        part, raw = data.val, x_train[idx]
    else:
        idx = pick_test_indices(y_test, data_cfg.test_size, data_cfg.seed)
        part, raw = data.test, x_test[idx]
    if len(raw) != len(part):
        raise RuntimeError(f"{split}: {len(raw)} raw images for {len(part)} inputs")
    return part.x, part.y.cpu(), raw


def _check_raw_matches(data: Dataset, raw: np.ndarray, x: torch.Tensor) -> None:
    """The shown pictures are the inputs that were analysed: preprocessing them again gives those inputs."""
    if data.preprocessor is None:
        return
    again = data.preprocessor.apply(raw, x.device).to(x.device)  # the same maths, on the same device
    if not torch.allclose(again, x.float(), atol=1e-3, rtol=1e-3):
        raise RuntimeError("raw images and network inputs of the split are out of step")


def _normalise(image: np.ndarray) -> np.ndarray:
    """Min-max to 0..1 over all three channels; a constant map shows as mid-grey."""
    low, high = float(image.min()), float(image.max())
    return np.full_like(image, 0.5) if high <= low else (image - low) / (high - low)


def draw(out: Path, title: str, panels: list, raw: np.ndarray, labels: torch.Tensor, classes: list[str],
         force: bool = False) -> None:
    """One block per unit: each row a top image and its three reconstructions, min-max normalised each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = len(panels[0][1])
    width, height = figure_pixels(len(panels), top)
    cols = math.ceil(math.sqrt(len(panels)))
    block_w = LEFT_PX + len(COLUMNS) * CELL_PX
    block_h = BLOCK_TITLE_PX + COLUMN_TITLE_PX + top * CELL_PX
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    fig.text(0.5, 1 - 0.5 * FIGURE_TITLE_PX / height, title, ha="center", va="center", fontsize=7)
    pad = 3  # pixels between cells
    for b, (unit, idx, values, recon) in enumerate(panels):
        x0 = (b % cols) * block_w + LEFT_PX
        y0 = FIGURE_TITLE_PX + (b // cols) * block_h  # from the top
        fig.text((x0 + len(COLUMNS) * CELL_PX / 2) / width, 1 - (y0 + BLOCK_TITLE_PX * 0.55) / height,
                 f"unit {unit}", ha="center", va="center", fontsize=9, weight="bold")
        for r in range(top):
            i = idx[r]
            cells = [raw[i], *(_normalise(recon[rule][r].permute(1, 2, 0).numpy()) for rule in saliency.RULES)]
            for c, image in enumerate(cells):
                left = x0 + c * CELL_PX + pad
                bottom = height - (y0 + BLOCK_TITLE_PX + COLUMN_TITLE_PX + (r + 1) * CELL_PX) + pad
                ax = fig.add_axes((left / width, bottom / height, (CELL_PX - 2 * pad) / width,
                                   (CELL_PX - 2 * pad) / height))
                ax.imshow(image, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(COLUMNS[c], fontsize=7, pad=2)
                if c == 0:
                    ax.set_ylabel(f"#{i} {classes[int(labels[i])]}\n{values[r]:.2f}", fontsize=5, labelpad=1)
    try:
        write_file(out, lambda file: fig.savefig(file, dpi=DPI, format="png"), force)
    finally:
        plt.close(fig)
