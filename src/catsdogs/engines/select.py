"""Pick the engine a run is served with: an int8 engine only behind a passed accuracy guard.

Used by evaluate, predict and serve (through the predictor). A refused or unavailable int8 engine falls
back to the same runtime in fp32 with one line on stderr saying why; the choice is never silent.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from catsdogs.engines import guard
from catsdogs.engines.base import Engine
from catsdogs.engines.batches import SplitImages
from catsdogs.engines.factory import Calibration, EngineUnavailable, create_engine
from catsdogs.engines.names import MAX_DROP_PT, is_quantized, runtime_of
from catsdogs.progress import progress_bar
from catsdogs.rundir import RunDir


def engine_features(engine: Engine, batches: Iterable[tuple[np.ndarray, np.ndarray]]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Run ``engine`` over ``(x, y)`` batches; return all features and labels (progress on stderr)."""
    labels: list[np.ndarray] = []
    bar = progress_bar(desc=f"int8 check: validation ({engine.name})", unit="img", file=sys.stderr)

    def images() -> Iterator[np.ndarray]:
        for x, y in batches:
            labels.append(y)
            yield x

    feats: list[np.ndarray] = []
    for f in engine.stream(images()):
        feats.append(f)
        bar.update(len(f))
    bar.close()
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(feats), np.concatenate(labels)


def reference_features(reference: Engine, images: SplitImages) -> Callable[[np.ndarray], np.ndarray]:
    """``index -> fp32 features`` of those validation rows, with a progress bar per call."""
    def run(index: np.ndarray) -> np.ndarray:
        bar = progress_bar(total=len(index), desc=f"int8 check: chosen validation images ({reference.name})",
                           unit="img", file=sys.stderr)

        def counted() -> Iterator[np.ndarray]:
            for x in images.take(index):
                yield x
                bar.update(len(x))

        try:
            return reference.features_of(counted())
        finally:
            bar.close()
    return run


def guarded_engine(name: str, model: nn.Module, size: int, run: RunDir, checkpoint_sha256: str, *,
                   threads: int | None = None, device: torch.device | str = "cpu",
                   calibration: Calibration | None = None, calibration_rows: int = 0,
                   validation: SplitImages | None = None, max_drop_pt: float = MAX_DROP_PT,
                   accepts: guard.Accepts | None = None) -> Engine:
    """Return engine ``name``; for int8, only if its recorded (or now measured) guard passes.

    ``checkpoint_sha256`` keys the guard's record and spares tracing a graph already made from it.
    ``accepts`` is the run's detector (features -> answered mask): the guard then also bounds how many
    more validation images int8 features would answer "unknown".
    """
    if not is_quantized(name):
        return create_engine(name, model, size, run, threads=threads, device=device, source=checkpoint_sha256)
    fallback = runtime_of(name)
    try:
        engine = create_engine(name, model, size, run, threads=threads, calibration=calibration,
                               calibration_rows=calibration_rows, source=checkpoint_sha256)
    except EngineUnavailable as exc:
        print(f"catsdogs: --backend {name} unavailable: {exc}; using {fallback} (fp32)", file=sys.stderr)
        return create_engine(fallback, model, size, run, threads=threads, source=checkpoint_sha256)
    record = guard.load_record(run.int8_guard, name, checkpoint_sha256, engine.graph_sha256)
    if record is None or record.max_drop_pt != max_drop_pt:
        reference = create_engine(fallback, model, size, run, threads=threads, fp32_sha256=engine.fp32_sha256)
        if validation is None:
            print(f"catsdogs: --backend {name}: no accuracy check is recorded for this checkpoint and its "
                  f"validation shards are not here to make one; using {fallback} (fp32)", file=sys.stderr)
            return reference
        print(f"catsdogs: checking {name} against fp32 on the validation split ...", file=sys.stderr)
        int8_feats, labels = engine_features(engine, validation.batches())
        classify: Callable[[torch.Tensor], torch.Tensor] = model.classify  # type: ignore[assignment]
        record = guard.screened_check(name, lambda f: classify(f.to(next(model.parameters()).device)),
                                      int8_feats, labels, reference_features(reference, validation),
                                      max_drop_pt, accepts=accepts)
        record.checkpoint_sha256, record.graph_sha256 = checkpoint_sha256, engine.graph_sha256
        guard.save_record(run.int8_guard, record)
        if not record.passed:
            print(record.refusal(), file=sys.stderr)
            return reference
    elif not record.passed:
        print(record.refusal(), file=sys.stderr)
        return create_engine(fallback, model, size, run, threads=threads, fp32_sha256=engine.fp32_sha256)
    engine.guard = record.to_dict()
    return engine
