"""Batches as index slices of on-device tensors, and per-sample augmentation on the device: all the engine needs from
the data. A ``DataLoader`` with workers would cost more per step than the network does on a GPU."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from allconv_cli.config import check
from allconv_cli.errors import AllconvError

if TYPE_CHECKING:
    from allconv_cli.data import Split


def iterate_batches(split: Split, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
                    drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``split`` indexed straight out of its on-device tensors.

    With ``shuffle`` the order is ``torch.randperm`` drawn on the split's device from ``generator`` (which must live on
    that device), so a seeded generator replays the same order. Without it, batches are views in order.
    """
    if batch_size < 1:
        raise AllconvError(f"batch_size={batch_size}: use a batch size >= 1")
    return _batches(split, batch_size, shuffle, generator, drop_last)


def _batches(split: Split, batch_size: int, shuffle: bool, generator: torch.Generator | None,
             drop_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n = len(split)
    stop = n - n % batch_size if drop_last else n
    if not shuffle:
        for start in range(0, stop, batch_size):
            yield split.x[start : start + batch_size], split.y[start : start + batch_size]
        return
    order = torch.randperm(n, generator=generator, device=split.y.device)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield split.x[idx], split.y[idx]  # advanced indexing keeps channels_last (index_select would not)


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """Per-sample random augmentation on ``x``'s device, one gather for the whole batch.

    ``none``: ``x`` itself. ``flip-translate``: mirror each image horizontally with p=0.5 and shift it by a uniform
    random (dy, dx) in [-pad, pad]^2, filling with zeros (the mean image, after the zero-mean preprocessing), as the
    paper's "translations and horizontal flips". Random numbers come from ``generator`` (on ``x``'s device).
    """
    check("augment", mode)
    if mode == "none":
        return x
    if pad < 0:
        raise AllconvError(f"pad={pad}: the translation range must be >= 0 pixels")
    if x.ndim != 4:
        raise ValueError(f"augment_batch expects (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    dev = x.device
    flip = torch.rand(n, generator=generator, device=dev) < 0.5
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=dev)
    wp = w + 2 * pad
    rows = offsets[0][:, None] + torch.arange(h, device=dev)  # (n, h): rows of the zero-padded image
    ar = torch.arange(w, device=dev)
    cols = offsets[1][:, None] + torch.where(flip[:, None], w - 1 - ar, ar)  # (n, w): mirrored when flipped
    flat_idx = (rows[:, :, None] * wp + cols[:, None, :]).view(n, h * w)  # where each output pixel comes from
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    # One torch.gather over the flattened pixels (fast on every device, unlike broadcast 4-D advanced indexing), done
    # in whichever memory layout x has, so a channels_last batch stays channels_last without extra copies.
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        src = padded.permute(0, 2, 3, 1).reshape(n, -1, c)  # NHWC, contiguous for a channels_last x
        out = torch.gather(src, 1, flat_idx[:, :, None].expand(n, h * w, c))
        return out.view(n, h, w, c).permute(0, 3, 1, 2)
    src = padded.reshape(n, c, -1)
    out = torch.gather(src, 2, flat_idx[:, None, :].expand(n, c, h * w))
    return out.view(n, c, h, w)
