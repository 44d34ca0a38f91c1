"""Batch augmentation in torch: random horizontal flips and small random translations.

Works on a whole batch at once (no per-image Python), on the uint8 NHWC batches the loader yields
(cheapest: 1 byte per value) or on float NCHW ones. All randomness comes from an explicit
``torch.Generator`` so a run (and a resumed run) sees the same augmentations; labels are untouched.
"""

from __future__ import annotations

import torch

PADDING_MODES = ("reflect", "zero")


def _hw_dims(layout: str) -> tuple[int, int]:
    """Return the (height, width) dimensions of a 4-d batch in ``layout``."""
    if layout == "NHWC":
        return 1, 2
    if layout == "NCHW":
        return 2, 3
    raise ValueError(f"unknown layout {layout!r}; expected NHWC or NCHW")


def random_hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5,
                 layout: str = "NHWC") -> torch.Tensor:
    """Mirror each image left-right with probability ``p``; returns a new tensor."""
    _, wdim = _hw_dims(layout)
    mask = torch.rand(x.shape[0], generator=generator) < p
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    return torch.where(mask.view(shape).to(x.device), x.flip(wdim), x)


def _source_index(offset: torch.Tensor, length: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image source coordinates of a shift: ``(n, length)`` indices and a validity mask.

    Output pixel ``i`` of an image shifted by ``d`` comes from source ``i - d``; outside the image it
    reflects (``reflect``, edge not repeated) or is marked invalid (``zero``).
    """
    src = torch.arange(length).view(1, -1) - offset.view(-1, 1)
    valid = (src >= 0) & (src < length)
    if mode == "reflect":
        period = max(2 * (length - 1), 1)
        src = src.remainder(period)
        src = torch.where(src >= length, period - src, src)
    else:
        src = src.clamp(0, length - 1)
    return src, valid


def random_translate(x: torch.Tensor, generator: torch.Generator, max_shift: int = 4,
                     padding: str = "reflect", layout: str = "NHWC") -> torch.Tensor:
    """Shift each image by a random ``(dy, dx)`` in ``[-max_shift, max_shift]`` pixels.

    Equivalent to padding by ``max_shift`` (reflect or zero) and taking a random crop of the original
    size, done with one gather instead of materialising the padded batch.
    """
    if padding not in PADDING_MODES:
        raise ValueError(f"unknown padding {padding!r}; expected one of {PADDING_MODES}")
    if max_shift <= 0:
        return x
    hdim, wdim = _hw_dims(layout)
    n, h, w = x.shape[0], x.shape[hdim], x.shape[wdim]
    shifts = torch.randint(-max_shift, max_shift + 1, (2, n), generator=generator)
    rows, rvalid = _source_index(shifts[0], h, padding)
    cols, cvalid = _source_index(shifts[1], w, padding)
    nidx = torch.arange(n).view(n, 1, 1)
    dev = x.device
    if layout == "NHWC":
        out = x[nidx.to(dev), rows.view(n, h, 1).to(dev), cols.view(n, 1, w).to(dev)]
    else:  # NCHW: move channels last for the gather, then back
        out = x.permute(0, 2, 3, 1)[nidx.to(dev), rows.view(n, h, 1).to(dev), cols.view(n, 1, w).to(dev)]
        out = out.permute(0, 3, 1, 2)
    if padding == "zero":
        mask = (rvalid.view(n, h, 1) & cvalid.view(n, 1, w)).to(dev)
        mask = mask.unsqueeze(-1) if layout == "NHWC" else mask.unsqueeze(1)
        out = out * mask.to(out.dtype)
    return out


def augment_batch(x: torch.Tensor, generator: torch.Generator, *, flip: bool = True,
                  max_shift: int = 4, padding: str = "reflect", layout: str = "NHWC") -> torch.Tensor:
    """Apply the training augmentation (random flip, then random translation) to a batch."""
    if flip:
        x = random_hflip(x, generator, layout=layout)
    return random_translate(x, generator, max_shift=max_shift, padding=padding, layout=layout)
