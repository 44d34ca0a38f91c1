"""Nearest neighbours by cosine similarity in bounded memory: chunked matrix products.

``topk`` multiplies ``chunk_rows`` query rows by the whole base at a time and keeps only each row's
``k`` best, so memory is ``chunk_rows x len(base)`` floats plus the ``(n, k)`` result, never
``n x n``: 1,024 x 18,000 float32 is 75 MB. Time is still n^2 d multiply-adds, done by BLAS.
"""

from __future__ import annotations

import numpy as np

from catsdogs.progress import progress_bar


def unit_rows(x: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """Return float32 rows minus ``center`` (when given), scaled to unit L2 norm (zero rows stay zero)."""
    f = np.asarray(x, dtype=np.float32)
    if center is not None:
        f = f - center.astype(np.float32)
    norm = np.linalg.norm(f, axis=1, keepdims=True)
    return f / np.maximum(norm, np.finfo(np.float32).tiny)


def topk(query: np.ndarray, base: np.ndarray, k: int, chunk_rows: int, same: np.ndarray | None = None,
         desc: str = "neighbours", progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Return the ``k`` most similar base rows of every query row: indices and similarities ``(n, k)``.

    Rows must be unit-normalised (:func:`unit_rows`). ``same[i]`` is the base row that IS query row
    ``i`` (or -1); it is never its own neighbour. Each row's neighbours come best first.
    """
    n, k = len(query), min(k, len(base))
    idx = np.zeros((n, k), dtype=np.int64)
    sim = np.zeros((n, k), dtype=np.float32)
    if k == 0:
        return idx, sim
    bar = progress_bar(total=n, desc=desc, unit="img", disable=not progress)
    for start in range(0, n, chunk_rows):
        s = query[start:start + chunk_rows] @ base.T  # (chunk, len(base)): the only large array
        rows = np.arange(len(s))
        if same is not None:
            own = same[start:start + len(s)]
            s[rows[own >= 0], own[own >= 0]] = -np.inf
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        top_sim = s[rows[:, None], top]
        order = np.argsort(-top_sim, axis=1)
        idx[start:start + len(s)] = np.take_along_axis(top, order, 1)
        sim[start:start + len(s)] = np.take_along_axis(top_sim, order, 1)
        bar.update(len(s))
    bar.close()
    return idx, sim
