"""How many int8 calibration images: validation accuracy, cosine to fp32 and engine build time per count.

For a trained frozen run (default: ``make run``'s), the int8 graph is calibrated again on the first
``--counts`` training images of the run's own shards; the run's head is applied to the VALIDATION
features of each graph (never test), beside the fp32 graph's. This is the measurement behind
``engines/names.CALIBRATION_IMAGES``.

    .venv/bin/python -m benchmarks.calibration [--run RUN] [--counts 64 128 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import DEFAULT_RUN, heavy_lock, machine, write_fragment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default=str(DEFAULT_RUN), help="trained frozen run (default: make run's)")
    parser.add_argument("--counts", type=int, nargs="+", default=[64, 128, 256])
    args = parser.parse_args()

    import torch

    from catsdogs.checkpoint import load_checkpoint
    from catsdogs.engines.batches import calibration_images
    from catsdogs.engines.factory import create_engine
    from catsdogs.models.factory import create_model
    from catsdogs.rundir import RunDir
    from catsdogs.runtime import setup
    from catsdogs.shards.manifest import load_manifest
    from catsdogs.train.features import extract_features

    run = Path(args.run)
    state = load_checkpoint(run / "best.pt")
    cfg, mcfg = state["train_config"], state["model_config"]
    data, size = Path(cfg["data"]), int(state["image"]["size"])
    mean, std = tuple(state["normalization"]["mean"]), tuple(state["normalization"]["std"])
    w = state["model_state"]["_fc.weight"].numpy()
    b = state["model_state"]["_fc.bias"].numpy()

    def accuracy(feats: np.ndarray, labels: np.ndarray) -> float:
        logits = feats @ w.T + b
        pred = (logits[:, 0] > 0).astype(int) if logits.shape[1] == 1 else logits.argmax(1)
        return float((pred == labels).mean())

    with heavy_lock(), tempfile.TemporaryDirectory(prefix="catsdogs-bench-calib-") as tmp:
        setup(0, "cpu", 0)
        manifest = load_manifest(data)
        model = create_model(mcfg["name"], len(state["classes"]), size, pretrained=True)
        model = model.to(memory_format=torch.channels_last)
        fp32 = create_engine("openvino", model, size, RunDir(Path(tmp) / "fp32"))
        ref, labels = extract_features(model, data, manifest, "val", mean, std, 64, engine=fp32,
                                       progress=False)
        rows = [f"| fp32 (reference) | - | {100 * accuracy(ref, labels):.2f} % | 1 |"]
        for n in args.counts:
            t0 = time.perf_counter()
            engine = create_engine(
                "openvino-int8", model, size, RunDir(Path(tmp) / f"int8-{n}"),
                calibration=lambda n=n: calibration_images(data, manifest, mean, std, n, 64, size),
                calibration_rows=n)
            build = time.perf_counter() - t0
            feats, _ = extract_features(model, data, manifest, "val", mean, std, 64, engine=engine,
                                        progress=False)
            cos = (feats * ref).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(ref, axis=1)
            rows.append(f"| {n} | {build:.1f} | {100 * accuracy(feats, labels):.2f} % | "
                        f"{cos.mean():.4f} (min {cos.min():.4f}) |")
    lines = [
        "## int8 calibration images (`--calibration-images`)",
        "",
        f"`.venv/bin/python -m benchmarks.calibration --run RUN --counts {' '.join(map(str, args.counts))}` "
        f"({machine()}); RUN = the default preset as `make run` trains it ({mcfg['name']}, {size} px); "
        f"the run's head on the {len(labels):,} VALIDATION images' features of each graph.",
        "",
        "| calibration images | engine build s (export+calibrate+quantise) | val accuracy | cosine to fp32 |",
        "|---|---|---|---|",
        *rows,
    ]
    print("\n".join(lines))
    write_fragment("calibration", "\n".join(lines))


if __name__ == "__main__":
    main()
