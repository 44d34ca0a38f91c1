"""Out-of-distribution rejection, calibration and flip TTA of a trained run, measured on real data.

Answers three questions with the run's own model and feature space:

1. Which detector? Each of ``catsdogs.models.ood.OOD_METHODS`` is fitted on the same TRAIN rows
   (``--train-rows``, the first shards), thresholded on VAL at ``--accept-rate``, then measured on
   test (accepted share, accuracy among accepted) and on the OOD set of ``tests/ood_set.py``
   (generated non-pet images + scikit-image's sample photos; never used to fit anything).
2. What does the run as trained answer? Its stored detector and temperature through
   ``Predictor.answer`` (the code path of predict and serve), on test and on the OOD set.
3. Does flip TTA earn anything? Accuracy and log loss on VAL with and without it.

Usage: ``.venv/bin/python -m benchmarks.ood_rejection [--run RUN]`` (shards: the run's own --data
unless ``--data``; without --run it trains the quick preset on the real data into
``/tmp/catsdogs-bench/ood_lite0`` first, ~3 minutes). Prints a markdown report and writes it to
docs/benchmarks/ood_rejection.md (``--fragment ""`` to skip). The real-photo part of the OOD set needs
scikit-image (dev extra).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import log_loss, roc_auc_score

from benchmarks._common import PROJECT_ROOT, REAL_DATA, heavy_lock, machine, write_fragment
from catsdogs.evaluate.metrics import expected_calibration_error
from catsdogs.infer.predictor import Predictor
from catsdogs.models.heads import probabilities
from catsdogs.models.ood import OOD_METHODS, calibrate_threshold, fit_detector, flat_images
from catsdogs.models.transforms import hflip, normalize
from catsdogs.rundir import RunDir
from catsdogs.shards.manifest import load_manifest
from catsdogs.shards.reader import iter_batches
from tests.ood_set import generated_images, png_bytes, sample_photos

DEFAULT_RUN = Path("/tmp/catsdogs-bench/ood_lite0")
QUICK_PRESET = PROJECT_ROOT / "configs" / "effnet_lite0_frozen.toml"


@torch.inference_mode()
def _pass(pred: Predictor, images: np.ndarray, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    x = normalize(torch.as_tensor(images), pred.mean, pred.std)
    if flip:
        x = hflip(x)
    z, f = pred._forward(x)  # noqa: SLF001 - the predictor's own forward: same features as serving
    assert f is not None
    return f.float().numpy(), z.float().numpy()


def split_outputs(pred: Predictor, data: Path, split: str, batch: int, max_rows: int | None = None,
                  flip: bool = False) -> dict[str, np.ndarray]:
    """Features, logits (and mirrored logits), labels and images' flatness of a split."""
    manifest = load_manifest(data)
    out: dict[str, list[np.ndarray]] = {"f": [], "z": [], "zf": [], "y": [], "flat": []}
    seen = 0
    t0 = time.perf_counter()
    for _pos, _start, rows, y in iter_batches(data, manifest, split, batch):
        if max_rows is not None and seen >= max_rows:
            break
        f, z = _pass(pred, rows)
        out["f"].append(f)
        out["z"].append(z)
        if flip:
            out["zf"].append(_pass(pred, rows, flip=True)[1])
        out["y"].append(np.asarray(y))
        out["flat"].append(flat_images(rows))
        seen += len(y)
    print(f"{split}: {seen} rows in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return {k: np.concatenate(v) for k, v in out.items() if v}


def ood_outputs(pred: Predictor, images: list[tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Decode each OOD image exactly as predict/serve do (PNG bytes -> Predictor.decode), then features."""
    arrays = np.stack([pred.decode(png_bytes(a)) for _, a in images])
    f, z = _pass(pred, arrays)
    return {"f": f, "z": z, "flat": flat_images(arrays), "arrays": arrays}


def trained_answers(pred: Predictor, data: Path, batch: int, ood: dict[str, dict[str, np.ndarray]],
                    names: dict[str, list[tuple[str, np.ndarray]]]) -> list[str]:
    """The run as trained: its stored detector, flat-image rule and temperature via Predictor.answer."""
    lines = ["", "### The run as trained (Predictor.answer: stored detector, flat-image rule, temperature)",
             ""]
    manifest = load_manifest(data)
    known, probs_t, probs_raw, labels = [], [], [], []
    for _p, _s, rows, y in iter_batches(data, manifest, "test", batch):
        a = pred.answer(rows, with_raw=True)
        known.append(a.known)
        probs_t.append(a.probs)
        assert a.raw is not None
        probs_raw.append(a.raw)
        labels.append(np.asarray(y))
    kn, pt, pr, yt = map(np.concatenate, (known, probs_t, probs_raw, labels))
    lines.append(f"- test: {kn.mean():.2%} accepted ({kn.sum()} of {len(kn)}), accuracy among accepted "
                 f"{(pt.argmax(1)[kn] == yt[kn]).mean():.2%} (all: {(pt.argmax(1) == yt).mean():.2%})")
    lines.append(f"- test ECE: {expected_calibration_error(yt, pr):.4f} before, "
                 f"{expected_calibration_error(yt, pt):.4f} after temperature {pred.temperature:.3f}")
    for k in ood:
        a = pred.answer(ood[k]["arrays"])
        missed = [n for (n, _), ok in zip(names[k], a.known, strict=True) if ok]
        lines.append(f"- OOD {k}: {(~a.known).mean():.1%} rejected ({(~a.known).sum()} of {len(a.known)}); "
                     f"accepted: {', '.join(missed) or 'none'}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="",
                    help=f"trained run (default: train the quick preset into {DEFAULT_RUN})")
    ap.add_argument("--data", default="")
    ap.add_argument("--train-rows", type=int, default=6000)
    ap.add_argument("--accept-rate", type=float, default=0.99)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--fragment", default="ood_rejection",
                    help="docs/benchmarks/NAME.md to write ('' = none)")
    args = ap.parse_args()
    with heavy_lock():
        md = measure(args)
    print(md)
    if args.fragment:
        command = "python -m benchmarks.ood_rejection" + (f" --run {args.run}" if args.run else "")
        header = "## Out-of-distribution rejection\n\n"
        body = f"Command: `{command}`  \nMachine: {machine()}\n\n{md}"
        path = write_fragment(args.fragment, header + body)
        print(f"wrote {path}")
    return 0


def measure(args: argparse.Namespace) -> str:
    """Compute every figure; return the markdown."""
    if not args.run:
        args.run = str(DEFAULT_RUN)
        if not (DEFAULT_RUN / "best.pt").is_file():
            subprocess.run([sys.executable, "-m", "catsdogs.cli", "run", "--config", str(QUICK_PRESET),
                            "--data", str(REAL_DATA), "--output", str(DEFAULT_RUN)], check=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pred = Predictor.from_run(args.run, backend="torch")
    data = Path(args.data or RunDir.from_arg(args.run).read_config()["data"])
    nc = len(pred.classes)
    train = split_outputs(pred, data, "train", args.batch_size, args.train_rows)
    val = split_outputs(pred, data, "val", args.batch_size, flip=True)
    test = split_outputs(pred, data, "test", args.batch_size)
    gen, photos = generated_images(per_kind=10, size=256, seed=13), sample_photos()
    ood = {"generated": ood_outputs(pred, gen), "photos": ood_outputs(pred, photos)} if photos else {
        "generated": ood_outputs(pred, gen)}
    lines = [f"run `{args.run}` ({pred.describe()['name']}), shards `{data}`; OOD set: {len(gen)} generated "
             f"images, {len(photos)} scikit-image photos", "",
             f"### Detectors (fit on {len(train['y'])} train rows, threshold at {args.accept_rate:.0%} "
             "of val)",
             "", "| method | val accepted | test accepted | test acc. among accepted | OOD rejected: "
             "generated | photos | AUROC val vs OOD |", "|---|---|---|---|---|---|---|"]
    test_pred = probabilities(torch.from_numpy(test["z"])).numpy().argmax(1)
    for method in OOD_METHODS:
        det = fit_detector(method, train["f"], train["y"], nc)

        def score(o: dict[str, np.ndarray], d: Any = det) -> np.ndarray:
            return d.score(torch.from_numpy(o["f"]), torch.from_numpy(o["z"])).numpy()

        calibrate_threshold(det, score(val), args.accept_rate)
        ok_val, ok_test = det.known(score(val)), det.known(score(test))
        rej = {k: float((~det.known(score(o))).mean()) for k, o in ood.items()}
        all_ood = np.concatenate([score(o) for o in ood.values()])
        auroc = roc_auc_score(np.r_[np.zeros(len(val["y"])), np.ones(len(all_ood))],
                              np.r_[score(val), all_ood])
        acc = float((test_pred[ok_test] == test["y"][ok_test]).mean())
        lines.append(f"| {method} | {ok_val.mean():.2%} | {ok_test.mean():.2%} | {acc:.2%} | "
                     f"{rej['generated']:.1%} | {rej.get('photos', float('nan')):.1%} | {auroc:.4f} |")
    # The run as trained: its stored detector and temperature, through Predictor.answer.
    if pred.detector is not None:
        lines += trained_answers(pred, data, args.batch_size, ood, {"generated": gen, "photos": photos})
    else:
        lines += ["", "(the run has no stored detector: trained before it existed)"]
    # Flip TTA on val.
    pv = probabilities(torch.from_numpy(val["z"])).numpy()
    pf = (pv + probabilities(torch.from_numpy(val["zf"])).numpy()) / 2
    lines += ["", "### Flip TTA on val", "", "| | accuracy | log loss |", "|---|---|---|"]
    for name, p in (("no TTA", pv), ("flip TTA", pf)):
        lines.append(f"| {name} | {(p.argmax(1) == val['y']).mean():.2%} | "
                     f"{log_loss(val['y'], p, labels=list(range(nc))):.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
