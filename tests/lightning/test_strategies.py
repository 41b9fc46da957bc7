"""Which Lightning strategies the adapter serves, and how; the others are refused at setup, never accepted silently."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest

from ckpt_callbacks.lightning.sharded import strategy_support
from tests.lightning.helpers import Namespace, train_loader, val_loader


def strategies(ns: Namespace) -> Any:
    return importlib.import_module(f"{ns.name}.strategies")


def test_single_device_and_ddp_write_through_the_plugin(ns: Namespace) -> None:
    for strategy in (strategies(ns).SingleDeviceStrategy(), strategies(ns).DDPStrategy()):
        support = strategy_support(strategy)
        assert not support.loads_itself and not support.sharded, type(strategy).__name__


def test_model_parallel_and_fsdp_load_themselves_and_save_themselves_when_sharded(ns: Namespace) -> None:
    module = strategies(ns)
    sharded = strategy_support(module.ModelParallelStrategy())
    assert sharded.loads_itself and sharded.sharded and sharded.model_key == "state_dict"
    assert sharded.metadata_file == "meta.pt"
    full = strategy_support(module.ModelParallelStrategy(save_distributed_checkpoint=False))
    assert full.loads_itself and not full.sharded
    fsdp = strategy_support(module.FSDPStrategy(state_dict_type="sharded"))
    assert fsdp.loads_itself and fsdp.sharded and fsdp.model_key == "model"
    assert not strategy_support(module.FSDPStrategy(state_dict_type="full")).sharded


@pytest.mark.parametrize("name", ["DeepSpeedStrategy", "XLAStrategy"])
def test_strategies_that_write_their_own_checkpoints_otherwise_are_refused_naming_the_alternative(
    ns: Namespace, name: str,
) -> None:
    cls = getattr(strategies(ns), name)
    strategy = cls.__new__(cls)  # their constructors need deepspeed / torch_xla; the refusal reads only the class
    with pytest.raises(ValueError, match=rf"cannot serve {name}: it writes its checkpoints itself") as refused:
        strategy_support(strategy)
    assert "Use ModelParallelStrategy" in str(refused.value) and f"keep {name}'s own checkpointing" in str(refused.value)


def test_a_trainer_with_such_a_strategy_is_refused_at_setup_before_training(ns: Namespace, tmp_path: Path) -> None:
    class OwnFiles(strategies(ns).SingleDeviceStrategy):  # type: ignore[misc,name-defined]
        def save_checkpoint(self, checkpoint: Any, filepath: Any, storage_options: Any = None) -> None:
            raise AssertionError("never reached: refused before training")

    plugin, callback = ns.ours(tmp_path)
    trainer = ns.trainer(tmp_path, callbacks=[callback], plugins=[plugin], strategy=OwnFiles(device="cpu"),
                         max_epochs=1)
    module = ns.Tiny()
    with pytest.raises(ValueError, match=r"cannot serve OwnFiles: it writes its checkpoints itself \(.*OwnFiles"):
        trainer.fit(module, train_loader(), val_loader())
    assert module.seen == [] and not (tmp_path / "checkpoints").exists()
