"""Generated test data: image trees with broken and odd files, and small shard folders.

Nothing here is committed as binary data; every fixture is made on the fly from a seed.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from catsdogs import schema
from catsdogs.shards.manifest import Manifest, save_manifest
from catsdogs.shards.writer import ShardWriter

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "PetImages"
"""../shared/data/PetImages seen from the project root (the development copy of the data)."""


def synthetic_image(label: int, size: int = 48, seed: int = 0) -> np.ndarray:
    """Return a uint8 RGB image whose class is learnable: class 0 bright-left, class 1 bright-right,
    plus noise; other labels shift the colour."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 90, size=(size, size, 3), dtype=np.int32)
    half = size // 2
    if label % 2 == 0:
        img[:, :half] += 140
    else:
        img[:, half:] += 140
    img[..., label % 3] += 20 * (label // 2)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_bytes(arr: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def bomb_png(side: int = 30000) -> bytes:
    """A valid PNG header claiming side x side pixels (a few hundred bytes): a decompression bomb."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    row = b"\x00" + b"\x00" * side
    idat = zlib.compress(row * 64, 9)  # truncated data is fine: the header alone must be refused
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def make_image_tree(root: Path, per_class: int = 12, classes: tuple[str, ...] = ("Cat", "Dog"),
                    size: int = 48, odd: bool = True) -> dict[str, list[str]]:
    """Write a PetImages-like tree; return {"good": [...], "bad": [...], "ignored": [...]} rel paths.

    With ``odd`` it adds every awkward kind of file the real download and users' folders contain.
    """
    good: list[str] = []
    bad: list[str] = []
    ignored: list[str] = []
    for label, cls in enumerate(classes):
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (d / f"{i}.jpg").write_bytes(jpeg_bytes(synthetic_image(label, size, seed=label * 1000 + i)))
            good.append(f"{cls}/{i}.jpg")
    if not odd:
        return {"good": good, "bad": bad, "ignored": ignored}
    cat, dog = root / classes[0], root / classes[1]
    base = Image.fromarray(synthetic_image(0, size, seed=99))
    rgba = base.convert("RGBA")
    oddities: dict[str, bytes] = {
        "png_named.jpg": encode(base, "PNG"),
        "real.PNG": encode(base, "PNG"),
        "anim.gif": encode(base.convert("P"), "GIF"),
        "pic.bmp": encode(base, "BMP"),
        "pic.webp": encode(base, "WEBP"),
        "pic.TIFF": encode(base, "TIFF"),
        "gray.jpg": encode(base.convert("L"), "JPEG"),
        "cmyk.jpg": encode(base.convert("CMYK"), "JPEG"),
        "rgba.png": encode(rgba, "PNG"),
        "palette.png": encode(base.convert("P"), "PNG"),
        "UPPER.JPEG": encode(base, "JPEG"),
        "with space é.jpg": encode(base, "JPEG"),
    }
    arr16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    oddities["deep16.png"] = encode(Image.fromarray(arr16), "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW on display
    oddities["rotated.jpg"] = encode(base.resize((size, size // 2)), "JPEG", exif=exif.tobytes())
    for name, data in oddities.items():
        (cat / name).write_bytes(data)
        good.append(f"{classes[0]}/{name}")
    nested = dog / "sub" / "deeper"
    nested.mkdir(parents=True)
    (nested / "nested.jpg").write_bytes(jpeg_bytes(synthetic_image(1, size, seed=4242)))
    good.append(f"{classes[1]}/sub/deeper/nested.jpg")
    full = jpeg_bytes(synthetic_image(1, size, seed=7))
    broken: dict[str, bytes] = {
        "empty.jpg": b"",
        "truncated.jpg": full[: len(full) // 3],
        "page.jpg": b"<html><body>404 not found</body></html>",
        "random.jpg": np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "bomb.png": bomb_png(),
    }
    for name, data in broken.items():
        (dog / name).write_bytes(data)
        bad.append(f"{classes[1]}/{name}")
    os.symlink(dog / "does-not-exist.jpg", dog / "broken_link.jpg")
    bad.append(f"{classes[1]}/broken_link.jpg")
    for name in ("Thumbs.db", ".DS_Store", "notes.txt", ".hidden.jpg"):
        (cat / name).write_bytes(b"clutter")
        ignored.append(f"{classes[0]}/{name}")
    (root / "README.txt").write_text("top-level file outside class folders")
    ignored.append("README.txt")
    return {"good": good, "bad": bad, "ignored": ignored}


ImageFn = Callable[[int, int, int], np.ndarray]
"""``(label, size, seed) -> uint8 RGB image``: what a fixture shard row shows."""


def make_shards(root: Path, counts: dict[str, int] | None = None, size: int = 32,
                shard_rows: int = 50, classes: tuple[str, ...] = ("Cat", "Dog"), seed: int = 0,
                fmt: str = "npy", image_fn: ImageFn | None = None) -> Manifest:
    """Write a small shards folder (no Spark) with the real writer and manifest; return the manifest.

    Rows are :func:`synthetic_image` unless ``image_fn`` makes them (e.g. :func:`photo_variant`).
    """
    image_fn = image_fn or synthetic_image
    counts = counts or {"train": 200, "val": 60, "test": 60}
    rng = np.random.default_rng(seed)
    infos = []
    per_split: dict[str, dict[str, int]] = {}
    for split, n in counts.items():
        labels = np.arange(n) % len(classes)
        rng.shuffle(labels)
        per_split[split] = {c: int((labels == k).sum()) for k, c in enumerate(classes)}
        for index, start in enumerate(range(0, n, shard_rows)):
            with ShardWriter(root, split, index, size, len(classes), fmt) as w:
                for j, label in enumerate(labels[start:start + shard_rows]):
                    # crc32, not hash(): str hashes change per process, and fixtures must not.
                    image_seed = seed * 100000 + zlib.crc32(split.encode()) % 1000 * 1000 + start + j
                    w.add(image_fn(int(label), size, image_seed), int(label),
                          f"{split}/{start + j}.png")
            infos.append(w.info)
    manifest = Manifest(classes=list(classes), size=size, resize="stretch", mean=[120.0] * 3,
                        std=[60.0] * 3, shards=infos, counts=per_split, format=fmt,
                        stats={"kept": sum(counts.values()), "skipped": 0})
    save_manifest(manifest, root)
    assert schema.MANIFEST_NAME
    return manifest


def make_run(root: Path, size: int = 32, classes: tuple[str, ...] = ("Cat", "Dog"), model: str = "seed",
             data: str = "", epochs: int = 3, seed: int = 0) -> Path:
    """Write a run folder with an untrained model checkpoint (best.pt, last.pt), config.json and
    metrics.csv through the writers ``catsdogs train`` uses; for tests of evaluate/predict/serve."""
    import torch

    from catsdogs.checkpoint import build_checkpoint, save_checkpoint
    from catsdogs.config import TrainConfig, save_config, to_dict
    from catsdogs.models.factory import create_model
    from catsdogs.rundir import MetricsLog, RunDir
    from catsdogs.train.contract import model_config

    torch.manual_seed(seed)
    run = RunDir(root)
    root.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(data=data, output=str(root), model=model, epochs=epochs, seed=seed)
    net = create_model(model, num_classes=len(classes), size=size)
    state = build_checkpoint(model_state=net.state_dict(), model_config=model_config(cfg, len(classes), size),
                             classes=classes, mean=[120.0] * 3, std=[60.0] * 3, size=size, resize="stretch",
                             train_config=to_dict(cfg), epoch=epochs,
                             metrics={"val_loss": 0.6, "val_acc": 0.6})
    save_checkpoint(run.best, state)
    save_checkpoint(run.last, state)
    save_config(cfg, run.config)
    log = MetricsLog(run.metrics)
    log.start(keep_epochs=None)
    for e in range(1, epochs + 1):
        log.append({"epoch": e, "step": e * 10, "train_loss": 0.7 - 0.05 * e, "train_acc": 0.5 + 0.05 * e,
                    "val_loss": 0.72 - 0.04 * e, "val_acc": 0.5 + 0.04 * e, "lr": 1e-3, "seconds": 1.0})
    return root


def make_pet_archive(path: Path, per_class: int = 6, size: int = 32,
                     extra: dict[str, bytes] | None = None) -> dict[str, list[str]]:
    """Write a small zip in the layout of Microsoft's kagglecatsanddogs_5340.zip, with its quirks.

    The licence pdf and ``readme[1].txt`` at the top, ``PetImages/{Cat,Dog}/<n>.jpg``, a ``Thumbs.db``
    in each class folder, an empty JPEG, a truncated JPEG and a PNG named .jpg. ``extra`` adds
    members by name (e.g. a path-traversal one). Returns ``good``/``bad``/``ignored`` paths relative to
    PetImages.
    """
    import zipfile

    good: list[str] = []
    bad: list[str] = []
    ignored: list[str] = []
    members: dict[str, bytes] = {
        "CDLA-Permissive-2.0.pdf": b"%PDF-1.4\n% licence text\n%%EOF\n",
        "readme[1].txt": b"Cats and dogs photos; some files are damaged.\r\n",
    }
    for label, cls in enumerate(("Cat", "Dog")):
        for i in range(per_class):
            image = synthetic_image(label, size, seed=label * 1000 + i)
            members[f"PetImages/{cls}/{i}.jpg"] = jpeg_bytes(image)
            good.append(f"{cls}/{i}.jpg")
        members[f"PetImages/{cls}/Thumbs.db"] = b"\xd0\xcf\x11\xe0 thumbnail cache"
        ignored.append(f"{cls}/Thumbs.db")
    full = jpeg_bytes(synthetic_image(1, size, seed=77))
    members["PetImages/Cat/666.jpg"] = b""
    members["PetImages/Dog/11702.jpg"] = full[: len(full) // 3]
    bad += ["Cat/666.jpg", "Dog/11702.jpg"]
    members["PetImages/Dog/9999.jpg"] = encode(Image.fromarray(synthetic_image(1, size, seed=78)), "PNG")
    good.append("Dog/9999.jpg")
    members.update(extra or {})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in ("PetImages/", "PetImages/Cat/", "PetImages/Dog/"):
            zf.writestr(name, b"")
        for name, data in members.items():
            zf.writestr(name, data)
    return {"good": sorted(good), "bad": sorted(bad), "ignored": sorted(ignored)}


def make_flat_tree(root: Path, per_class: int = 10, size: int = 40) -> dict[str, list[str]]:
    """Write Kaggle's competition layout (``cat.0.jpg``, ``dog.0.jpg`` in one folder) with odd files.

    Returns ``good`` (decodable), ``bad`` (undecodable) and ``ignored`` (not images) names; each
    image's class is its name up to the first dot.
    """
    root.mkdir(parents=True, exist_ok=True)
    good: list[str] = []
    for label, cls in enumerate(("cat", "dog")):
        for i in range(per_class):
            image = synthetic_image(label, size, seed=label * 1000 + i)
            (root / f"{cls}.{i}.jpg").write_bytes(jpeg_bytes(image))
            good.append(f"{cls}.{i}.jpg")
    base = Image.fromarray(synthetic_image(0, size, seed=99))
    odd = {"cat.png_named.jpg": encode(base, "PNG"), "cat.gray.jpg": encode(base.convert("L"), "JPEG"),
           "dog.cmyk.jpg": encode(Image.fromarray(synthetic_image(1, size, seed=98)).convert("CMYK"), "JPEG"),
           "dog.UPPER.JPEG": encode(Image.fromarray(synthetic_image(1, size, seed=97)), "JPEG")}
    full = jpeg_bytes(synthetic_image(1, size, seed=7))
    broken = {"dog.empty.jpg": b"", "cat.truncated.jpg": full[: len(full) // 3],
              "dog.page.jpg": b"<html>404</html>"}
    for name, data in {**odd, **broken}.items():
        (root / name).write_bytes(data)
    ignored = ["Thumbs.db", ".DS_Store", "notes.txt"]
    for name in ignored:
        (root / name).write_bytes(b"clutter")
    return {"good": sorted(good + list(odd)), "bad": sorted(broken), "ignored": sorted(ignored)}


PHOTO_CLASSES: tuple[str, ...] = ("Cat", "Coffee")
"""Classes of :func:`photo_variant`: scikit-image's chelsea (a tabby cat) and coffee (an espresso)."""


@cache
def _sample_photo(name: str) -> np.ndarray:
    from skimage import data  # dev extra: real photos shipped inside its wheel

    return np.asarray(getattr(data, name)())


def photo_variant(label: int, size: int, seed: int) -> np.ndarray:
    """A random crop, flip and brightness change of a real photo of class ``label`` (:data:`PHOTO_CLASSES`).

    Real photos that an ImageNet backbone recognises (tabby cat, espresso), for tests of the ImageNet
    concepts detector that run without the PetImages data.
    """
    rng = np.random.default_rng(seed)
    photo = _sample_photo(PHOTO_CLASSES[label % len(PHOTO_CLASSES)].lower().replace("cat", "chelsea"))
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(0.7, 1.0))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = photo[y:y + side, x:x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    img = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(img, np.float32) * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
