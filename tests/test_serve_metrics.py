"""GET /metrics: scraped after real requests and parsed with prometheus-client's own text parser."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from catsdogs.config import ServeConfig
from catsdogs.infer.predictor import UNKNOWN, Answers
from catsdogs.serve.app import create_app
from catsdogs.serve.metrics import LATENCY_BUCKETS_S, METRICS_PATH
from tests.fixtures import synthetic_image

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's notice about httpx in its TestClient
    from fastapi.testclient import TestClient

KEY = "metrics-test-key-0123456789"


class Fake:
    """A backend whose answer is set by the upload's first byte: < 80 unknown, < 160 Cat, else Dog."""

    name = "fake-engine"
    classes = ["Cat", "Dog"]
    size = 8
    predictor = None  # no torch model behind it: nothing to explain

    def decode(self, data: bytes, max_pixels: int = 0) -> np.ndarray:
        if data.startswith(b"bad"):
            from catsdogs.errors import ImageDecodeError

            raise ImageDecodeError("not_an_image", "not an image")
        return np.full((8, 8, 3), data[0], dtype=np.uint8)

    def predict_arrays(self, images: np.ndarray, tta: bool | None = None) -> np.ndarray:
        p = (images.reshape(len(images), -1)[:, 0] >= 160).astype(np.float32) * 0.8 + 0.1
        return np.stack([1 - p, p], axis=1)

    def answer(self, images: np.ndarray) -> Answers:
        known = images.reshape(len(images), -1)[:, 0] >= 80
        return Answers(self.predict_arrays(images), np.zeros(len(images), np.float32), known)

    def describe(self) -> dict[str, Any]:
        return {"name": "fakenet", "classes": self.classes, "size": self.size, "backend": self.name}


def scrape(client: TestClient, **kwargs: Any) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """GET /metrics, parsed: sample name -> {sorted label pairs: value}."""
    r = client.get(METRICS_PATH, **kwargs)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def one(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float:
    """The value of the sample ``name`` whose labels include ``labels`` (exactly one must match)."""
    hits = [v for key, v in samples.get(name, {}).items() if set(labels.items()) <= set(key)]
    assert len(hits) == 1, (name, labels, samples.get(name))
    return hits[0]


def upload(first: int) -> dict[str, Any]:
    return {"files": {"file": ("a.jpg", bytes([first]) * 16, "image/jpeg")}}


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app(ServeConfig(run="unused", rate_limit=0), Fake())) as c:
        yield c


def test_counts_match_the_requests_sent_and_unknown_answers_are_counted(client: TestClient) -> None:
    before = scrape(client)
    assert one(before, "catsdogs_predictions_total", label=UNKNOWN) == 0  # every label starts at 0
    assert one(before, "catsdogs_predictions_total", label="Cat") == 0
    info = one(before, "catsdogs_model_info", model="fakenet", backend="fake-engine", image_size="8")
    assert info == 1 and ("classes", "Cat,Dog") in next(iter(before["catsdogs_model_info"]))

    firsts = [10, 200, 100, 20, 250, 30, 120]  # unknown, Dog, Cat, unknown, Dog, unknown, Cat
    answers = [client.post("/predict", **upload(b)).json()["label"] for b in firsts]
    assert answers == [UNKNOWN, "Dog", "Cat", UNKNOWN, "Dog", UNKNOWN, "Cat"]
    batch = [("files", (f"{i}.jpg", bytes([b]) * 16, "image/jpeg")) for i, b in enumerate([5, 170, 90])]
    batch.append(("files", ("x.jpg", b"bad image", "image/jpeg")))
    items = client.post("/predict/batch", files=batch).json()
    assert [i.get("label") or i["error"] for i in items] == [UNKNOWN, "Dog", "Cat", "not_an_image"]
    assert client.post("/predict", **upload(200) | {"files": {"file": ("b.jpg", b"bad", "image/jpeg")}}
                       ).status_code == 400
    assert client.get("/no/such/page").status_code == 404
    assert client.get("/healthz").status_code == 200

    m = scrape(client)
    req = "catsdogs_http_requests_total"
    assert one(m, req, route="/predict", method="POST", status="200") == len(firsts)
    assert one(m, req, route="/predict", method="POST", status="400") == 1
    assert one(m, req, route="/predict/batch", method="POST", status="200") == 1
    assert one(m, req, route="unmatched", method="GET", status="404") == 1  # never the raw path
    assert one(m, req, route="/healthz", method="GET", status="200") == 1
    assert one(m, req, route=METRICS_PATH, method="GET", status="200") == 1  # the first scrape
    assert not any("/no/such/page" in str(key) for key in m[req])
    # One latency observation per request, in cumulative buckets.
    for key, count in m[req].items():
        labels = dict(key)
        assert one(m, "catsdogs_http_request_duration_seconds_count", **labels) == count
        buckets = [one(m, "catsdogs_http_request_duration_seconds_bucket", **labels, le=str(b))
                   for b in LATENCY_BUCKETS_S]
        assert buckets == sorted(buckets) and buckets[-1] <= count
        assert one(m, "catsdogs_http_request_duration_seconds_bucket", **labels, le="+Inf") == count
        assert one(m, "catsdogs_http_request_duration_seconds_sum", **labels) > 0

    pred = "catsdogs_predictions_total"
    assert one(m, pred, label=UNKNOWN) == answers.count(UNKNOWN) + 1 == 4
    assert one(m, pred, label="Cat") == answers.count("Cat") + 1 == 3
    assert one(m, pred, label="Dog") == answers.count("Dog") + 1 == 3
    # Every classified image went through one forward pass; nothing is left waiting.
    stats = client.get("/stats").json()
    assert one(m, "catsdogs_batch_size_count") == stats["batches"] > 0
    assert one(m, "catsdogs_batch_size_sum") == stats["items"] == 10
    assert one(m, "catsdogs_batch_size_bucket", le="+Inf") == stats["batches"]
    assert one(m, "catsdogs_forward_seconds_total") >= 0
    assert one(m, "catsdogs_queue_depth") == 0
    assert one(m, "catsdogs_http_requests_in_progress") == 1  # the scrape itself


def test_metrics_need_the_key_when_one_is_configured(tmp_path: Path) -> None:
    key_file = tmp_path / "api.key"
    key_file.write_text(KEY)
    cfg = ServeConfig(run="unused", api_key_file=str(key_file), rate_limit=0)
    with TestClient(create_app(cfg, Fake())) as c:
        refused = c.get(METRICS_PATH)
        assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
        assert "catsdogs_" not in refused.text
        m = scrape(c, headers={"Authorization": f"Bearer {KEY}"})
        assert one(m, "catsdogs_http_requests_total", route=METRICS_PATH, status="401") == 1  # counted too
        spec = c.get("/openapi.json").json()
        assert spec["paths"][METRICS_PATH]["get"]["security"]  # documented as needing the key


def test_two_apps_in_one_process_count_separately() -> None:
    with TestClient(create_app(ServeConfig(run="unused", rate_limit=0), Fake())) as a, \
            TestClient(create_app(ServeConfig(run="unused", rate_limit=0), Fake())) as b:
        a.post("/predict", **upload(200))
        a.post("/predict", **upload(200))
        b.post("/predict", **upload(10))
        ma, mb = scrape(a), scrape(b)
    assert one(ma, "catsdogs_predictions_total", label="Dog") == 2
    assert one(mb, "catsdogs_predictions_total", label="Dog") == 0
    assert one(mb, "catsdogs_predictions_total", label=UNKNOWN) == 1


@pytest.mark.slow
def test_the_real_predictor_s_unknown_answers_are_counted(tmp_path: Path, shards: Path) -> None:
    """A briefly trained seed model (it carries the "unknown" detector) answers a page of text unknown."""
    from catsdogs.cli import main as cli_main
    from tests.ood_set import generated_images, png_bytes

    assert cli_main(["train", "--data", str(shards), "--output", str(tmp_path / "run"), "--epochs", "2",
                     "--threads", "1"]) == 0
    text_page = png_bytes(generated_images(1, 160, seed=3)[6][1])
    pet = png_bytes(synthetic_image(0, 32, seed=901))
    with TestClient(create_app(ServeConfig(run=str(tmp_path / "run"), rate_limit=0))) as c:
        answers = [c.post("/predict", files={"file": (name, data, "image/png")}).json()["label"]
                   for name, data in (("page.png", text_page), ("pet.png", pet), ("page2.png", text_page))]
        m = scrape(c)
    assert answers[0] == answers[2] == UNKNOWN  # as in the browser test: a page of text is neither
    for label in ("Cat", "Dog", UNKNOWN):  # whatever the predictor answered, counted per label
        assert one(m, "catsdogs_predictions_total", label=label) == answers.count(label)
    assert one(m, "catsdogs_http_requests_total", route="/predict", status="200") == 3
    assert one(m, "catsdogs_model_info", model="seed") == 1
