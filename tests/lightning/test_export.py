"""Export at train end: sharded safetensors + index for any module, `from_pretrained` form for a wrapped HF model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.lightning.helpers import (
    Namespace,
    seed_everything,
    tensors_equal,
    train_loader,
    val_loader,
    weights_of,
)


def test_plain_module_exports_sharded_safetensors_with_an_index(ns: Namespace, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    seed_everything(0)
    module = ns.Tiny()
    plugin, callback = ns.ours(tmp_path, export_at_end=True, max_shard_size="600")
    ns.trainer(tmp_path, callbacks=[callback], plugins=[plugin], max_epochs=1).fit(module, train_loader(), val_loader())

    export = tmp_path / "checkpoints" / "export"
    index = json.loads((export / "model.safetensors.index.json").read_text())
    shards = sorted({name for name in index["weight_map"].values()})
    assert len(shards) > 1 and all((export / shard).is_file() for shard in shards)
    exported = {k: v for shard in shards for k, v in load_file(export / shard).items()}
    assert tensors_equal(exported, weights_of(module))


def hf_module_class(ns: Namespace) -> Any:
    transformers = pytest.importorskip("transformers")

    class CausalLM(ns.pl.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                             bos_token_id=0, eos_token_id=0)
            self.model = transformers.GPT2LMHeadModel(config)  # input and output embeddings are tied

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            (ids,) = batch
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    return CausalLM


def test_wrapped_hugging_face_model_exports_in_from_pretrained_form(ns: Namespace, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    seed_everything(0)
    module = hf_module_class(ns)()
    tokens = DataLoader(TensorDataset(torch.randint(0, 50, (8, 12))), batch_size=4)
    plugin, callback = ns.ours(tmp_path, export_at_end=True, save_steps=2)
    ns.trainer(tmp_path, callbacks=[callback], plugins=[plugin], max_epochs=1).fit(module, tokens)

    export = tmp_path / "checkpoints" / "export"
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(export))
    assert tensors_equal(weights_of(reloaded), weights_of(module.model))
