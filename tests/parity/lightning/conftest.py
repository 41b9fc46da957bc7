"""Parity tests run per Lightning namespace where they are cheap; `lightning_only` marks the rest."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest

from tests.lightning.helpers import NAMESPACES, Namespace, namespace

for _name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)  # no GPU/TPU banners and tips in failure reports


@pytest.fixture(params=NAMESPACES)
def ns(request: pytest.FixtureRequest) -> Namespace:
    return namespace(request.param)


@pytest.fixture
def lightning_ns() -> Namespace:
    """For the expensive scenarios: the adapters of both namespaces share their code, one run is enough."""
    return namespace("lightning.pytorch")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1: a real S3 API, no network."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """A fresh bucket on the moto server, with the environment s3fs (and Lightning's fsspec) read."""
    import boto3
    import s3fs

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    name = "parity-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[-40:].strip("-.")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    return name
