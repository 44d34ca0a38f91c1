"""A loaded model that turns images into class probabilities; shared by evaluate, predict and serve.

It applies exactly the transforms used for training (:mod:`catsdogs.models.transforms`) with the resize
policy, size and normalisation recorded in the checkpoint, so every entry point agrees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from catsdogs import checkpoint as ckpt
from catsdogs.checkpoint import build_from_checkpoint, load_checkpoint
from catsdogs.models.effnet import fold_for_inference
from catsdogs.models.heads import probabilities
from catsdogs.models.transforms import DEFAULT_MAX_PIXELS, hflip, load_image, normalize
from catsdogs.rundir import BEST_CKPT, resolve_checkpoint


@dataclass
class Predictor:
    """A model plus the metadata needed to feed it: classes, image size, resize policy, mean/std."""

    model: nn.Module
    classes: list[str]
    size: int
    resize: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    checkpoint: dict[str, Any]
    path: Path

    @classmethod
    def from_run(cls, run: str | Path, device: torch.device | str = "cpu",
                 name: str = BEST_CKPT) -> Predictor:
        """Load the checkpoint of a run folder (or a .pt file) and rebuild its model."""
        path = resolve_checkpoint(run, name)
        state = load_checkpoint(path)
        device = torch.device(device)
        model = build_from_checkpoint(state)
        # Inference only: BatchNorm folded into the convolutions (same outputs, one op less per conv).
        model = fold_for_inference(model).to(device).to(memory_format=torch.channels_last)
        image = state[ckpt.CKPT_IMAGE]
        norm = state[ckpt.CKPT_NORM]
        # Keep only small metadata: the weights now live in the model.
        meta = {k: v for k, v in state.items() if k not in (ckpt.CKPT_MODEL_STATE, "optimizer",
                                                              "scheduler", "ema_state", "rng")}
        return cls(model=model, classes=list(state[ckpt.CKPT_CLASSES]), size=int(image["size"]),
                   resize=str(image.get("resize", "stretch")), mean=tuple(norm["mean"]),
                   std=tuple(norm["std"]), device=device, checkpoint=meta, path=path)

    @torch.inference_mode()
    def predict_arrays(self, images: np.ndarray | torch.Tensor, tta: bool = False) -> np.ndarray:
        """Return probabilities ``(n, C)`` for a uint8 NHWC batch of already-resized images."""
        x = torch.as_tensor(images)
        if x.shape[0] == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        x = normalize(x, self.mean, self.std).to(self.device)
        probs = probabilities(self.model(x))
        if tta:
            probs = (probs + probabilities(self.model(hflip(x)))) / 2
        return probs.cpu().numpy().astype(np.float32)

    def decode(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Decode and resize image bytes the way training data was; raises ImageDecodeError."""
        return load_image(data, self.size, self.resize, max_pixels)

    def describe(self) -> dict[str, Any]:
        """Return JSON-ready model facts (name, classes, size, epoch, metrics) for APIs and reports."""
        mc = self.checkpoint.get(ckpt.CKPT_MODEL_CONFIG, {})
        return {
            "name": mc.get("name"),
            "classes": self.classes,
            "size": self.size,
            "resize": self.resize,
            "checkpoint": str(self.path),
            "epoch": self.checkpoint.get(ckpt.CKPT_EPOCH),
            "metrics": self.checkpoint.get(ckpt.CKPT_METRICS, {}),
        }
