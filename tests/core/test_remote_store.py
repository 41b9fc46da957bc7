"""Remote storage through fsspec: a real S3 API (moto's server on 127.0.0.1) and memory://."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import torch

from ckpt_callbacks import CheckpointArguments, CheckpointManager, CheckpointWriteError

from ..conftest import assert_same_tensors, make_training_objects, train_steps


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    import boto3

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    name = request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:50]
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return name


def test_save_list_latest_resume_and_retention_on_s3(bucket: str) -> None:
    url = f"s3://{bucket}/run"
    model, optimizer, scheduler = make_training_objects()
    manager = CheckpointManager(CheckpointArguments(output_dir=url, save_total_limit=2, metric_for_best_model="loss"))
    for step, loss in ((1, 3.0), (2, 1.0), (3, 2.0), (4, 4.0)):
        train_steps(model, optimizer, scheduler, 1)
        manager.save(step, {"model": model, "optimizer": optimizer}, metrics={"eval_loss": loss})
    manager.close()
    reader = CheckpointManager(CheckpointArguments(output_dir=url, metric_for_best_model="loss"))
    assert [info.step for info in reader.list()] == [2, 4]  # best (2) and newest (4)
    assert reader.latest().step == 4 and reader.best().step == 2  # type: ignore[union-attr]
    fresh_model, fresh_optimizer, _ = make_training_objects(seed=9)
    step, _ = reader.load_last({"model": fresh_model, "optimizer": fresh_optimizer})
    assert step == 4
    assert_same_tensors(model.state_dict(), fresh_model.state_dict())


def test_interrupted_upload_is_invisible_and_cleaned_by_the_next_save(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"s3://{bucket}/run"
    model = torch.nn.Linear(4, 4)
    manager = CheckpointManager(CheckpointArguments(output_dir=url, async_save=False))
    manager.save(1, {"model": model})
    store = manager.store
    original_put = store.fs.put_file  # type: ignore[attr-defined]
    calls = {"n": 0}

    def put_then_fail(local: str, remote: str, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] > 1:
            raise ConnectionError("connection reset by peer")
        original_put(local, remote, **kwargs)

    monkeypatch.setattr(store.fs, "put_file", put_then_fail)  # type: ignore[attr-defined]
    with pytest.raises(CheckpointWriteError, match="invisible"):
        manager.save(2, {"model": model})
    monkeypatch.setattr(store.fs, "put_file", original_put)  # type: ignore[attr-defined]
    assert "checkpoint-2" in store.list_names()  # the partial upload exists...
    assert [info.step for info in manager.list()] == [1]  # ...but no reader sees it
    manager.close()
    again = CheckpointManager(CheckpointArguments(output_dir=url, async_save=False))
    again.save(3, {"model": model})
    assert "checkpoint-2" not in again.store.list_names()
    assert [info.step for info in again.list()] == [1, 3]


def test_memory_filesystem_round_trip() -> None:
    model = torch.nn.Linear(3, 3)
    manager = CheckpointManager(CheckpointArguments(output_dir="memory://ckpt-test/run", engine="torch"))
    manager.save(5, {"model": model})
    manager.close()
    fresh = torch.nn.Linear(3, 3)
    CheckpointManager(CheckpointArguments(output_dir="memory://ckpt-test/run")).load_last({"model": fresh})
    assert_same_tensors(model.state_dict(), fresh.state_dict())
