"""``catsdogs audit``: label errors, duplicates, train/test leakage and non-pets in a shards folder.

Features are computed once per image (:mod:`~catsdogs.audit.features`); every check works on them:
:mod:`~catsdogs.audit.labels` (K-fold heads + confident learning), :mod:`~catsdogs.audit.duplicates`
(pixel hashes + chunked search on tiny-image descriptors), :mod:`~catsdogs.audit.outliers` (the
open-world rejection score of :mod:`catsdogs.models.ood`) and :mod:`~catsdogs.audit.unusual` (original
sizes, blank pixels). Findings go to ``issues.csv`` and ``audit.html`` (:mod:`~catsdogs.audit.report`),
with the resolved config.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from catsdogs import schema
from catsdogs.audit import duplicates, labels, outliers, unusual
from catsdogs.audit.features import AuditData, compute, images
from catsdogs.audit.issues import (
    AUDIT_HTML_NAME,
    EXACT_DUPLICATE,
    EXTREME_ASPECT,
    ISSUES_CSV_NAME,
    LABEL_ERROR,
    LEAKAGE,
    NEAR_BLANK,
    NEAR_DUPLICATE,
    OUTLIER,
    UNDERSIZED,
    Issue,
    write_csv,
)
from catsdogs.audit.report import write_report
from catsdogs.config import AuditConfig, check_required, need, save_config
from catsdogs.errors import ConfigError, InputError
from catsdogs.runtime import setup
from catsdogs.shards.manifest import load_manifest

log = logging.getLogger(__name__)


@dataclass
class AuditResult:
    """What the audit found, for the summary and for callers (tests, benchmarks)."""

    data: AuditData
    issues: list[Issue]
    probs: np.ndarray
    """``(n, C)`` out-of-sample probabilities of the K-fold heads."""
    outliers: outliers.OutlierScores
    pairs: duplicates.Pairs
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _issue(data: AuditData, i: int, kind: str, score: float, reason: str, suggested: int = -1,
           other: int = -1) -> Issue:
    return Issue(path=str(data.path[i]), split=str(data.split[i]), label=data.classes[int(data.label[i])],
                 issue=kind, score=float(score),
                 suggested_label=data.classes[suggested] if suggested >= 0 else "",
                 other_path=str(data.path[other]) if other >= 0 else "", index=int(i), other_index=int(other),
                 reason=reason)


def _label_issues(data: AuditData, cfg: AuditConfig, probs: np.ndarray) -> list[Issue]:
    idx, score, suggested = labels.label_issues(data.label, probs)
    return [_issue(data, int(i), LABEL_ERROR, s, f"out-of-sample p({data.classes[int(data.label[i])]}) = "
                   f"{1 - s:.3f}; {data.classes[int(g)]} is more likely", suggested=int(g))
            for i, s, g in zip(idx, score, suggested, strict=True)]


def _pair_issues(data: AuditData, pairs: duplicates.Pairs) -> list[Issue]:
    order = {s: k for k, s in enumerate(schema.SPLITS)}
    out = []
    for a, b, sim, exact in zip(pairs.a, pairs.b, pairs.similarity, pairs.exact, strict=True):
        sa, sb = str(data.split[a]), str(data.split[b])
        # The row names the copy to drop: the later split's (keep train intact), else the later row.
        keep, drop = (int(a), int(b)) if order.get(sa, 0) <= order.get(sb, 0) else (int(b), int(a))
        what = "identical pixels" if exact else f"cosine similarity {sim:.3f}"
        conflict = (f"; labels differ ({data.classes[int(data.label[drop])]} vs "
                    f"{data.classes[int(data.label[keep])]})" if data.label[a] != data.label[b] else "")
        if sa != sb:
            kind = LEAKAGE
            reason = (f"{what} to a {data.split[keep]} image: the {data.split[drop]} figure is "
                      f"inflated{conflict}")
        else:
            kind = EXACT_DUPLICATE if exact else NEAR_DUPLICATE
            reason = f"{what} to another {sa} image{conflict}"
        out.append(_issue(data, drop, kind, sim, reason, other=keep))
    return out


def _unusual_issues(data: AuditData, cfg: AuditConfig, root: Path, progress: bool
                    ) -> tuple[list[Issue], list[str]]:
    out: list[Issue] = []
    notes: list[str] = []
    idx, score = unusual.near_blank(data.pixel_std, cfg.blank_std)
    out += [_issue(data, int(i), NEAR_BLANK, s, f"pixel std {data.pixel_std[i]:.1f} < --blank-std "
                   f"{cfg.blank_std:g}") for i, s in zip(idx, score, strict=True)]
    folder = unusual.input_folder(root)
    if folder is None:
        notes.append("Original sizes not checked (undersized, extreme aspect): the input folder named in "
                     f"the shards' {schema.CONFIG_NAME} is not readable here, and the shards hold resized "
                     "pixels only.")
        return out, notes
    sizes = unusual.original_sizes(folder, data.path, progress)
    unread = int((sizes.min(1) == 0).sum())
    if unread:
        notes.append(f"{unread:,} original files under {folder} could not be read for their size.")
    idx, score = unusual.undersized(sizes, cfg.min_side)
    out += [_issue(data, int(i), UNDERSIZED, s, f"original {sizes[i, 0]}x{sizes[i, 1]} px, shorter than "
                   f"--min-side {cfg.min_side}") for i, s in zip(idx, score, strict=True)]
    idx, score = unusual.elongated(sizes, cfg.max_aspect)
    out += [_issue(data, int(i), EXTREME_ASPECT, s, f"original {sizes[i, 0]}x{sizes[i, 1]} px, aspect "
                   f"{s:.1f} > --max-aspect {cfg.max_aspect:g}") for i, s in zip(idx, score, strict=True)]
    return out, notes


def audit(cfg: AuditConfig, progress: bool = True) -> AuditResult:
    """Run every check on ``cfg.data``; return the findings (nothing is written)."""
    check_required(cfg)
    t0 = time.perf_counter()
    root = Path(need(cfg, "data"))
    manifest = load_manifest(root)
    if not manifest.shards or not sum(s.rows for s in manifest.shards):
        raise InputError(f"shards folder {str(root)!r} holds no images (fix --data)")
    setup(cfg.threads, "cpu", cfg.seed)
    data = compute(root, manifest, cfg.run, cfg.batch_size, progress, cfg.size, cfg.master, cfg.spark_conf,
                   cfg.threads)
    num_classes = len(data.classes)
    counts = np.bincount(data.label, minlength=num_classes)
    if (counts < 2).any():
        raise InputError(f"shards {str(root)!r} need at least 2 images of every class for the K-fold heads, "
                         f"found {dict(zip(data.classes, counts.tolist(), strict=True))} (fix --data)")
    probs = labels.out_of_fold_probs(data.features, data.label, num_classes, cfg.folds, cfg.head_c, cfg.seed,
                                     progress)
    issues = _label_issues(data, cfg, probs)
    pairs = duplicates.find_duplicates(data.tiny, data.pixel_hash, cfg.dup_threshold, cfg.dup_neighbours,
                                       cfg.chunk_rows, progress)
    issues += _pair_issues(data, pairs)
    ood = outliers.outlier_scores(data.features, data.label, data.split, num_classes, cfg.accept_rate,
                                  cfg.seed, cfg.chunk_rows, data.detector, progress)
    issues += [_issue(data, int(i), OUTLIER, ood.score[i], f"unlike the train images: detector score "
                      f"{ood.score[i]:.3f} > its threshold {ood.threshold:.3f}") for i in ood.flagged]
    more, notes = _unusual_issues(data, cfg, root, progress)
    issues += more
    notes = [*data.notes, f"Outliers: {ood.source}.", *notes]
    return AuditResult(data=data, issues=issues, probs=probs, outliers=ood, pairs=pairs,
                       seconds=time.perf_counter() - t0, notes=notes)


def summary(result: AuditResult, out: str) -> str:
    """Return the one-paragraph summary printed at the end."""
    d = result.data
    per_split = Counter(d.split.tolist())
    c = Counter(i.issue for i in result.issues)
    leak = Counter(f"{i.split}-{d.split[i.other_index]}" for i in result.issues if i.issue == LEAKAGE)
    leak_txt = f" ({', '.join(f'{k} {v}' for k, v in sorted(leak.items()))})" if leak else ""
    flagged = len({i.path for i in result.issues})
    splits = ", ".join(f"{s} {per_split[s]:,}" for s in schema.SPLITS if per_split[s])
    return (f"Audited {len(d):,} images ({splits}) with {d.backbone} features in {result.seconds:.1f} s: "
            f"{c[LABEL_ERROR]:,} suspected label errors, {c[LEAKAGE]:,} leakage pairs across "
            f"splits{leak_txt}, "
            f"{c[EXACT_DUPLICATE]:,} exact and {c[NEAR_DUPLICATE]:,} near-duplicate pairs within a split, "
            f"{c[OUTLIER]:,} outliers, {c[NEAR_BLANK]:,} near-blank, {c[UNDERSIZED]:,} undersized and "
            f"{c[EXTREME_ASPECT]:,} extreme-aspect originals; {flagged:,} distinct files flagged. "
            f"See {out}/{ISSUES_CSV_NAME} (pass it to 'catsdogs preprocess --exclude' after review) and "
            f"{out}/{AUDIT_HTML_NAME}.")


def main(cfg: AuditConfig) -> int:
    """CLI entry point of ``catsdogs audit``; returns the exit code."""
    check_required(cfg)
    out = Path(need(cfg, "output"))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {cfg.output!r} is a file; give a folder")
    result = audit(cfg)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(need(cfg, "data"))
    manifest = load_manifest(root)
    text = summary(result, str(out))
    save_config(cfg, out / schema.CONFIG_NAME)
    write_report(str(out / AUDIT_HTML_NAME), result.issues,
                 lambda idx: images(root, manifest, result.data, idx), cfg.gallery, text, result.notes)
    write_csv(str(out / ISSUES_CSV_NAME), result.issues)  # last: its presence means the audit finished
    print(text)
    for note in result.notes:
        print(note)
    return 0
