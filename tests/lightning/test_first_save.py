"""The first save of a fit fills host buffers reserved in the background after the first optimizer step, so it
does not fault in fresh memory while training waits (as the HF callback and a resumed plain manager do)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_callbacks.core.save.staging import HostStager

from .helpers import Namespace, train_loader, val_loader


def tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def record_staging(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    events: list[tuple[str, int]] = []
    reserve, release = HostStager.reserve, HostStager.release_unused_reservations

    def recorded_reserve(self: HostStager, state: Any, prefix: Any = ()) -> int:
        reserved = reserve(self, state, prefix)
        events.append(("reserve", reserved))
        return reserved

    def recorded_release(self: HostStager) -> int:
        freed = release(self)
        events.append(("release", freed))
        return freed

    monkeypatch.setattr(HostStager, "reserve", recorded_reserve)
    monkeypatch.setattr(HostStager, "release_unused_reservations", recorded_release)
    return events


class StateAfterFirstStep:
    """Records the bytes of the weights and optimizer state after the first optimizer step."""

    def __init__(self) -> None:
        self.bytes: int | None = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if self.bytes is None:
            self.bytes = tensor_bytes(pl_module.state_dict()) + sum(
                tensor_bytes(optimizer.state_dict()["state"]) for optimizer in trainer.optimizers)


def test_the_first_save_fills_the_buffers_reserved_after_the_first_optimizer_step(
        ns: Namespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = record_staging(monkeypatch)
    plugin, callback = ns.ours(tmp_path, save_steps=4)
    probe = StateAfterFirstStep()
    recorder = type("Recorder", (ns.pl.Callback,), {"on_train_batch_end": probe.on_train_batch_end})()
    trainer = ns.trainer(tmp_path, callbacks=[recorder, callback], plugins=[plugin], max_epochs=1)
    trainer.fit(ns.Tiny(), train_loader(), val_loader())
    assert (tmp_path / "checkpoints" / "checkpoint-4").is_dir()
    assert probe.bytes, "the probe saw no state"
    assert events[:2] == [("reserve", probe.bytes), ("release", 0)], events  # reserved ahead, all taken


def test_save_only_model_reserves_only_the_weights(ns: Namespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = record_staging(monkeypatch)
    plugin, callback = ns.ours(tmp_path, save_steps=4, save_only_model=True)
    module = ns.Tiny()
    trainer = ns.trainer(tmp_path, callbacks=[callback], plugins=[plugin], max_epochs=1)
    trainer.fit(module, train_loader(), val_loader())
    assert events[:2] == [("reserve", tensor_bytes(module.state_dict())), ("release", 0)], events
