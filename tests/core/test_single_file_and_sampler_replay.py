"""Single-file checkpoints (atomic, verified by the manifest inside the file) and sampler replay, in a plain loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ckpt_callbacks import CheckpointCorruptError
from ckpt_callbacks.core.format.single_file import load_torch_file, read_embedded_manifest, save_torch_file
from ckpt_callbacks.core.state.rng import capture_rng_state
from ckpt_callbacks.core.state.sampler_replay import SamplerResume


def loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.arange(24)), batch_size=4, shuffle=True)


def epochs(data: DataLoader, count: int, resume: SamplerResume) -> list[list[int]]:
    seen = []
    for _ in range(count):
        for (batch,) in data:
            seen.append(batch.tolist())
            torch.rand(1)  # training consumes the same RNG the shuffle draws from
    return seen


def test_sampler_resume_replays_the_rest_of_an_interrupted_epoch_in_a_plain_loop() -> None:
    torch.manual_seed(0)
    reference = epochs(loader(), 2, SamplerResume())

    torch.manual_seed(0)
    data, position = loader(), SamplerResume()
    assert position.attach(data)
    seen, saved = [], None
    for step, (batch,) in enumerate(data):
        seen.append(batch.tolist())
        torch.rand(1)
        if step == 2:  # checkpoint after 3 of 6 batches
            saved = (position.state_dict(batches_done=3), capture_rng_state())
            break
    assert saved is not None

    torch.manual_seed(999)  # a new process
    data, position = loader(), SamplerResume()
    position.attach(data)
    position.load_state_dict(*saved)
    position.before_iterator()
    iterator = iter(data)
    position.after_iterator()
    for (batch,) in iterator:
        seen.append(batch.tolist())
        torch.rand(1)
    seen += epochs(data, 1, position)
    assert seen == reference


def test_single_file_save_is_atomic_and_verified(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    save_torch_file({"w": torch.ones(3)}, path, step=1)

    class Unpicklable:
        def __reduce__(self) -> Any:
            raise RuntimeError("disk died mid-write")

    with pytest.raises(RuntimeError, match="disk died"):
        save_torch_file({"w": torch.zeros(3), "bad": Unpicklable()}, path, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # old bytes intact, no temporary file
    assert torch.equal(load_torch_file(path)["w"], torch.ones(3))

    save_torch_file({"w": torch.full((3,), 2.0)}, path, step=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no second file beside it
    manifest = read_embedded_manifest(path)
    assert manifest is not None and manifest.step == 3
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.full((3,), 2.0))  # stock loaders read it
    intact = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b"appended")
    with pytest.raises(CheckpointCorruptError, match=r"last\.ckpt: size mismatch"):
        load_torch_file(path)
    damaged = bytearray(intact)
    damaged[200] ^= 0xFF  # inside torch's records, before the manifest
    path.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointCorruptError, match=r"last\.ckpt: checksum mismatch"):
        load_torch_file(path)


def test_a_loader_that_saves_its_own_position_is_not_replayed_as_well() -> None:
    class StatefulLoader(DataLoader):  # the shape of torchdata's StatefulDataLoader
        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            pass

    stateful = StatefulLoader(TensorDataset(torch.arange(8)), batch_size=2, shuffle=True)
    assert not SamplerResume().attach(stateful)
    assert type(stateful.batch_sampler.sampler).__name__ == "RandomSampler"
