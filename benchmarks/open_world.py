"""Open-world answers: which "neither" detector, and where its operating point sits.

Every candidate detector is fitted on the TRAIN split's features of one trained run (the features its
own engine computes, as training does), thresholded on VALIDATION at an accept rate, and then only
measured on the held-out and check sets:

* PetImages test (answered share, accuracy among answered);
* ``../shared/data/pets-other`` (Oxford-IIIT cats and dogs from other cameras: answered share, right);
* ``../shared/data/not-pets/raccoon`` (share "unknown");
* scikit-image's non-pet photos and the generated images of ``tests/ood_set.py`` (share "unknown");
* its scoring cost in ms per image on top of the shared feature pass.

Images go through the product's own decode (``Predictor.decode``) and flat-image rule. Features are
cached per checkpoint and engine under ``--cache`` (a second run re-scores in seconds).

Usage: ``.venv/bin/python -m benchmarks.open_world [--run RUN] [--fragment NAME]``; without --run,
make run's default run folder. Prints a markdown report and writes docs/benchmarks/NAME.md
(default ``open_world_<model>``; ``--fragment ""`` skips writing).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._common import DEFAULT_RUN, REAL_DATA, heavy_lock, machine, write_fragment
from catsdogs.checkpoint import CKPT_ENGINE, CKPT_MODEL_CONFIG, CKPT_TRAIN_CONFIG
from catsdogs.config import TrainConfig
from catsdogs.engines.names import DEFAULT_ENGINE
from catsdogs.errors import ImageDecodeError
from catsdogs.infer.predictor import Predictor
from catsdogs.models.heads import probabilities
from catsdogs.models.imagenet import imagenet_heads, imagenet_probabilities
from catsdogs.models.ood import CONCEPTS, calibrate_threshold, fit_detector, flat_images, surprise
from catsdogs.models.registry import REGISTRY
from catsdogs.models.transforms import normalize
from catsdogs.shards.manifest import load_manifest
from catsdogs.train.features import extract_features
from tests.ood_set import generated_images, png_bytes, sample_photos

CHECK_ROOT = REAL_DATA.parent
PETS_OTHER = CHECK_ROOT / "pets-other"
RACCOON = CHECK_ROOT / "not-pets" / "raccoon"
EVERYDAY = CHECK_ROOT / "not-pets" / "everyday"
EVERYDAY_MAMMALS = frozenset({
    "antelope", "armadillo", "bear", "camel", "cattle", "elephant", "fox", "giant_panda", "hamster",
    "hippopotamus", "horse", "koala_bear", "lion", "monkey", "otter", "porcupine", "rabbit", "red_panda",
    "seal", "sheep", "skunk", "squirrel", "swine", "tiger", "whale", "zebra"})
"""The everyday set's mammal categories (file names ``<category>_<id>.jpg``): 129 photos."""
GENERATED = {"per_kind": 10, "size": 160, "seed": 0}
CORNER_SHARE = 0.45
"""Side of each corner crop of a validation photo, as a share of the photo's side: mostly background (a
far-OOD check built from validation alone, beside the held-out-class tests' near one)."""
"""The generated OOD images, as benchmarks/ood_answer.py makes them (80 images)."""
ACCEPT_RATES = (0.99, 0.995, 0.998)
"""Validation accept rates every candidate is reported at."""
VAL_CURVE = (0.95, 0.98, 0.99, 0.995, 0.998, 1.0)
"""Validation accept rates of the operating-point table."""
FRONTIER_DIR = Path(__file__).resolve().parents[1] / "docs" / "images"
"""Where the frontier PNG goes (``open_world_frontier_<model>.png``)."""


@dataclass
class Split:
    """Features (what the engine returns), labels (-1: none) and the flat-image mask of one image set."""

    f: np.ndarray
    y: np.ndarray
    flat: np.ndarray
    names: list[str]


def _cache_key(pred: Predictor, engine: str) -> str:
    return hashlib.sha256(f"{pred.path.resolve()}:{pred.path.stat().st_mtime_ns}:{engine}".encode()
                          ).hexdigest()[:16]


def _save(path: Path, s: Split) -> None:
    np.savez(path, f=s.f, y=s.y, flat=s.flat, names=np.array(s.names, dtype=object))


def _load(path: Path) -> Split:
    z = np.load(path, allow_pickle=True)  # our own cache file
    return Split(z["f"], z["y"], z["flat"], list(z["names"]))


@torch.inference_mode()
def folder_split(pred: Predictor, folder: Path, label_of: Callable[[Path], int]) -> Split:
    """Decode every image file under ``folder`` as predict does; return their features."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    arrays, labels, names = [], [], []
    for p in paths:
        try:
            arrays.append(pred.decode(p.read_bytes()))
        except ImageDecodeError:
            continue
        labels.append(label_of(p))
        names.append(str(p.relative_to(folder)))
    return _arrays_split(pred, np.stack(arrays), np.array(labels), names)


@torch.inference_mode()
def _arrays_split(pred: Predictor, arrays: np.ndarray, labels: np.ndarray, names: list[str]) -> Split:
    feats = []
    for i in range(0, len(arrays), 32):
        x = normalize(torch.from_numpy(np.ascontiguousarray(arrays[i:i + 32])), pred.mean, pred.std)
        feats.append(pred.feature_engine.features(x).float().numpy())
    return Split(np.concatenate(feats), labels, flat_images(arrays), names)


def items_split(pred: Predictor, items: list[tuple[str, np.ndarray]]) -> Split:
    """Encode each generated/sample image as PNG and decode it the product's way."""
    arrays = np.stack([pred.decode(png_bytes(a)) for _, a in items])
    return _arrays_split(pred, arrays, np.full(len(items), -1), [n for n, _ in items])


@torch.inference_mode()
def corner_split(pred: Predictor, data: Path, manifest: Any) -> Split:
    """The four corner crops (:data:`CORNER_SHARE` of the side) of every validation photo, resized to the
    model's side the product's way: what a photo holds beside its pet, from validation alone."""
    from PIL import Image

    from catsdogs.models.transforms import resize_image
    from catsdogs.shards.reader import iter_batches

    crops = []
    for _pos, _start, rows, _y in iter_batches(data, manifest, "val", 256):
        side = rows.shape[1]
        c = int(side * CORNER_SHARE)
        for img in rows:
            for top, left in ((0, 0), (0, side - c), (side - c, 0), (side - c, side - c)):
                crops.append(np.asarray(resize_image(Image.fromarray(img[top:top + c, left:left + c]),
                                                     pred.size, pred.resize)))
    return _arrays_split(pred, np.stack(crops), np.full(len(crops), -1), [])


def load_sets(pred: Predictor, data: Path, cache: Path) -> dict[str, Split]:
    """Features of train/val/test and of every check set (cached)."""
    manifest = load_manifest(data)
    out: dict[str, Split] = {}
    classes = {c.lower(): i for i, c in enumerate(pred.classes)}
    makers: dict[str, Callable[[], Split]] = {}
    for split in ("train", "val", "test"):
        def shard_split(split: str = split) -> Split:
            f, y = extract_features(pred.model, data, manifest, split, pred.mean, pred.std, 64,
                                    engine=pred.feature_engine)
            return Split(f, y, np.zeros(len(y), bool), [])
        makers[split] = shard_split
    if PETS_OTHER.is_dir():
        makers["pets-other"] = lambda: folder_split(pred, PETS_OTHER,
                                                    lambda p: classes.get(p.parent.name.lower(), -1))
    if RACCOON.is_dir():
        makers["raccoon"] = lambda: folder_split(pred, RACCOON, lambda p: -1)
    if EVERYDAY.is_dir():
        makers["everyday"] = lambda: folder_split(pred, EVERYDAY, lambda p: -1)
    if sample_photos():
        makers["skimage"] = lambda: items_split(pred, sample_photos())
    makers["generated"] = lambda: items_split(pred, generated_images(**GENERATED))
    makers["val-corners"] = lambda: corner_split(pred, data, manifest)
    cache.mkdir(parents=True, exist_ok=True)
    for name, make in makers.items():
        path = cache / f"{name}.npz"
        if path.is_file():
            out[name] = _load(path)
            continue
        t0 = time.perf_counter()
        out[name] = make()
        _save(path, out[name])
        print(f"{name}: {len(out[name].y)} images in {time.perf_counter() - t0:.0f} s", file=sys.stderr,
              flush=True)
    if "everyday" in out:
        e = out["everyday"]
        keep = np.array([n.rsplit("_", 1)[0] in EVERYDAY_MAMMALS for n in e.names])
        names = [n for n, k in zip(e.names, keep, strict=True) if k]
        out["mammals"] = Split(e.f[keep], e.y[keep], e.flat[keep], names)
    # Flat images in the shards are rare but real: the product answers them unknown too.
    return out


def held_out_class(make: Callable[..., Scorer], sets: dict[str, Split], ctx: dict,
                   accepts: tuple[float, ...], blind: bool = False) -> tuple[dict[float, float], float]:
    """The selection test, on TRAIN/VAL only: fit on one class, reject the other's validation photos.

    For each class c: the candidate is fitted on c's training photos alone and thresholded on c's
    validation photos at each accept rate; the figure is the share of the other classes' validation
    photos rejected, and the AUROC of c's against theirs. Returns both, averaged over the classes.

    ``blind``: the ImageNet heads cannot name the held-out classes (the node each owns, learnt from its
    own training photos, gets no probability), as ImageNet-1k cannot name a raccoon: a held-out class
    that only the look and the remaining concepts can tell apart.
    """
    from sklearn.metrics import roc_auc_score

    rejected: dict[float, list[float]] = {a: [] for a in accepts}
    aurocs = []
    tr, va = sets["train"], sets["val"]
    for c in range(ctx["num_classes"]):
        mine, vmine = tr.y == c, va.y == c
        sub = Split(tr.f[mine], np.zeros(int(mine.sum()), np.int64), tr.flat[mine], [])
        local = {**ctx, "num_classes": 1, "val_f": torch.from_numpy(va.f[vmine])}
        if blind:
            local["imagenet"] = _blinded(ctx["imagenet"], tr, c)
        scorer = make(sub, local)
        inside = scorer(torch.from_numpy(va.f[vmine])).numpy()
        outside = scorer(torch.from_numpy(va.f[~vmine])).numpy()
        for a in accepts:
            thr = (scorer.threshold_at(a) if hasattr(scorer, "threshold_at")
                   else calibrate_threshold(ctx["dummy"], inside, a).threshold)
            rejected[a].append(float((outside > thr).mean()))
        aurocs.append(float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))],
                                          np.r_[inside, outside])))
    return {a: float(np.mean(v)) for a, v in rejected.items()}, float(np.mean(aurocs))


def _blinded(heads: tuple[torch.Tensor, torch.Tensor], train: Split, keep: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ImageNet heads with every class under the nodes the other user classes own switched off."""
    from catsdogs.models.ood import owned_concepts

    w, b = heads
    top1 = torch.cat([imagenet_probabilities(torch.from_numpy(train.f[i:i + 4096]), w, b).argmax(dim=1)
                      for i in range(0, len(train.f), 4096)])
    labels = torch.as_tensor(train.y)
    _nodes, owned = owned_concepts(top1, labels, int(labels.max()) + 1)
    hidden = owned[[c for c in range(len(owned)) if c != keep]].any(dim=0)
    return w, b.masked_fill(hidden[None, :], -1e4)


def owned_summary(sets: dict[str, Split], ctx: dict) -> str:
    """Which WordNet node each class owns, the share of its training photos' top-1 concepts under it,
    and the share of validation photos a Cat/Dog answer would name a foreign concept for."""
    from catsdogs.models.ood import LOOKS_LIKE_STRONG
    from catsdogs.models.taxonomy import node_mask, node_name

    tr = sets["train"]
    det = fit_detector(CONCEPTS, tr.f, tr.y, ctx["num_classes"], 0, imagenet=ctx["imagenet"])
    top1 = det.imagenet_probabilities(torch.from_numpy(tr.f)).argmax(dim=1)
    owned = []
    for c, node in enumerate(det.owned_nodes):
        mine = top1[torch.from_numpy(tr.y == c)]
        share = float(node_mask(node)[mine].float().mean())
        owned.append(f"class {c} owns {node_name(node)!r} ({share:.1%} of its training photos' top-1s)")
    p = det.imagenet_probabilities(ctx["val_f"])
    foreign = p.masked_fill(det.owned_any(), 0.0).max(dim=1).values
    strong = float((foreign >= LOOKS_LIKE_STRONG).float().mean())
    return (f"Owned nodes: {'; '.join(owned)}. Validation photos with a non-owned concept of at least "
            f"{LOOKS_LIKE_STRONG:.0%} (a class answer names it in looks_like): {strong:.2%}.")


def frontier_png(scorer: Scorer, sets: dict[str, Split], ctx: dict, chosen: float, path: Path,
                 title: str) -> Path:
    """Share of pets answered against share of not-pets rejected as the validation accept rate moves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = np.r_[np.linspace(0.9, 0.99, 10), np.linspace(0.991, 1.0, 10)]
    pets = [k for k in ("val", "test", "pets-other") if k in sets]
    others = [k for k in ("everyday", "mammals", "raccoon", "skimage", "generated") if k in sets]
    rows = [evaluate(scorer, sets, float(a), ctx["head"], ctx) for a in rates]
    pick = evaluate(scorer, sets, chosen, ctx["head"], ctx)
    fig, axes = plt.subplots(1, len(pets), figsize=(5 * len(pets), 4.4), sharey=True)
    for ax, pet in zip(np.atleast_1d(axes), pets, strict=True):
        for other in others:
            x = [100 * r[f"{pet}:answered"] for r in rows]
            y = [100 * (1 - r[f"{other}:answered"]) for r in rows]
            line, = ax.plot(x, y, marker=".", label=other)
            ax.plot(100 * pick[f"{pet}:answered"], 100 * (1 - pick[f"{other}:answered"]), "o", ms=9,
                    mfc="none", color=line.get_color())
        ax.set_xlabel(f"{pet}: % answered Cat/Dog")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("% of not-pets answered 'unknown'")
    np.atleast_1d(axes)[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"{title}: the open-world frontier (circles: validation accept rate {chosen:.1%})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------
# Candidates: each returns a scoring function (features -> score, higher = less like training).

Scorer = Callable[[torch.Tensor], torch.Tensor]


def cand_detector(method: str) -> Callable[..., Scorer]:
    """A product detector (``catsdogs.models.ood``), fitted and calibrated exactly as training does."""
    def fit(train: Split, ctx: dict) -> Scorer:
        heads = ctx["imagenet"] if method == CONCEPTS else None
        det = fit_detector(method, train.f, train.y, ctx["num_classes"], 0, imagenet=heads)
        vf = ctx["val_f"]
        det.calibrate(vf, ctx["head"](vf), 0.99)  # references; thresholds set below

        def score(f: torch.Tensor) -> torch.Tensor:
            return det.score(f, ctx["head"](f))
        # The threshold exactly as training sets it (the concepts method's leave-one-out validation scores).
        score.threshold_at = lambda accept: det.calibrate(vf, ctx["head"](vf), accept).threshold  # type: ignore
        return score
    return fit


def cand_imagenet_msp(train: Split, ctx: dict) -> Scorer:
    w, b = ctx["imagenet"]
    return lambda f: -imagenet_probabilities(f, w, b).max(dim=1).values


def cand_imagenet_energy(train: Split, ctx: dict) -> Scorer:
    w, b = ctx["imagenet"]

    def score(f: torch.Tensor) -> torch.Tensor:
        m = w.shape[0]
        z = torch.einsum("nmd,mkd->nmk", f.float().reshape(len(f), m, -1), w) + b
        return -torch.logsumexp(z, dim=2).mean(dim=1)
    return score


def cand_owned_mass(train: Split, ctx: dict) -> Scorer:
    """The concepts detector's "what is it" half alone: -log of the mass under the owned WordNet nodes."""
    det = fit_detector(CONCEPTS, train.f, train.y, ctx["num_classes"], 0, imagenet=ctx["imagenet"])
    return lambda f: det.what_score(det.imagenet_probabilities(f))


def cand_previous_concepts(train: Split, ctx: dict) -> Scorer:
    """The concepts detector before the WordNet nodes: cross-entropy with each class's mean ImageNet
    distribution (floor 1e-4) and the knn look, their validation percentiles averaged."""
    det = fit_detector(CONCEPTS, train.f, train.y, ctx["num_classes"], 0, imagenet=ctx["imagenet"])
    probs = det.imagenet_probabilities(torch.from_numpy(train.f))
    y = torch.as_tensor(train.y)
    logq = torch.stack([(probs[y == c].double().mean(0) + 1e-4).log().float()
                        for c in range(ctx["num_classes"])])
    concept = lambda f: -(det.imagenet_probabilities(f) @ logq.T).max(dim=1).values  # noqa: E731
    vf = ctx["val_f"]
    ref_c, ref_l = concept(vf).sort().values, det._knn(vf, None).sort().values
    pct = lambda ref, x: torch.searchsorted(ref, x.contiguous()).float() / len(ref)  # noqa: E731
    return lambda f: 0.5 * (pct(ref_c, concept(f)) + pct(ref_l, det._knn(f, None)))


def cand_with_foreign(ratio: bool) -> Callable[..., Scorer]:
    """The product's Fisher rule with the largest non-owned ImageNet concept as well.

    ``ratio``: its log-ratio to the owned mass replaces the owned mass; else it is a third p-value.
    """
    def fit(train: Split, ctx: dict) -> Scorer:
        det = fit_detector(CONCEPTS, train.f, train.y, ctx["num_classes"], 0, imagenet=ctx["imagenet"])
        owned = det.params["owned"].any(dim=0)
        vf = ctx["val_f"]

        def parts(f: torch.Tensor) -> list[torch.Tensor]:
            p = det.imagenet_probabilities(f)
            what, foreign = det.what_score(p), -(p[:, ~owned].max(dim=1).values + 1e-12).log()
            look = det._knn(f, None)
            return [what - foreign, look] if ratio else [what, look, -foreign]

        refs = [r.sort().values for r in parts(vf)]

        def score(f: torch.Tensor) -> torch.Tensor:
            return sum(surprise(ref, x) for ref, x in zip(refs, parts(f), strict=True))  # type: ignore[return-value]
        return score
    return fit


def cand_floor(train: Split, ctx: dict) -> Scorer:
    """Reject only when both say no: the smaller of the owned mass's and the look's validation percentiles."""
    det = fit_detector(CONCEPTS, train.f, train.y, ctx["num_classes"], 0, imagenet=ctx["imagenet"])
    vf = ctx["val_f"]
    what = lambda f: det.what_score(det.imagenet_probabilities(f))  # noqa: E731
    ref_w, ref_l = what(vf).sort().values, det._knn(vf, None).sort().values
    pct = lambda ref, x: torch.searchsorted(ref, x.contiguous()).float() / len(ref)  # noqa: E731
    return lambda f: torch.minimum(pct(ref_w, what(f)), pct(ref_l, det._knn(f, None)))


def cand_concept_knn(train: Split, ctx: dict) -> Scorer:
    """kNN (k=10, cosine) on the square root of the ImageNet distribution (the concept vector)."""
    w, b = ctx["imagenet"]
    g = torch.Generator().manual_seed(0)
    keep = torch.randperm(len(train.f), generator=g)[:4096]
    bank = torch.nn.functional.normalize(imagenet_probabilities(torch.from_numpy(train.f[keep.numpy()]), w, b)
                                         .sqrt(), dim=1)
    return lambda f: 1 - (torch.nn.functional.normalize(imagenet_probabilities(f, w, b).sqrt(), dim=1)
                          @ bank.T).topk(10, dim=1).values[:, -1]


_NEVER = 1e9
"""The score of a photo a rule refuses outright (finite: the AUROC refuses infinities)."""


def _fisher(parts: Callable[[torch.Tensor], list[torch.Tensor]], vf: torch.Tensor,
            group: Callable[[torch.Tensor], torch.Tensor] | None = None,
            veto: Callable[[torch.Tensor], torch.Tensor] | None = None,
            weights: tuple[float, ...] | None = None) -> Scorer:
    """Fisher's rule over component scores, each a conformal p-value against validation, as the product.

    ``group``: each photo's p-values are taken against the validation photos of its own group only
    (Mondrian conformal: the predicted class). ``veto``: photos it marks are unknown whatever the rest.
    ``weights``: each part's ``-log p`` is multiplied by its weight (None: all 1, Fisher's rule).
    The threshold comes from the validation scores left out of their own reference (``threshold_at``).
    """
    def groups(f: torch.Tensor) -> torch.Tensor:
        return group(f) if group is not None else torch.zeros(len(f), dtype=torch.int64)

    vg, vparts = groups(vf), parts(vf)
    refs = {int(g): [p[vg == g].sort().values for p in vparts] for g in vg.unique()}

    def score(f: torch.Tensor, own: bool = False) -> torch.Tensor:
        fg, fparts, out = groups(f), parts(f), torch.full((len(f),), _NEVER)
        for g, ref in refs.items():
            sel = fg == g
            if sel.any():
                w = weights or (1.0,) * len(ref)
                out[sel] = sum(wt * surprise(r, x[sel], own=own)
                               for wt, r, x in zip(w, ref, fparts, strict=True))
        return out if veto is None else torch.where(veto(f), torch.tensor(_NEVER), out)

    val = np.sort(score(vf, own=True).numpy())
    scorer = lambda f: score(f)  # noqa: E731
    scorer.threshold_at = lambda a: float(val[min(len(val) - 1, max(0, math.ceil(a * len(val)) - 1))])  # type: ignore
    return scorer


def _what_at(det: Any, temperature: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``-log`` of the owned ImageNet mass, the heads' softmax taken at ``temperature``."""
    w, b = det._float("imagenet_weight", torch.device("cpu")), det.params["imagenet_bias"].float()
    owned = det.owned_any()

    def what(f: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("nmd,mkd->nmk", f.float().reshape(len(f), w.shape[0], -1), w) + b
        p = torch.softmax(z / temperature, dim=2).mean(dim=1)
        return -(p[:, owned].sum(dim=1).double() + 1e-12).log().float()
    return what


def cand_mondrian(train: Split, ctx: dict) -> Scorer:
    """Class-conditional: the mass under the predicted class's own node, and the look, each p-value taken
    against the validation photos predicted as that class (Mondrian conformal)."""
    det = fit_detector(CONCEPTS, train.f, train.y, ctx["num_classes"], 0, imagenet=ctx["imagenet"])
    owned = det.params["owned"]
    if ctx["num_classes"] == 1:  # the held-out-class test fits one class: nothing to condition on
        return _fisher(lambda f: [det.what_score(det.imagenet_probabilities(f)), det._knn(f, None)],
                       ctx["val_f"])

    def predicted(f: torch.Tensor) -> torch.Tensor:
        return probabilities(ctx["head"](f)).argmax(dim=1)

    def parts(f: torch.Tensor) -> list[torch.Tensor]:
        p, c = det.imagenet_probabilities(f), predicted(f)
        mass = (p[:, None, :] * owned[None].float()).sum(dim=2).gather(1, c[:, None]).squeeze(1)
        return [-(mass.double() + 1e-12).log().float(), det._knn(f, None)]
    return _fisher(parts, ctx["val_f"], group=predicted)


def cand_temperature(temperature: float) -> Callable[..., Scorer]:
    """The product's rule with the ImageNet heads' softmax at another temperature (< 1 sharper)."""
    def fit(train: Split, ctx: dict) -> Scorer:
        det = fit_detector(CONCEPTS, train.f, train.y, ctx["num_classes"], 0, imagenet=ctx["imagenet"])
        what = _what_at(det, temperature)
        return _fisher(lambda f: [what(f), det._knn(f, None)], ctx["val_f"])
    return fit


def cand_full_bank(train: Split, ctx: dict) -> Scorer:
    """The product's rule with the look against every training row instead of a 4,096-row sample."""
    det = fit_detector(CONCEPTS, train.f, train.y, ctx["num_classes"], 0, imagenet=ctx["imagenet"])
    det.params["bank"] = torch.nn.functional.normalize(torch.from_numpy(train.f).float(), dim=1).half()
    return _fisher(lambda f: [det.what_score(det.imagenet_probabilities(f)), det._knn(f, None)], ctx["val_f"])


def _product(train: Split, ctx: dict, kin: bool = True, knn_k: int | None = None) -> Any:
    """The product's concepts detector fitted on ``train``; ``kin`` False drops the kin question, ``knn_k``
    sets another neighbour rank for the look."""
    det = fit_detector(CONCEPTS, train.f, train.y, ctx["num_classes"], 0, imagenet=ctx["imagenet"])
    if not kin:
        del det.params["kin"]
    det.knn_k = knn_k or det.knn_k
    return det


def _concept_rule(det: Any, ctx: dict, weights: tuple[float, ...] | None = None) -> Scorer:
    """``det``'s own questions (what, look, then kin) through :func:`_fisher`, optionally weighted."""
    def parts(f: torch.Tensor) -> list[torch.Tensor]:
        return [x for _ref, x in det._concept_parts(f.float(), det.imagenet_probabilities(f), None)]
    return _fisher(parts, ctx["val_f"], weights=weights)


def cand_product_with(kin: bool = True, knn_k: int | None = None, what_weight: float = 1.0
                      ) -> Callable[..., Scorer]:
    """The product's rule with one setting changed: without the kin question, the look's k, or the weight
    of "what is it" against the other two questions (1: Fisher's rule)."""
    def fit(train: Split, ctx: dict) -> Scorer:
        det = _product(train, ctx, kin=kin, knn_k=knn_k)
        return _concept_rule(det, ctx, None if what_weight == 1.0 else (what_weight, 1.0, 1.0))
    return fit


def cand_kin_by_size(min_classes: int) -> Callable[..., Scorer]:
    """The product with another kin region: under each owned node's smallest WordNet ancestor that holds
    at least ``min_classes`` ImageNet classes (150: "carnivore" for PetImages), not its lexicographer file."""
    from catsdogs.models.taxonomy import node_leaves, node_mask

    def ancestor(synset: str) -> str:
        nodes, leaves = node_leaves()
        mask = node_mask(synset)
        above = [i for i in range(len(nodes)) if bool((leaves[i] | ~mask).all())]  # nodes holding it all
        big = [i for i in above if int(leaves[i].sum()) >= min_classes]
        return nodes[min(big, key=lambda i: (int(leaves[i].sum()), nodes[i]))]

    def fit(train: Split, ctx: dict) -> Scorer:
        det = _product(train, ctx)
        region = torch.stack([node_mask(ancestor(n)) for n in det.owned_nodes]).any(dim=0)
        det.params["kin"] = region & ~det.owned_any()
        return _concept_rule(det, ctx)
    return fit


def cand_kin_joined(how: str) -> Callable[..., Scorer]:
    """The kin question joined to "what is it" instead of a p-value of its own: ``sum``, its score added
    to the owned mass's; ``max``, the larger of their two surprises (either question alone can refuse)."""
    def fit(train: Split, ctx: dict) -> Scorer:
        det = _product(train, ctx)
        vf = ctx["val_f"]

        def parts(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return det._what_and_kin(det.imagenet_probabilities(f))
        if how == "sum":
            return _fisher(lambda f: [sum(parts(f)), det._knn(f, None)], vf)  # type: ignore[list-item]
        ref_what, ref_kin = (x.sort().values for x in parts(vf))

        def what(f: torch.Tensor) -> torch.Tensor:
            w, k = parts(f)
            own = f is vf  # the validation rows themselves: each left out of its own reference
            return torch.maximum(surprise(ref_what, w, own=own), surprise(ref_kin, k, own=own))
        return _fisher(lambda f: [what(f), det._knn(f, None)], vf)
    return fit


def cand_two_stage(train: Split, ctx: dict) -> Scorer:
    """Two stages: a photo whose most likely non-owned ImageNet concept holds half its mass is unknown
    (a confident foreign concept); the rest goes through the product's rule, thresholded on what is left."""
    det = fit_detector(CONCEPTS, train.f, train.y, ctx["num_classes"], 0, imagenet=ctx["imagenet"])
    foreign = ~det.owned_any()
    return _fisher(lambda f: [det.what_score(det.imagenet_probabilities(f)), det._knn(f, None)], ctx["val_f"],
                   veto=lambda f: det.imagenet_probabilities(f)[:, foreign].max(dim=1).values >= 0.5)


CANDIDATES: dict[str, Callable[..., Scorer]] = {
    "knn (the look)": cand_detector("knn"),
    "mahalanobis": cand_detector("mahalanobis"),
    "energy (user head)": cand_detector("energy"),
    "ImageNet max probability": cand_imagenet_msp,
    "ImageNet energy": cand_imagenet_energy,
    "kNN on the concept vector": cand_concept_knn,
    "owned WordNet mass (what it is)": cand_owned_mass,
    "previous concepts (cross-entropy + knn percentiles averaged)": cand_previous_concepts,
    "floor: owned mass or knn (reject only when both say no)": cand_floor,
    "Fisher of owned mass, knn and the largest non-owned concept": cand_with_foreign(ratio=False),
    "Fisher of knn and the log-ratio of the largest non-owned concept to the owned mass": cand_with_foreign(
        ratio=True),
    "class-conditional (Mondrian) p-values of the predicted class's mass and the look": cand_mondrian,
    "ImageNet softmax at temperature 0.5 in the owned mass": cand_temperature(0.5),
    "ImageNet softmax at temperature 2 in the owned mass": cand_temperature(2.0),
    "the look against every training row (no 4,096-row sample)": cand_full_bank,
    "two stages: a non-owned concept at 50 % or more is unknown, then concepts": cand_two_stage,
    "concepts before the kin question (owned mass and knn at k=10, Fisher-combined)": cand_product_with(
        kin=False, knn_k=10),
    "concepts without the kin question, knn at k=3": cand_product_with(kin=False),
    "kin summed into the owned mass's score (two p-values)": cand_kin_joined("sum"),
    "kin or owned mass, the larger surprise (two p-values)": cand_kin_joined("max"),
    **{f"concepts with the look at k={k}": cand_product_with(knn_k=k) for k in (1, 5, 10, 20)},
    **{f"concepts with \"what is it\" weighted {w:g}": cand_product_with(what_weight=w)
       for w in (0.25, 0.5, 2.0)},
    **{f"kin under the smallest node holding {n} ImageNet classes": cand_kin_by_size(n) for n in (150, 250)},
    "**concepts** (owned mass, kin share and knn at k=3, Fisher-combined)": cand_detector(CONCEPTS),
}
PRODUCT = next(name for name in CANDIDATES if name.startswith("**concepts**"))


def evaluate(scorer: Scorer, sets: dict[str, Split], accept: float, head: Callable, ctx: dict
             ) -> dict[str, float]:
    """Threshold on val at ``accept``; the figures of every set."""
    scores = {k: scorer(torch.from_numpy(s.f)).numpy() for k, s in sets.items() if k != "train"}
    thr = (scorer.threshold_at(accept) if hasattr(scorer, "threshold_at")
           else calibrate_threshold(ctx["dummy"], scores["val"], accept).threshold)
    row: dict[str, float] = {}
    for name, s in sets.items():
        if name == "train":
            continue
        known = (scores[name] <= thr) & ~s.flat
        row[f"{name}:answered"] = float(known.mean())
        if (s.y >= 0).any():
            pred = probabilities(head(torch.from_numpy(s.f))).argmax(1).numpy()
            ok = pred == s.y
            row[f"{name}:right"] = float(ok[known].mean()) if known.any() else math.nan
            row[f"{name}:acc_all"] = float(ok.mean())
    return row


def val_tail_sheet(scores: np.ndarray, data: Path, path: Path, n: int = 24, cols: int = 6) -> Path:
    """Draw the ``n`` validation photos with the highest scores as one PNG (to look at the tail)."""
    from PIL import Image, ImageDraw

    from catsdogs.shards.reader import iter_batches

    manifest = load_manifest(data)
    rows = np.concatenate([r for _, _, r, _ in iter_batches(data, manifest, "val", 256)])
    order = np.argsort(-scores, kind="stable")[:n]
    side = 150
    sheet = Image.new("RGB", (cols * (side + 10), -(-n // cols) * (side + 22)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, i in enumerate(order):
        x, y = (k % cols) * (side + 10), (k // cols) * (side + 22)
        sheet.paste(Image.fromarray(rows[i]).resize((side, side)), (x + 5, y + 5))
        draw.text((x + 5, y + side + 7), f"#{k} score {scores[i]:.3f}", fill="black")
    sheet.save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default=str(DEFAULT_RUN))
    parser.add_argument("--data", default="", help="shards (default: the run's own --data)")
    parser.add_argument("--cache", default="/tmp/catsdogs-bench/open_world")
    parser.add_argument("--fragment", default=None)
    args = parser.parse_args()
    if not Path(args.run).is_dir() and not Path(args.run).is_file():
        print(f"skipped: no trained run at {args.run} (make run, or give --run)")
        return
    pred = Predictor.from_run(args.run, "cpu", backend=DEFAULT_ENGINE)
    meta = pred.checkpoint
    engine = str(meta.get(CKPT_ENGINE, DEFAULT_ENGINE))
    model_name = str(meta[CKPT_MODEL_CONFIG]["name"])
    data = Path(args.data or meta[CKPT_TRAIN_CONFIG]["data"])
    cache = Path(args.cache) / _cache_key(pred, engine)
    if all((cache / f"{name}.npz").is_file() for name in ("train", "val", "test")):
        sets = load_sets(pred, data, cache)  # cached: a re-score, no heavy feature pass
    else:
        with heavy_lock():
            sets = load_sets(pred, data, cache)
    head_model = pred.model
    head = lambda f: head_model.classify(f)  # noqa: E731
    variants = tuple(REGISTRY[model_name].kwargs.get("variants", ()))
    ctx = {"num_classes": len(pred.classes), "head": head, "imagenet": imagenet_heads(variants),
           "val_f": torch.from_numpy(sets["val"].f), "dummy": fit_detector("energy", sets["train"].f[:1],
                                                                          sets["train"].y[:1], 2)}
    lines = [f"## Open-world detectors: {model_name} ({engine} features)", "",
             f"Command: `.venv/bin/python -m benchmarks.open_world --run {args.run}`. Machine: {machine()}.",
             "Fitted on train, thresholded on val at the accept rate; every other column only measured. "
             "answered = share given Cat/Dog; right = accuracy among answered; unknown = 1 - answered. "
             "held-out class = the selection test on train/val only (fit on one class, share of the other "
             "class's validation photos rejected at that accept rate; AUROC over both), "
             "`benchmarks.open_world.held_out_class`; blind: the same with the ImageNet heads unable to "
             "name the held-out class (as ImageNet-1k cannot name a raccoon). val corner crops = the four "
             f"corner crops ({CORNER_SHARE:.0%} of the side) of every validation photo, mostly background: a "
             "far-OOD check from validation alone, added after the product's rule was chosen.", "",
             "| detector | val accept | held-out class rejected (AUROC) | held-out, ImageNet blind (AUROC) "
             "| val corner crops refused | test answered | test right "
             "| pets-other answered | pets-other right | everyday unknown | its mammals unknown "
             "| raccoon unknown | skimage unknown | generated unknown | ms/image |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    with torch.inference_mode():
        for cname, make in CANDIDATES.items():
            scorer = make(sets["train"], ctx)
            x = torch.from_numpy(sets["val"].f)
            t0 = time.perf_counter()
            scorer(x)
            ms = (time.perf_counter() - t0) * 1000 / len(x)
            held_at, auroc = held_out_class(make, sets, ctx, ACCEPT_RATES)
            blind_at, blind_auroc = held_out_class(make, sets, ctx, ACCEPT_RATES, blind=True)
            for accept in ACCEPT_RATES:
                r = evaluate(scorer, sets, accept, head, ctx)
                held = held_at[accept]

                def g(k: str, unknown: bool = False, r: dict = r) -> str:
                    if k not in r:
                        return "-"
                    v = 1 - r[k] if unknown else r[k]
                    return f"{100 * v:.1f} %"
                lines.append(f"| {cname} | {accept:.1%} | {100 * held:.1f} % ({auroc:.4f}) | "
                             f"{100 * blind_at[accept]:.1f} % ({blind_auroc:.4f}) | "
                             f"{g('val-corners:answered', True)} | "
                             f"{g('test:answered')} | {g('test:right')} | "
                             f"{g('pets-other:answered')} | {g('pets-other:right')} | "
                             f"{g('everyday:answered', True)} | {g('mammals:answered', True)} | "
                             f"{g('raccoon:answered', True)} | {g('skimage:answered', True)} | "
                             f"{g('generated:answered', True)} | {ms:.3f} |")
            print("\n".join(lines[-len(ACCEPT_RATES):]), flush=True)
    # The operating point is chosen on train/val alone: validation's share answered against the held-out
    # class's rejection; the product asks at most 0.5 % of validation photos "unknown".
    make = CANDIDATES[PRODUCT]
    product = make(sets["train"], ctx)
    vs = product(torch.from_numpy(sets["val"].f)).numpy()
    vok = probabilities(head(torch.from_numpy(sets["val"].f))).argmax(1).numpy() == sets["val"].y
    lines += ["", "The product detector on TRAIN/VALIDATION only (what the operating point is chosen on):",
              "",
              "| val accept rate | val answered | val right among answered | held-out class rejected |",
              "|---|---|---|---|"]
    held_at, _auroc = held_out_class(make, sets, ctx, VAL_CURVE)
    for accept in VAL_CURVE:
        known = vs <= product.threshold_at(accept)
        held = held_at[accept]
        lines.append(f"| {accept:.1%} | {known.mean():.2%} | {vok[known].mean():.2%} | {held:.1%} |")
    lines += ["", owned_summary(sets, ctx)]
    png = frontier_png(product, sets, ctx, TrainConfig.accept_rate,
                       FRONTIER_DIR / f"open_world_frontier_{model_name}.png", model_name)
    lines += ["", f"The frontier (share of pets answered against share of not-pets rejected, as the "
              f"validation accept rate moves; circles at the default {TrainConfig.accept_rate:.1%}): "
              f"`docs/images/{png.name}`."]
    val_tail_sheet(vs, data, cache / "val_tail.png")
    lines += ["", "The 24 validation photos the product detector finds least like a pet are drawn in "
              "`val_tail.png` under `--cache` (not committed: they are the data's photos)."]
    report = "\n".join(lines)
    print(report)
    frag = args.fragment if args.fragment is not None else f"open_world_{model_name}"
    if frag:
        print(f"wrote {write_fragment(frag, report)}", file=sys.stderr)


if __name__ == "__main__":
    main()
