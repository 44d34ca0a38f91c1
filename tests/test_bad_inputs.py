"""Every odd or broken file of the fixture corpus, through preprocess, predict and serve at once.

One table says what each file is; the test checks that the three stages agree on it: a decodable
file is kept by preprocess (its shard row equals what predict and serve feed the model) and gets a
prediction from predict and serve; an undecodable one is listed by preprocess with a reason, gets
an error row with the SAME reason from predict and a 4xx JSON error with the SAME code from serve;
OS clutter is ignored (with a reason) by preprocess and not listed by predict.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from catsdogs import schema
from catsdogs.cli import main as cli_main
from catsdogs.config import ServeConfig
from catsdogs.infer.predictor import Predictor
from catsdogs.serve.app import create_app
from catsdogs.shards.manifest import load_manifest
from tests.fixtures import make_image_tree, make_run

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's notice about httpx in its TestClient
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.slow
SIZE = 24

OK = "ok"
# Every file make_image_tree writes beyond the plain Cat/<i>.jpg and Dog/<i>.jpg photos:
# path -> the outcome every stage must agree on (OK, a decode reason, or "ignored:<reason>").
CORPUS: dict[str, str] = {
    "Cat/png_named.jpg": OK,  # PNG bytes under a .jpg name: content decides, not the extension
    "Cat/real.PNG": OK,  # upper-case extension
    "Cat/anim.gif": OK,
    "Cat/pic.bmp": OK,
    "Cat/pic.webp": OK,
    "Cat/pic.TIFF": OK,
    "Cat/gray.jpg": OK,
    "Cat/cmyk.jpg": OK,
    "Cat/rgba.png": OK,
    "Cat/palette.png": OK,
    "Cat/UPPER.JPEG": OK,
    "Cat/with space é.jpg": OK,  # spaces and non-ASCII in the name
    "Cat/deep16.png": OK,  # 16-bit grayscale
    "Cat/rotated.jpg": OK,  # EXIF orientation 6
    "Dog/sub/deeper/nested.jpg": OK,  # nested subfolders belong to their class
    "Dog/empty.jpg": "empty_file",
    "Dog/truncated.jpg": "corrupt",
    "Dog/page.jpg": "not_an_image",  # an HTML error page saved as .jpg
    "Dog/random.jpg": "not_an_image",
    "Dog/bomb.png": "decompression_bomb",  # 30000x30000 declared in a few hundred bytes
    "Dog/broken_link.jpg": "broken_link",
    "Cat/Thumbs.db": "ignored:os_file",
    "Cat/.DS_Store": "ignored:os_file",
    "Cat/notes.txt": "ignored:not_image_extension",
    "Cat/.hidden.jpg": "ignored:hidden",
    "README.txt": "ignored:outside_class_folder",
}
PER_CLASS = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The fixture tree and the expected outcome of every file in it (plain photos are OK)."""
    root = tmp_path_factory.mktemp("corpus") / "PetImages"
    info = make_image_tree(root, per_class=PER_CLASS, size=48)
    plain = {p: OK for p in info["good"] if p not in CORPUS}
    assert len(plain) == 2 * PER_CLASS
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}
    assert on_disk == set(CORPUS) | set(plain), "the table must cover every file make_image_tree writes"
    return root, {**plain, **CORPUS}


@pytest.fixture(scope="module")
def preprocessed(corpus: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Path]:
    from catsdogs.spark import get_spark

    root, _ = corpus
    out = tmp_path_factory.mktemp("pre") / "shards"
    spark = get_spark("local[2]", "catsdogs-bad-inputs", {"spark.sql.shuffle.partitions": "2"})
    try:
        assert cli_main(["preprocess", "--input", str(root), "--output", str(out), "--size", str(SIZE),
                         "--shard-rows", "8", "--val-frac", "0.2", "--test-frac", "0.2"]) == 0
    finally:
        spark.stop()
    yield out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "run", size=SIZE)


def shard_rows(out: Path) -> dict[str, np.ndarray]:
    """Map each kept file (relative path) to its pixels as stored in the shards."""
    with open(out / schema.FILES_CSV_NAME, newline="") as fh:
        rows = list(csv.DictReader(fh))
    cache: dict[tuple[str, str], np.ndarray] = {}
    pixels: dict[str, np.ndarray] = {}
    for r in rows:
        key = (r["split"], r["shard"])
        if key not in cache:
            cache[key] = np.load(out / r["split"] / schema.X_PATTERN.format(index=int(r["shard"])))
        pixels[r["path"]] = cache[key][int(r["row"])]
    return pixels


def test_every_stage_answers_every_file_the_same_way(corpus: tuple[Path, dict[str, str]],
                                                     preprocessed: Path, run: Path, tmp_path: Path) -> None:
    root, expected = corpus
    problems: list[str] = []

    # --- preprocess: kept rows, skipped reasons, ignored reasons
    m = load_manifest(preprocessed)
    kept = shard_rows(preprocessed)
    skipped = {s["path"]: s["reason"] for s in m.skipped}
    assert all(s["detail"] or s["reason"] == "empty_file" for s in m.skipped), m.skipped
    ignored_paths = set(m.ignored["paths"])
    ignored_by_reason = m.ignored["by_reason"]

    # --- predict: one JSON row per candidate file found by walking the folder
    preds_path = tmp_path / "preds.json"
    assert cli_main(["predict", str(root), "--run", str(run), "--output", str(preds_path),
                     "--batch-size", "5"]) == 0
    preds = {Path(r["path"]).relative_to(root).as_posix(): r for r in json.loads(preds_path.read_text())}

    # --- serve: every readable file uploaded as it is
    predictor = Predictor.from_run(run)
    served: dict[str, tuple[int, dict]] = {}
    with TestClient(create_app(ServeConfig(run=str(run)))) as client:
        for rel in expected:
            path = root / rel
            if not path.exists():  # the broken symlink: there are no bytes a client could send
                continue
            r = client.post("/predict", files={"file": (path.name, path.read_bytes(),
                                                        "application/octet-stream")})
            assert r.headers["content-type"].startswith("application/json"), (rel, r.text)
            served[rel] = (r.status_code, r.json())

    for rel, want in sorted(expected.items()):
        if want == OK:
            if rel not in kept:
                problems.append(f"{rel}: preprocess did not keep it (skipped: {skipped.get(rel)})")
            else:
                # The shard row is exactly what predict/serve feed the model for the same bytes.
                if not np.array_equal(kept[rel], predictor.decode((root / rel).read_bytes())):
                    problems.append(f"{rel}: shard pixels differ from the serving decode")
            row = preds.get(rel)
            if row is None or row["error"] or row["label"] not in ("Cat", "Dog"):
                problems.append(f"{rel}: predict gave {row}")
            status, body = served[rel]
            if status != 200 or body.get("label") not in ("Cat", "Dog"):
                problems.append(f"{rel}: serve gave {status} {body}")
            elif row and abs(body["probability"] - row["probability"]) > 1e-5:
                problems.append(f"{rel}: serve p={body['probability']} but predict p={row['probability']}")
        elif want.startswith("ignored:"):
            reason = want.split(":", 1)[1]
            if rel not in ignored_paths or rel in kept or rel in skipped:
                problems.append(f"{rel}: preprocess should ignore it ({reason})")
            if reason not in ignored_by_reason:
                problems.append(f"{rel}: no ignored reason {reason!r} in {ignored_by_reason}")
            if rel in preds:
                problems.append(f"{rel}: predict should not list OS clutter, gave {preds[rel]}")
            status, body = served[rel]
            if not (400 <= status < 500 and body.get("error")):  # uploaded anyway: it is no image
                problems.append(f"{rel}: serve gave {status} {body}")
        else:
            if skipped.get(rel) != want:
                problems.append(f"{rel}: preprocess reason {skipped.get(rel)!r}, want {want!r}")
            row = preds.get(rel)
            if row is None or row["error"] != want or row["label"]:
                problems.append(f"{rel}: predict gave {row}, want error {want!r}")
            if rel in served:
                status, body = served[rel]
                if status != 400 or body.get("error") != want or not body.get("detail"):
                    problems.append(f"{rel}: serve gave {status} {body}, want 400 {want!r}")
    assert not problems, "\n".join(problems)
    # Nothing is lost: every file is kept, skipped or ignored, exactly once.
    assert len(kept) + len(skipped) + m.ignored["count"] == len(expected)
    assert m.stats["kept"] == len(kept) and m.stats["skipped"] == len(skipped)


def test_batch_endpoint_answers_each_file_like_single_uploads(corpus: tuple[Path, dict[str, str]],
                                                             run: Path) -> None:
    """/predict/batch mixes good and bad files: each gets its own result or error, same codes."""
    root, expected = corpus
    names = [rel for rel, want in expected.items() if not want.startswith("ignored:")
             and (root / rel).exists()]
    files = [("files", (rel, (root / rel).read_bytes(), "application/octet-stream")) for rel in names]
    with TestClient(create_app(ServeConfig(run=str(run)))) as client:
        r = client.post("/predict/batch", files=files)
    assert r.status_code == 200, r.text
    items = r.json()
    assert [i["filename"] for i in items] == names
    for rel, item in zip(names, items, strict=True):
        if expected[rel] == OK:
            assert item["label"] in ("Cat", "Dog") and not item.get("error"), (rel, item)
        else:
            assert item["error"] == expected[rel] and item["detail"], (rel, item)
            assert item.get("label") is None, (rel, item)
