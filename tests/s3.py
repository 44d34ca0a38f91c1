"""A real S3 endpoint for tests: moto's server on 127.0.0.1 (HTTP, the S3 REST API), not a mock.

catsdogs talks to it through pyarrow's AWS SDK client exactly as to AWS or MinIO; only the endpoint
and the (dummy) credentials come from the environment, as a user would set them.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
"""Dummy credentials: moto accepts any, but the AWS SDK wants some before it signs a request."""


@contextmanager
def s3_server() -> Iterator[str]:
    """Run a local S3 server; set the AWS environment to use it; yield its endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    from catsdogs.io import storage

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # Servers in one process share moto's in-memory state: start from an empty store.
    reset = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(reset, timeout=10).close()
    saved = {k: os.environ.get(k) for k in [*ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(ENV, AWS_ENDPOINT_URL=endpoint)
    storage._s3.cache_clear()  # noqa: SLF001 - clients are cached per endpoint; start clean
    try:
        yield endpoint
    finally:
        server.stop()
        storage._s3.cache_clear()  # noqa: SLF001
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_bucket(name: str) -> None:
    """Create a bucket on the current endpoint (with boto3, which reads the same environment)."""
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)


def download_tree(uri: str, local: Path) -> list[str]:
    """Download every file under ``uri`` into ``local``; return rel paths."""
    from catsdogs.io import storage

    files = [rel for rel, _ in storage.list_files(uri)]
    for rel in files:
        storage.download(storage.join(uri, rel), local / rel)
    return files
