"""Model selection for the frozen-backbone presets: linear probes of ImageNet features on val only.

For each backbone@size it computes pooled features of the train and val splits once with the
product's feature pass (``transfer.extract_features``; images resized in torch from the given shards
when the size differs), caches them, then fits the project's logistic head
(:func:`catsdogs.train.head.fit_head`, C picked by val log-loss) on single backbones and on
concatenations. Only val is used: the test split is for the final ``catsdogs evaluate`` of the
chosen preset.

Usage: ``.venv/bin/python -m benchmarks.frozen_probe [--data SHARDS_180] [--cache DIR]`` (without --data it
makes 180-px shards of the real data with ``catsdogs preprocess``; about 35 min on 2 cores the first
time, cached features make a re-run take seconds).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks._common import REAL_DATA, heavy_lock, machine, write_fragment

DEFAULT_DATA = Path("/tmp/catsdogs-bench/shards180")
CATSDOGS = str(Path(sys.executable).with_name("catsdogs"))

SPECS = ("effnet_lite0@180", "effnet_lite1@240", "effnet_lite2@260", "effnet_lite1@260")
COMBOS = ("effnet_lite0@180", "effnet_lite1@240", "effnet_lite1@260", "effnet_lite2@260",
          "effnet_lite0@180+effnet_lite2@260", "effnet_lite1@240+effnet_lite2@260",
          "effnet_lite1@260+effnet_lite2@260", "effnet_lite0@180+effnet_lite1@240+effnet_lite2@260")


def features(spec: str, data: Path, cache: Path) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Return ``split -> (features, mirrored features, forward passes/s)`` for train and val, cached.

    Uses the product's own feature pass (:func:`catsdogs.train.features.extract_features`, BatchNorm folded,
    batch 64), resizing the shards' images to the spec's size in torch; mirrored features for val only
    (flip TTA); training the head on mirrored copies did not help.
    """
    import torch

    from catsdogs.models.factory import create_model
    from catsdogs.models.registry import input_normalization
    from catsdogs.runtime import setup
    from catsdogs.shards.manifest import load_manifest
    from catsdogs.train.features import extract_features

    name, size = spec.split("@")[0], int(spec.split("@")[1])
    out: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    setup(0, "cpu", 0)
    m = load_manifest(data)
    mean, std = input_normalization(name, tuple(m.mean), tuple(m.std))
    model = None
    for split in ("train", "val"):
        f = cache / f"{name}_{size}_{split}.npz"
        if f.is_file():
            z = np.load(f)
            out[split] = (z["x"], z["xf"], float(z["rate"]))
            continue
        if model is None:
            model = create_model(name, 2, size, pretrained=True).eval().to(memory_format=torch.channels_last)
        flip = split == "val"
        t0 = time.perf_counter()
        x_all, _ = extract_features(model, data, m, split, mean, std, 64, flip=flip, size=size)
        rate = len(x_all) / (time.perf_counter() - t0)
        rows = len(x_all) // 2 if flip else len(x_all)
        x, xf = x_all[:rows], x_all[rows:]  # extract_features appends the mirrored rows
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(f, x=x, xf=xf, rate=rate)
        out[split] = (x, xf, rate)
        print(f"{spec} {split}: {rows} images, {rate:.1f} forward passes/s", flush=True)
    return out


def labels(data: Path, split: str) -> np.ndarray:
    from catsdogs.shards.manifest import load_manifest
    from catsdogs.shards.reader import open_shard

    m = load_manifest(data)
    return np.concatenate([open_shard(data, i, m.size)[1] for i in m.split_shards(split)])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA),
                    help="shards folder (train and val splits are used); made from the real data if absent")
    ap.add_argument("--cache", default="/tmp/catsdogs-frozen-probe", help="feature cache folder")
    ap.add_argument("--fragment", default="frozen_probe")
    args = ap.parse_args(argv)
    from catsdogs.train.head import fit_head

    data, cache = Path(args.data), Path(args.cache)
    with heavy_lock():
        if not (data / "manifest.json").is_file():
            if not REAL_DATA.is_dir():
                sys.exit(f"no shards at {data} and no real data at {REAL_DATA}; pass --data SHARDS")
            subprocess.run([CATSDOGS, "preprocess", "--input", str(REAL_DATA), "--output", str(data),
                            "--size", "180"], check=True)
        feats = {spec: features(spec, data, cache) for spec in SPECS}
    yt, yv = labels(data, "train"), labels(data, "val")
    rows = []
    for combo in COMBOS:
        parts = combo.split("+")
        xt = np.concatenate([feats[p]["train"][0] for p in parts], 1)
        xv = np.concatenate([feats[p]["val"][0] for p in parts], 1)
        xvf = np.concatenate([feats[p]["val"][1] for p in parts], 1)
        w, b, met = fit_head(xt, yt, xv, yv, num_classes=2)
        wn, bn = w.numpy(), b.numpy()  # the folded linear head: logit = x @ W.T + b
        p = 1 / (1 + np.exp(-(xv @ wn.T + bn)[:, 0]))
        pf = 1 / (1 + np.exp(-(xvf @ wn.T + bn)[:, 0]))
        acc = float(((p > 0.5) == yv).mean())
        acc_tta = float((((p + pf) / 2 > 0.5) == yv).mean())
        # Forward passes per image per second of the whole combination at batch 64 (train pass).
        rate = 1 / sum(1 / feats[p]["train"][2] for p in parts)
        minutes = (len(yt) + len(yv)) / rate / 60
        rows.append(f"| {combo.replace('+', ' + ')} | {met['C']:g} | {met['val_loss']:.4f} | "
                    f"{acc * 100:.2f} % | {acc_tta * 100:.2f} % | {rate:.0f} | {minutes:.1f} |")
        print(rows[-1], flush=True)
    cmd = f".venv/bin/python -m benchmarks.frozen_probe --data {args.data}"
    md = "\n".join([
        "## Frozen-backbone model selection (val split only)", "",
        f"Command: `{cmd}`  ",
        f"Machine: {machine()}.  ",
        f"Shards: {data} ({len(yt)} train / {len(yv)} val rows; images upsampled in torch to each size). "
        "Head: `catsdogs.train.head.fit_head` (logistic regression, C by val log-loss). The test split is "
        f"not touched here. Features are cached in `{cache}` and computed only when absent (this "
        "table's cache was filled by the same computation in an exploratory script, at the rates shown).",
        "",
        "| features | C | val log-loss | val acc | val acc, flip TTA | img/s (batch 64) | feature minutes "
        "(train + val) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ])
    print(f"wrote {write_fragment(args.fragment, md)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
