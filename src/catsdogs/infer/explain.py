"""Why the model answered as it did: Grad-CAM heatmaps over the photo, and their overlays.

Grad-CAM (Selvaraju et al., 2017) weighs each channel of the last conv feature map by the mean
gradient of the explained class's score and keeps the positive part. For the heads catsdogs trains
on EfficientNet-Lite, the two-backbone ensemble and the residual CNN (global average pool, then one
linear layer) this is exact, not a linearisation: the class score is ``b + sum_ij cam(i, j)``, so the
map splits the score over image regions. The ensemble's score is the sum of its members' parts,
so the members' maps (each from its own gradients) are resized to the input and summed before the
positive part is taken. The seed CNN (flatten + MLP) gets the usual first-order Grad-CAM.

Each model class names the modules whose outputs are its last feature maps (``cam_layers()``). The
explainer works on its own copy of the model: hooks on a model that the server's micro-batcher runs
concurrently would capture other requests' passes. Activations are made to require gradients in
the hook, so folded (frozen) weights need none.

Why not pytorch-grad-cam or captum: pytorch-grad-cam imports torchvision, for which no build
matching this CPU torch is available here; captum's LayerGradCam would need the same hook points
and still leaves the ensemble's sum, the resize-policy inversion and the overlay to us, so it would
add a dependency for ~20 lines of arithmetic.
"""

from __future__ import annotations

import copy
import csv
import io
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image
from torch import nn

from catsdogs.errors import ConfigError
from catsdogs.infer.predictor import Predictor
from catsdogs.io.atomic import atomic_save, atomic_write_text
from catsdogs.models.feature_model import FeatureModel
from catsdogs.models.heads import probabilities
from catsdogs.models.transforms import load_rgb, normalize
from catsdogs.progress import progress_bar

COLORMAP = "jet"
"""Colour map of the overlays: blue = no evidence, red = most evidence (the usual Grad-CAM look)."""
OVERLAY_ALPHA = 0.5
"""Weight of the colour map where the heatmap is 1; it falls to ``OVERLAY_ALPHA * OVERLAY_FLOOR`` at 0,
so the photo stays visible where the model did not look."""
OVERLAY_FLOOR = 0.35
INDEX_NAME = "explanations.csv"
"""Written into the --explain folder: which input file each ``<stem>.png`` / ``<stem>.npy`` belongs to."""
INDEX_COLUMNS: tuple[str, ...] = ("path", "overlay", "heatmap")
EXPLAIN_BATCH = 8
"""Images per forward + backward pass: a backward keeps every activation, ~8x the memory of an
inference pass (EfficientNet-Lite1+2 at 260 px: ~0.3 GB per image), so batches stay small."""


@dataclass
class Explanation:
    """One image's heatmap in model-input space and the class it explains."""

    heatmap: np.ndarray
    """``(size, size)`` float32 in [0, 1]: where the evidence for ``target`` lies (max = 1 unless none)."""
    target: int
    """Index of the explained class (the predicted one unless asked otherwise)."""
    probabilities: np.ndarray
    """``(C,)`` class probabilities of the explained (untransformed) pass."""


class Explainer:
    """Grad-CAM for a :class:`Predictor`'s model; thread-safe (one explanation at a time)."""

    def __init__(self, predictor: Predictor) -> None:
        model = predictor.model
        if not isinstance(model, FeatureModel):
            raise ConfigError(f"model {type(model).__name__} has no cam_layers(); explanations need "
                              f"one of the models catsdogs trains (drop --explain)")
        self.predictor = predictor
        self.model: nn.Module = copy.deepcopy(model).eval()  # own copy: hooks must not see other passes
        self._acts: list[torch.Tensor] = []
        self._lock = threading.Lock()
        for layer in self.model.cam_layers():  # type: ignore[operator]
            layer.register_forward_hook(self._capture)

    def _capture(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not output.requires_grad:  # folded weights need no grad: make the activation a leaf
            output = output.detach().requires_grad_(True)
        self._acts.append(output)
        return output

    def explain_arrays(self, images: np.ndarray, targets: np.ndarray | None = None) -> list[Explanation]:
        """Explain a uint8 NHWC batch of resized images (``targets``: class per image, else the predicted)."""
        out: list[Explanation] = []
        for start in range(0, len(images), EXPLAIN_BATCH):
            chunk = images[start:start + EXPLAIN_BATCH]
            tgt = None if targets is None else targets[start:start + EXPLAIN_BATCH]
            out.extend(self._explain_batch(chunk, tgt))
        return out

    def _explain_batch(self, images: np.ndarray, targets: np.ndarray | None) -> list[Explanation]:
        p = self.predictor
        x = normalize(torch.as_tensor(np.array(images, dtype=np.uint8)), p.mean, p.std).to(p.device)
        with self._lock, torch.enable_grad():
            self._acts = []
            logits = self.model(x).float()
            acts, self._acts = self._acts, []
            probs = probabilities(logits.detach())
            tgt = probs.argmax(1) if targets is None else torch.as_tensor(targets, device=logits.device)
            score = _class_score(logits, tgt).sum()  # samples are independent in eval mode
            grads = torch.autograd.grad(score, acts)
        side = x.shape[-2:]
        cam = torch.zeros((x.shape[0], *side), device=x.device)
        for a, g in zip(acts, grads, strict=True):
            weights = g.float().mean(dim=(2, 3), keepdim=True)
            part = (weights * a.detach().float()).sum(dim=1, keepdim=True)
            cam += F.interpolate(part, size=side, mode="bilinear", align_corners=False)[:, 0]
        cam = cam.clamp_min(0)
        peak = cam.flatten(1).amax(1).clamp_min(torch.finfo(torch.float32).tiny).view(-1, 1, 1)
        heat = (cam / peak).clamp(0, 1).cpu().numpy().astype(np.float32)
        pr = probs.cpu().numpy().astype(np.float32)
        return [Explanation(heat[i], int(tgt[i]), pr[i]) for i in range(len(heat))]


def _class_score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The pre-activation score of each sample's ``target`` class: ``+-z`` for one logit, else ``z_c``."""
    if logits.shape[1] == 1:
        return torch.where(target == 1, logits[:, 0], -logits[:, 0])
    return logits.gather(1, target.long().view(-1, 1))[:, 0]


def to_original(heatmap: np.ndarray, policy: str, height: int, width: int) -> np.ndarray:
    """Map a model-input heatmap back onto the original ``height x width`` photo (float32, [0, 1]).

    Inverts the resize policy (:func:`catsdogs.models.transforms.resize_image`): ``stretch`` resizes,
    ``crop`` places the map on the centre square (the cut-off sides get 0), ``pad`` drops the
    letterbox bars first.
    """
    size = heatmap.shape[0]
    if policy == "crop":
        side = min(height, width)
        out = np.zeros((height, width), dtype=np.float32)
        top, left = round((height - side) / 2), round((width - side) / 2)
        out[top:top + side, left:left + side] = _resize(heatmap, side, side)
        return out
    if policy == "pad":
        if width >= height:
            inner = max(1, round(height / width * size))
            off = round((size - inner) / 2)
            heatmap = heatmap[off:off + inner, :]
        else:
            inner = max(1, round(width / height * size))
            off = round((size - inner) / 2)
            heatmap = heatmap[:, off:off + inner]
    return _resize(heatmap, height, width)


def _resize(heatmap: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a float map (Pillow's ``F`` mode), clipped to [0, 1]."""
    img = Image.fromarray(np.ascontiguousarray(heatmap, dtype=np.float32), mode="F")
    out = np.asarray(img.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """Blend a colour-mapped ``heatmap`` (same height x width, [0, 1]) over a uint8 RGB ``image``."""
    if heatmap.shape != image.shape[:2]:
        heatmap = _resize(heatmap, image.shape[0], image.shape[1])
    colors = colormaps[COLORMAP](heatmap)[..., :3].astype(np.float32) * 255.0
    alpha = (OVERLAY_ALPHA * (OVERLAY_FLOOR + (1.0 - OVERLAY_FLOOR) * heatmap))[..., None]
    blended = image.astype(np.float32) * (1.0 - alpha) + colors * alpha
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a uint8 RGB array as PNG."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def save_explanation(image: np.ndarray, heatmap: np.ndarray, png: Path, npy: Path) -> None:
    """Write the overlay ``png`` and the float32 heatmap ``npy`` (both at the image's size) atomically."""
    data = png_bytes(overlay(image, heatmap))
    atomic_save(png, lambda fh: fh.write(data))
    atomic_save(npy, lambda fh: np.save(fh, heatmap.astype(np.float32)))


def unique_stems(paths: list[Path]) -> list[str]:
    """Return one output stem per path: the file's stem, made unique in input order.

    A stem used by one file only stays as is; files sharing a stem get ``<stem>-<k>`` (k = 1, 2, ...
    in input order, skipping any name another file already owns), so the same inputs always give the
    same names.
    """
    counts: dict[str, int] = {}
    for p in paths:
        counts[p.stem] = counts.get(p.stem, 0) + 1
    taken = {stem for stem, n in counts.items() if n == 1}
    next_k: dict[str, int] = {}
    out: list[str] = []
    for p in paths:
        stem = p.stem
        if counts[stem] == 1:
            out.append(stem)
            continue
        k = next_k.get(stem, 1)
        while f"{stem}-{k}" in taken:
            k += 1
        name = f"{stem}-{k}"
        next_k[stem] = k + 1
        taken.add(name)
        out.append(name)
    return out


def explain_files(predictor: Predictor, files: Sequence[Path], targets: Sequence[int | None], out: Path,
                  max_pixels: int, progress: bool = True) -> list[tuple[Path, str]]:
    """Write ``out/<stem>.png`` and ``out/<stem>.npy`` for every file with a target class.

    Files whose target is None (undecodable: their prediction row carries the error) are skipped.
    Each file is decoded twice: at model size exactly as it was classified, and at its original size
    for the overlay. Returns ``(path, stem)`` of the files written, in input order, and writes that
    list as ``out/explanations.csv`` (so files sharing a stem can be told apart).
    """
    explainer = Explainer(predictor)
    todo = [(f, t) for f, t in zip(files, targets, strict=True) if t is not None]
    stems = unique_stems([f for f, _ in todo])
    out.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, str]] = []
    with progress_bar(total=len(todo), unit="img", file=sys.stderr, disable=not progress,
                      desc="explain") as bar:
        for start in range(0, len(todo), EXPLAIN_BATCH):
            batch = todo[start:start + EXPLAIN_BATCH]
            datas = [f.read_bytes() for f, _ in batch]
            images = np.stack([predictor.decode(d, max_pixels) for d in datas])
            found = explainer.explain_arrays(images, np.array([t for _, t in batch]))
            for (f, _), data, ex, stem in zip(batch, datas, found, stems[start:start + EXPLAIN_BATCH],
                                              strict=True):
                photo = load_rgb(data, max_pixels)
                heat = to_original(ex.heatmap, predictor.resize, photo.shape[0], photo.shape[1])
                save_explanation(photo, heat, out / f"{stem}.png", out / f"{stem}.npy")
                written.append((f, stem))
            bar.update(len(batch))
    index = io.StringIO()
    w = csv.writer(index, lineterminator="\n")
    w.writerow(INDEX_COLUMNS)
    for f, stem in written:
        w.writerow([str(f), f"{stem}.png", f"{stem}.npy"])
    atomic_write_text(out / INDEX_NAME, index.getvalue())
    return written


def explain_upload(explainer: Explainer, data: bytes, target: int, max_pixels: int, max_side: int
                   ) -> tuple[bytes, int, int]:
    """Return the overlay PNG of one uploaded photo (shrunk to ``max_side``) and its width and height.

    The model sees the photo exactly as when it was classified; the heatmap is mapped onto the shrunk
    photo (same aspect as the original, so the same mapping).
    """
    image = explainer.predictor.decode(data, max_pixels)
    found = explainer.explain_arrays(image[None], np.array([target]))[0]
    photo = load_rgb(data, max_pixels, max_side)
    heat = to_original(found.heatmap, explainer.predictor.resize, photo.shape[0], photo.shape[1])
    return png_bytes(overlay(photo, heat)), photo.shape[1], photo.shape[0]
