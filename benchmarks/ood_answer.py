"""Share of the out-of-distribution set a trained run answers "unknown", through the product's own path.

Decodes every OOD image (tests/ood_set.py: 80 generated non-pet images and scikit-image's non-pet
sample photos) with the run's own decode and answers them with ``Predictor.answer`` under the run's
recorded settings: the quick check of an as-trained run (benchmarks/ood_rejection.py also refits and
compares detectors, which takes ~20 min for the default preset on 2 busy cores).

    .venv/bin/python -m benchmarks.ood_answer --run runs/effnet_lite12_frozen
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks._common import DEFAULT_RUN
from catsdogs.infer.predictor import Predictor
from tests.ood_set import generated_images, png_bytes, sample_photos

GENERATED_PER_KIND = 10
GENERATED_SIZE = 160
GENERATED_SEED = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default=str(DEFAULT_RUN), help="trained run folder (default: make run's)")
    args = parser.parse_args()
    if not Path(args.run).is_dir():
        print(f"skipped: no trained run at {args.run} (make run, or give --run)")
        return
    predictor = Predictor.from_run(args.run, "cpu", backend="torch")
    sets = (("generated", generated_images(GENERATED_PER_KIND, GENERATED_SIZE, seed=GENERATED_SEED)),
            ("photos", sample_photos()))
    for name, items in sets:
        if not items:
            print(f"{name}: none (install the dev extra for scikit-image's sample photos)")
            continue
        answers = predictor.answer(np.stack([predictor.decode(png_bytes(a)) for _, a in items]))
        accepted = [n for (n, _), known in zip(items, answers.known, strict=True) if known]
        print(f"{name}: {len(items) - len(accepted)}/{len(items)} rejected; accepted: {accepted}")


if __name__ == "__main__":
    main()
