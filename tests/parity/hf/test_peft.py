"""Parity for PEFT models (real `peft` LoRA on the tiny GPT-2): the stock Trainer saves adapters only
(`adapter_model.safetensors` + `adapter_config.json`, a subfolder per extra adapter), which
`PeftModel.from_pretrained(base, checkpoint)` and `AutoPeftModelForCausalLM.from_pretrained(checkpoint)` load."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from transformers import GPT2LMHeadModel

from tests.hf.conftest import tiny_gpt2
from tests.parity.hf.differential import (
    ADDED_CHECKPOINT_FILES,
    Observation,
    Run,
    Scripted,
    assert_same_checkpoint_contents,
    assert_same_checkpoint_files,
    assert_same_file,
    assert_same_final_model,
    assert_same_observations,
    assert_same_tensors,
    assert_same_values,
    both,
)

GPT2_LORA = dict(fan_in_fan_out=True, lora_dropout=0.1, task_type="CAUSAL_LM")  # GPT-2 uses Conv1D layers


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 saved once: adapters record it as `base_model_name_or_path`, which AutoPeftModel loads."""
    path = tmp_path_factory.mktemp("base")
    tiny_gpt2(0).save_pretrained(path)
    return path


def base_model(base_dir: Path) -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(base_dir)


def lora_factory(base_dir: Path, adapters: int = 1) -> Callable[[int], torch.nn.Module]:
    """LoRA on attention (`default`, trained); with `adapters=2` a second, inactive adapter on the MLP as well."""
    def lora(seed: int) -> torch.nn.Module:
        base = base_model(base_dir)
        torch.manual_seed(seed)  # the LoRA initialization
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], **GPT2_LORA))
        if adapters == 2:
            model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"], **GPT2_LORA))
        return model
    return lora


def loaded_with_peft(base_dir: Path, folder: Path, adapters: int = 1) -> dict[str, torch.Tensor]:
    """What `PeftModel.from_pretrained(base, folder)` (plus `load_adapter` of the second) gives, as a state dict."""
    model = PeftModel.from_pretrained(base_model(base_dir), folder)
    if adapters == 2:
        model.load_adapter(folder / "second", adapter_name="second")
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def lora_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in weights.items() if "lora_" in name}


def assert_resumed_exactly(resumed: Observation, uninterrupted: Observation) -> None:
    assert resumed.weights is not None and uninterrupted.weights is not None
    assert_same_tensors(resumed.weights, uninterrupted.weights, f"{resumed.half}: resumed vs uninterrupted weights")
    assert_same_values(resumed.optimizer, uninterrupted.optimizer, f"{resumed.half}: resumed vs uninterrupted optimizer")


def checkpoint_bytes(observation: Observation, name: str) -> int:
    folder = observation.checkpoint(name)
    return sum((folder / file).stat().st_size for file in observation.checkpoints[name] - ADDED_CHECKPOINT_FILES)


@pytest.mark.parametrize("adapters", [1, 2], ids=["lora", "two-adapters"])
def test_peft_checkpoints_hold_the_stock_adapter_files_and_load_with_peft(base_dir: Path, tmp_path: Path,
                                                                            adapters: int) -> None:
    stock, ours = both(tmp_path, lambda run: run.train(model=lora_factory(base_dir, adapters)))

    assert {"adapter_model.safetensors", "adapter_config.json"} <= stock.checkpoints["checkpoint-4"]
    assert "model.safetensors" not in stock.checkpoints["checkpoint-4"]
    assert_same_observations(stock, ours)
    for name in stock.checkpoints:  # ours is at most 10% larger (the issue: 3.6x with full weights)
        ours_bytes, stock_bytes = checkpoint_bytes(ours, name), checkpoint_bytes(stock, name)
        assert ours_bytes <= 1.1 * stock_bytes, f"{name}: ours {ours_bytes} bytes, stock {stock_bytes}"
    for name in sorted(stock.checkpoints):
        from_stock = loaded_with_peft(base_dir, stock.checkpoint(name), adapters)
        from_ours = loaded_with_peft(base_dir, ours.checkpoint(name), adapters)
        assert_same_tensors(from_ours, from_stock, f"PeftModel.from_pretrained({name})")
        auto = AutoPeftModelForCausalLM.from_pretrained(ours.checkpoint(name))
        assert_same_tensors(lora_weights(auto.state_dict()), lora_weights(from_stock) if adapters == 1 else
                            {k: v for k, v in lora_weights(from_stock).items() if ".second." not in k},
                            f"AutoPeftModelForCausalLM.from_pretrained({name})")
    assert ours.weights is not None
    assert_same_tensors(lora_weights(loaded_with_peft(base_dir, ours.checkpoint(15), adapters)),
                        lora_weights(ours.weights), "checkpoint-15 holds the final adapter weights")


def test_peft_load_best_model_at_end_loads_the_best_adapter_as_stock(base_dir: Path, tmp_path: Path) -> None:
    scores = {4: 3.0, 8: 1.0, 12: 2.0, 15: 2.5}  # the best is checkpoint-8

    def scenario(run: Run) -> None:
        run.train(model=lora_factory(base_dir), compute_metrics=Scripted("scripted_loss", scores),
                  metric_for_best_model="scripted_loss", load_best_model_at_end=True, save_total_limit=2,
                  eval_strategy="steps", eval_steps=4, save_steps=4)

    stock, ours = both(tmp_path, scenario)

    assert stock.weights is not None and stock.best[1] == 8  # the stock half: the best adapter is loaded
    assert_same_tensors(lora_weights(stock.weights),
                        lora_weights(loaded_with_peft(base_dir, stock.checkpoint(8))), "stock: best adapter loaded")
    assert_same_observations(stock, ours)


def test_peft_resume_ends_as_stock_and_as_uninterrupted(base_dir: Path, tmp_path: Path) -> None:
    def interrupted_then_resumed(run: Run) -> None:
        run.train(model=lora_factory(base_dir), crash_at=10)
        run.train(model=lora_factory(base_dir), model_seed=123, resume_from_checkpoint=True)

    stock_full, ours_full = both(tmp_path / "full", lambda run: run.train(model=lora_factory(base_dir)))
    stock, ours = both(tmp_path / "resumed", interrupted_then_resumed)

    assert_resumed_exactly(stock, stock_full)  # the stock half's own expectation
    assert_same_observations(stock, ours)
    assert_resumed_exactly(ours, ours_full)


def test_peft_export_loads_with_peft_and_holds_the_final_adapter(base_dir: Path, tmp_path: Path) -> None:
    """The export (`export_at_end`, on by default) of a PEFT model is an adapter folder, as stock
    `trainer.save_model(dir)` writes, loadable by `PeftModel.from_pretrained` and `AutoPeftModelForCausalLM`."""
    def scenario(run: Run) -> None:
        trainer = run.train(model=lora_factory(base_dir))
        if not run.with_callback:
            trainer.save_model(str(run.output_dir / "export"))  # what a stock user does for serving

    stock, ours = both(tmp_path, scenario)

    stock_export, ours_export = stock.output_dir / "export", ours.output_dir / "export"
    ours_files = {path.name for path in ours_export.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= ours_files
    assert not any(name.startswith("model") for name in ours_files), ours_files  # no full weights
    assert_same_tensors(loaded_with_peft(base_dir, ours_export), loaded_with_peft(base_dir, stock_export), "export")
    auto: Any = AutoPeftModelForCausalLM.from_pretrained(ours_export)
    assert ours.weights is not None
    assert_same_tensors(lora_weights(auto.state_dict()), lora_weights(ours.weights), "AutoPeftModel export")


def test_peft_load_best_model_at_end_given_to_the_callback_only_loads_the_best_adapter(base_dir: Path,
                                                                                          tmp_path: Path) -> None:
    """The flags moved from TrainingArguments to the callback: the callback loads the best adapter itself (into
    the live PeftModel, through peft), ending with the weights stock ends with. The checkpoints' files are the
    same, contents included (`training_args.bin` records the flags the run saved with); `trainer_state.json`
    is not compared: the Trainer tracks no best without a metric of its own."""
    scores = {4: 3.0, 8: 1.0, 12: 2.0, 15: 2.5}
    flags = dict(metric_for_best_model="scripted_loss", load_best_model_at_end=True)

    def scenario(run: Run) -> None:
        options: dict[str, Any] = dict(model=lora_factory(base_dir), compute_metrics=Scripted("scripted_loss", scores),
                                       eval_strategy="steps", eval_steps=4, save_steps=4)
        if run.with_callback:
            run.train(callback_flags=flags, **options)
        else:
            run.train(**flags, **options)

    stock, ours = both(tmp_path, scenario)

    assert stock.best[1] == 8
    assert_same_checkpoint_files(stock, ours)
    assert_same_checkpoint_contents(stock, ours)
    assert_same_final_model(stock, ours)
    assert ours.weights is not None
    assert_same_tensors(lora_weights(ours.weights), lora_weights(loaded_with_peft(base_dir, ours.checkpoint(8))),
                        "ours: the best adapter loaded")


def test_peft_export_of_two_adapters_holds_the_files_stock_save_model_writes(base_dir: Path, tmp_path: Path) -> None:
    """With a second adapter, the export holds what `trainer.save_model(dir)` writes: the second adapter in its
    own folder, the same configs and model card; both adapters load back with the final weights."""
    def scenario(run: Run) -> None:
        trainer = run.train(model=lora_factory(base_dir, adapters=2))
        if not run.with_callback:
            trainer.save_model(str(run.output_dir / "export"))

    stock, ours = both(tmp_path, scenario)

    stock_export, ours_export = stock.output_dir / "export", ours.output_dir / "export"

    def files(folder: Path) -> set[str]:
        return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}

    # training_args.bin is not part of an export; the marker file is the export's own (documented).
    assert files(ours_export) - {".ckpt_callbacks-export.json"} == files(stock_export) - {"training_args.bin"}
    for name in ("README.md", "adapter_config.json", "second/adapter_config.json"):
        assert_same_file(stock_export / name, ours_export / name, stock, ours)
    assert_same_tensors(loaded_with_peft(base_dir, ours_export, 2), loaded_with_peft(base_dir, stock_export, 2),
                        "export")
