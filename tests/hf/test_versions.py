"""Differences between the supported transformers / accelerate releases, each handled in `trainer_hooks`.

These tests pass on every supported stack; each fails on the stack that has the difference when its shim is
removed (the oldest-stack CI job runs them there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers.trainer

from ckpt_callbacks.hf import CheckpointCallback, trainer_hooks
from tests.hf.conftest import make_trainer

SKIPPED = 2  # batches of the resumed epoch already trained on


def epoch_inputs(loader: Any) -> list[torch.Tensor]:
    return [batch["input_ids"] for batch in loader]


@pytest.mark.parametrize("order", ["set_epoch_then_skip", "skip_then_set_epoch"])
def test_a_resumed_epoch_is_shuffled_as_the_uninterrupted_one(tmp_path: Path, order: str) -> None:
    # transformers 4.x sets the epoch on the loader and then skips batches; 5.x skips, then sets it on the new
    # loader. With accelerate < 1.15 the stock skip_first_batches loses the epoch in one order or the other.
    reference = make_trainer(tmp_path / "reference").get_train_dataloader()
    reference.set_epoch(1)
    expected = epoch_inputs(reference)[SKIPPED:]

    loader = make_trainer(tmp_path / "resumed", [CheckpointCallback()]).get_train_dataloader()
    if order == "set_epoch_then_skip":
        loader.set_epoch(1)
        skipped = transformers.trainer.skip_first_batches(loader, SKIPPED)  # the name the Trainer calls
    else:
        skipped = transformers.trainer.skip_first_batches(loader, SKIPPED)
        skipped.set_epoch(1)
    actual = epoch_inputs(skipped)

    assert len(actual) == len(expected)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True))


def test_attach_refuses_a_transformers_older_than_supported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = trainer_hooks.installed_version
    monkeypatch.setattr(trainer_hooks, "installed_version",
                        lambda package: trainer_hooks.Version("4.46.3") if package == "transformers" else real(package))
    with pytest.raises(RuntimeError, match=r"needs transformers>=4\.50\.0; transformers 4\.46\.3 is installed"):
        make_trainer(tmp_path, [CheckpointCallback()])
