"""Cluster benchmark: the default model's feature pass on 1 and 2 one-core workers, and predict --master.

On ``--photos`` real photos at the default preset's 260 px (effnet_lite12, openvino-int8):

1. the distributed feature pass (``catsdogs.cluster.features.spark_features``, one task per shard of
   250 images) on a standalone cluster of 1, then 2 workers with one core each, each worker pinned to
   its own CPU (so "one core" is one core, not a scheduling count): images/s of the first job (each
   executor process's engine build included; the JVM and executor start-up before it not), then of a
   second job on the warm executors (the rate a long job settles at);
2. the same pass in this process (today's ``extract_features``, 2 threads) against the Spark code on
   ``local[2]``: whether local mode should use the Spark path;

Predict on Spark against local predict is :mod:`benchmarks.cluster_predict`.

The int8 graph is calibrated once on ``--calibration-images`` training images (speed does not depend on
how many). Usage (about 15 minutes on 2 cores)::

    flock /tmp/catsdogs-heavy.lock .venv/bin/python -m benchmarks.cluster [--photos 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import REAL_DATA, heavy_lock, machine, write_fragment

SIZE = 260
MODEL = "effnet_lite12"
ENGINE = "openvino-int8"
SHARD_ROWS = 250
VAL_FRAC = 0.1


def photos(n: int, skip: int = 0) -> list[tuple[Path, int]]:
    """``n`` real photos, half cats half dogs, after the first ``skip`` of each class."""
    out = []
    for label, cls in enumerate(("Cat", "Dog")):
        files = sorted((REAL_DATA / cls).glob("*.jpg"), key=lambda p: int(p.stem))
        out += [(p, label) for p in files[skip // 2 : skip // 2 + n // 2]]
    return out


def write_shards(root: Path, n: int) -> None:
    """Train/val shards of ``n`` real photos at 260 px (no Spark: the benchmark is the feature pass)."""
    from catsdogs.models.transforms import load_image
    from catsdogs.shards.manifest import Manifest, save_manifest
    from catsdogs.shards.writer import ShardWriter

    rows = photos(n)
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    n_val = int(len(rows) * VAL_FRAC)
    infos, counts = [], {}
    for split, part in (("train", rows[n_val:]), ("val", rows[:n_val])):
        counts[split] = {"Cat": sum(1 for _, y in part if y == 0), "Dog": sum(1 for _, y in part if y == 1)}
        for index, first in enumerate(range(0, len(part), SHARD_ROWS)):
            with ShardWriter(root, split, index, SIZE, 2) as w:
                for path, label in part[first : first + SHARD_ROWS]:
                    w.add(
                        load_image(path.read_bytes(), SIZE, "stretch"),
                        label,
                        f"{path.parent.name}/{path.name}",
                    )
            infos.append(w.info)
    save_manifest(
        Manifest(
            classes=["Cat", "Dog"],
            size=SIZE,
            resize="stretch",
            mean=[120.0] * 3,
            std=[60.0] * 3,
            shards=infos,
            counts=counts,
            stats={"kept": len(rows)},
        ),
        root,
    )


def feature_passes(data: Path, calibration: int) -> dict[str, float]:
    """images/s of the feature pass: Spark on 1 and 2 one-core workers, in-process, Spark local[2]."""
    import torch

    from catsdogs.cluster.features import spark_features
    from catsdogs.cluster.session import NEEDED, runtime_modules, spark_session
    from catsdogs.cluster.standalone import standalone_cluster
    from catsdogs.engines.batches import calibration_images
    from catsdogs.engines.factory import create_engine
    from catsdogs.models.factory import create_model
    from catsdogs.models.registry import input_normalization
    from catsdogs.rundir import RunDir
    from catsdogs.runtime import setup
    from catsdogs.shards.manifest import load_manifest
    from catsdogs.train.features import extract_features

    setup(0, "cpu")
    manifest = load_manifest(data)
    model = create_model(MODEL, 2, SIZE, pretrained=True).to(memory_format=torch.channels_last)
    mean, std = input_normalization(MODEL, tuple(manifest.mean), tuple(manifest.std))
    run = RunDir(data.parent / "engine-run")
    engine = create_engine(
        ENGINE,
        model,
        SIZE,
        run,
        calibration=lambda: calibration_images(data, manifest, mean, std, calibration, 64),
        calibration_rows=calibration,
    )
    config = {"name": MODEL, "num_classes": 2, "size": SIZE}
    splits = {"train": False, "val": False}
    rows = manifest.split_rows("train") + manifest.split_rows("val")
    modules = NEEDED + runtime_modules(ENGINE)
    out: dict[str, float] = {}
    reference = None
    for workers in (1, 2):
        with (
            standalone_cluster(workers=workers, cores_per_worker=1, memory="2g", pin=True) as c,
            spark_session(c.master_url, "bench-cluster", c.client_conf(), modules) as spark,
        ):
            # The first job includes each executor's engine build (once per process, a fixed cost);
            # the second runs on warm executors: the rate a long job settles at.
            for job in ("first job", "warm"):
                feats, report = spark_features(
                    spark,
                    c.master_url,
                    str(data),
                    manifest,
                    engine,
                    model,
                    config,
                    mean,
                    std,
                    splits,
                    batch_size=64,
                )
                out[f"{workers} worker {job}"] = report.rows / report.seconds
                reference = reference if reference is not None else feats["train"][0]
                assert np.allclose(feats["train"][0], reference, atol=1e-3), "workers disagree"
    t0 = time.perf_counter()
    for split in splits:
        extract_features(model, data, manifest, split, mean, std, 64, engine=engine, progress=False)
    out["in-process (2 threads)"] = rows / (time.perf_counter() - t0)
    with spark_session("local[2]", "bench-local", {}, modules) as spark:
        _, report = spark_features(
            spark, "local[2]", str(data), manifest, engine, model, config, mean, std, splits, batch_size=64
        )
        out["Spark local[2]"] = report.rows / report.seconds
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--calibration-images", type=int, default=64)
    args = parser.parse_args(argv)
    if not REAL_DATA.is_dir():
        print(f"real data not found at {REAL_DATA}; skipping", file=sys.stderr)
        return 0
    with heavy_lock(), tempfile.TemporaryDirectory(prefix="catsdogs-bench-cluster-") as tmp:
        data = Path(tmp) / "shards"
        write_shards(data, args.photos)
        passes = feature_passes(data, args.calibration_images)
    one, two = passes["1 worker warm"], passes["2 worker warm"]
    one_cold, two_cold = passes["1 worker first job"], passes["2 worker first job"]
    lines = [
        "## Cluster: the default model's feature pass on Spark",
        "",
        f"`flock /tmp/catsdogs-heavy.lock .venv/bin/python -m benchmarks.cluster --photos {args.photos}` "
        f"({machine()}); {args.photos:,} real photos at {SIZE} px, {MODEL} on {ENGINE}, one Spark task per "
        f"{SHARD_ROWS} images.",
        "",
        "| feature pass | images/s | x 1 worker |",
        "|---|---|---|",
        f"| standalone cluster, 1 worker x 1 core, first job (engine build included) | {one_cold:.1f} "
        "| 1.00 |",
        f"| standalone cluster, 2 workers x 1 core, first job (engine build included) | {two_cold:.1f} | "
        f"{two_cold / one_cold:.2f} |",
        f"| standalone cluster, 1 worker x 1 core, warm executors | {one:.1f} | 1.00 |",
        f"| standalone cluster, 2 workers x 1 core, warm executors | {two:.1f} | **{two / one:.2f}** |",
        f"| in this process, 2 threads (local mode today) | {passes['in-process (2 threads)']:.1f} | "
        f"{passes['in-process (2 threads)'] / one:.2f} (of warm) |",
        f"| Spark `local[2]`, the cluster code on this machine | {passes['Spark local[2]']:.1f} | "
        f"{passes['Spark local[2]'] / one:.2f} (of warm) |",
    ]
    print("\n".join(lines))
    write_fragment("cluster", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
