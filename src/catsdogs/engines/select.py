"""Pick the engine a run is served with: an int8 engine only behind a passed accuracy guard.

Used by evaluate, predict and serve (through the predictor). A refused or unavailable int8 engine falls
back to the same runtime in fp32 with one line on stderr saying why; the choice is never silent.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from catsdogs.engines import guard
from catsdogs.engines.base import Engine
from catsdogs.engines.factory import Calibration, EngineUnavailable, create_engine, int8_digest
from catsdogs.engines.names import MAX_DROP_PT, is_quantized, runtime_of
from catsdogs.rundir import RunDir

Validation = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
"""Returns the validation split as normalised float32 NCHW batches with their labels."""


def split_features(engine: Engine, batches: Iterable[tuple[np.ndarray, np.ndarray]]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Run ``engine`` over ``(x, y)`` batches; return all features and labels (progress on stderr)."""
    feats: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    bar = tqdm(desc=f"int8 check: validation ({engine.name})", unit="img", file=sys.stderr)
    for x, y in batches:
        feats.append(engine.run(x))
        labels.append(y)
        bar.update(len(y))
    bar.close()
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(feats), np.concatenate(labels)


def guarded_engine(name: str, model: nn.Module, size: int, run: RunDir, checkpoint_sha256: str, *,
                   threads: int = 0, device: torch.device | str = "cpu",
                   calibration: Calibration | None = None, calibration_rows: int = 0,
                   validation: Validation | None = None, max_drop_pt: float = MAX_DROP_PT,
                   accepts: guard.Accepts | None = None) -> Engine:
    """Return engine ``name``; for int8, only if its recorded (or now measured) guard passes.

    ``accepts`` is the run's detector (features -> answered mask): the guard then also bounds how many
    more validation images int8 features would answer "unknown".
    """
    if not is_quantized(name):
        return create_engine(name, model, size, run, threads=threads, device=device)
    fallback = runtime_of(name)
    try:
        engine = create_engine(name, model, size, run, threads=threads, calibration=calibration,
                               calibration_rows=calibration_rows)
    except EngineUnavailable as exc:
        print(f"catsdogs: --backend {name} unavailable: {exc}; using {fallback} (fp32)", file=sys.stderr)
        return create_engine(fallback, model, size, run, threads=threads)
    record = guard.load_record(run.int8_guard, name, checkpoint_sha256, int8_digest(run))
    if record is None or record.max_drop_pt != max_drop_pt:
        reference = create_engine(fallback, model, size, run, threads=threads)
        if validation is None:
            print(f"catsdogs: --backend {name}: no accuracy check is recorded for this checkpoint and its "
                  f"validation shards are not here to make one; using {fallback} (fp32)", file=sys.stderr)
            return reference
        print(f"catsdogs: checking {name} against fp32 on the validation split ...", file=sys.stderr)
        ref_feats, labels = split_features(reference, validation())
        int8_feats, _ = split_features(engine, validation())
        classify: Callable[[torch.Tensor], torch.Tensor] = model.classify  # type: ignore[assignment]
        record = guard.check(name, lambda f: classify(f.to(next(model.parameters()).device)),
                             ref_feats, int8_feats, labels, max_drop_pt, accepts)
        record.checkpoint_sha256, record.graph_sha256 = checkpoint_sha256, int8_digest(run)
        guard.save_record(run.int8_guard, record)
        if not record.passed:
            print(record.refusal(), file=sys.stderr)
            return reference
    elif not record.passed:
        print(record.refusal(), file=sys.stderr)
        return create_engine(fallback, model, size, run, threads=threads)
    engine.guard = record.to_dict()
    return engine
