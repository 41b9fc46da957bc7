"""Files written through `direct_io.DirectFile` (O_DIRECT where the file system takes it, the page cache
otherwise) hold exactly the bytes written, and the checksum recorded is the file's."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.core.storage import direct_io
from ckpt_callbacks.core.storage.checksums import checksum_file
from ckpt_callbacks.core.storage.direct_io import DirectFile
from ckpt_callbacks.core.storage.written_files import WrittenFiles, recording, write_buffers

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    """8 KiB chunks, so that small test files cross chunk boundaries."""
    monkeypatch.setattr(direct_io, "CHUNK_BYTES", 2 * direct_io.ALIGNMENT)
    monkeypatch.setattr(direct_io, "_pool", type(direct_io._pool)())  # no buffer of the default size
    return direct_io.CHUNK_BYTES


def pieces(sizes: list[int], seed: int = 0) -> list[bytes]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (size,), dtype=torch.uint8, generator=generator).numpy().tobytes() for size in sizes]


@pytest.mark.parametrize("sizes", [[], [1], [4095], [4096], [8192], [8193], [3, 5000, 12000, 1, 8191]],
                         ids=["empty", "1", "4095", "4096", "chunk", "chunk+1", "mixed"])
@pytest.mark.parametrize("enabled", [True, False], ids=["direct", "buffered"])
def test_written_bytes_and_checksum_are_the_files(tmp_path: Path, small_chunks: int, monkeypatch: pytest.MonkeyPatch,
                                                 sizes: list[int], enabled: bool) -> None:
    monkeypatch.setattr(direct_io, "ENABLED", enabled)
    data = pieces(sizes)
    path = tmp_path / "piece.bin"
    with DirectFile(path) as f:
        for piece in data:
            assert f.write(piece) == len(piece)
    assert path.read_bytes() == b"".join(data)
    assert f.hexdigest() == checksum_file(path)


def test_the_repository_disk_is_written_with_o_direct(small_chunks: int) -> None:
    """Where the benchmarks and users' runs write (not a tmpfs), the fast path is the one taken."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    path = REPO / ".direct-io-probe"
    try:
        with DirectFile(path) as f:
            f.write(pieces([10_000])[0])
            direct = f._direct
        assert path.stat().st_size == 10_000
    finally:
        path.unlink(missing_ok=True)
    assert direct, "O_DIRECT was refused on the repository's disk"


def test_a_file_system_refusing_o_direct_gets_a_buffered_write(tmp_path: Path, small_chunks: int,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def refusing_open(path: Any, flags: int, *args: Any) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    data = pieces([20_000])[0]
    with DirectFile(tmp_path / "a.bin") as f:
        f.write(data)
    assert not f._direct
    assert (tmp_path / "a.bin").read_bytes() == data


def test_a_refused_aligned_write_goes_on_through_the_page_cache(tmp_path: Path, small_chunks: int,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    real_write = os.write
    refused: list[int] = []

    def refusing_write(fd: int, data: Any) -> int:
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refusing_write)
    data = pieces([30_001])[0]
    with DirectFile(tmp_path / "a.bin") as f:
        f.write(data)
    assert refused and not f._direct
    assert (tmp_path / "a.bin").read_bytes() == data
    assert f.hexdigest() == checksum_file(tmp_path / "a.bin")


def test_two_files_written_at_once_by_one_thread_do_not_share_a_buffer(tmp_path: Path, small_chunks: int) -> None:
    first, second = pieces([9000, 13000], seed=1)
    with DirectFile(tmp_path / "1.bin") as one, DirectFile(tmp_path / "2.bin") as two:
        for start in range(0, 13000, 1000):
            one.write(first[start:start + 1000])
            two.write(second[start:start + 1000])
    assert (tmp_path / "1.bin").read_bytes() == first
    assert (tmp_path / "2.bin").read_bytes() == second


def test_write_buffers_records_the_checksum_of_what_it_wrote(tmp_path: Path, small_chunks: int) -> None:
    tensors = [torch.randn(3000), torch.arange(77, dtype=torch.int16)]
    views = [memoryview(t.numpy()).cast("B") for t in tensors]
    ledger = WrittenFiles()
    with recording(ledger):
        write_buffers(tmp_path / "t.bin", [b"head", *views], fsync=True)
    path = tmp_path / "t.bin"
    assert path.read_bytes() == b"head" + b"".join(bytes(v) for v in views)
    assert ledger.checksum_of(path, path.stat()) == checksum_file(path)


@pytest.mark.parametrize("engine", ["safetensors", "torch"])
def test_checkpoints_written_directly_and_through_the_page_cache_are_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str,
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 257), torch.nn.Linear(257, 3))
    files = {}
    for enabled in (True, False):
        monkeypatch.setattr(direct_io, "ENABLED", enabled)
        folder = tmp_path / str(enabled)
        with CheckpointManager(CheckpointArguments(output_dir=str(folder), engine=engine)) as manager:
            manager.save(1, {"model": model}, capture_rng=False)
        checkpoint = folder / "checkpoint-1"
        files[enabled] = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.name != "manifest.json"}
        restored = torch.nn.Sequential(torch.nn.Linear(300, 257), torch.nn.Linear(257, 3))
        CheckpointManager(CheckpointArguments(output_dir=str(folder))).load(1, {"model": restored})  # checksums verified
        assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), model.state_dict().values(), strict=True))
    assert files[True] == files[False]


@pytest.mark.parametrize("enabled", [True, False], ids=["direct", "buffered"])
def test_small_writes_are_gathered_into_chunk_sized_system_calls(tmp_path: Path, small_chunks: int,
                                                                 monkeypatch: pytest.MonkeyPatch, enabled: bool) -> None:
    """torch.save writes its pickle in many small pieces: they reach the file in chunk-sized writes."""
    monkeypatch.setattr(direct_io, "ENABLED", enabled)
    real_write = os.write
    calls: list[int] = []

    def counted_write(fd: int, data: Any) -> int:
        calls.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counted_write)
    data = pieces([40_000])[0]
    with DirectFile(tmp_path / "small.bin") as f:
        for start in range(0, len(data), 10):
            f.write(data[start:start + 10])
    assert (tmp_path / "small.bin").read_bytes() == data
    assert len(calls) <= -(-len(data) // small_chunks)  # 4000 writes of 10 bytes, at most 5 system calls
