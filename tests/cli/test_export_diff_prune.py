"""`ckpt-callbacks export`, `diff` and `prune` on real checkpoints; what they write and delete."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_callbacks.core.storage.store import LocalStore

from .conftest import ManagerRuns, run_cli


def load_export(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def test_export_writes_sharded_safetensors_with_an_index(manager_runs: ManagerRuns, tmp_path: Path) -> None:
    out = tmp_path / "export"
    result = run_cli("export", manager_runs.run("safetensors") / "checkpoint-30", out, "--max-shard-size", "200")
    assert result.code == 0, result.err
    assert result.out.startswith(f"exported 4 tensors (332 B) of checkpoint-30 (ckpt_callbacks/safetensors) to {out}")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert len(set(index["weight_map"].values())) > 1
    exported = load_export(out)
    assert exported.keys() == manager_runs.weights[30].keys()
    assert all(torch.equal(exported[name], manager_runs.weights[30][name]) for name in exported)


def test_export_of_a_stock_trainer_checkpoint_loads_with_from_pretrained(trained: Path, tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    source = trained / "hf-stock" / "checkpoint-4"
    out = tmp_path / "export"
    result = run_cli("export", source, out, "--max-shard-size", "10kB", "--json")
    assert result.code == 0, result.err
    files = {f["name"] for f in result.json()["files"]}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= files
    model = GPT2LMHeadModel.from_pretrained(out)
    saved = load_file(source / "model.safetensors")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in saved.items())


def test_export_of_a_lightning_ckpt_strips_the_prefix_only_when_asked(trained: Path, tmp_path: Path) -> None:
    ckpt = trained / "lightning-stock" / "epoch=0-step=4.ckpt"
    state_dict = torch.load(ckpt, weights_only=True)["state_dict"]
    assert run_cli("export", ckpt, tmp_path / "as-is").code == 0
    assert load_export(tmp_path / "as-is").keys() == state_dict.keys()
    assert run_cli("export", trained / "lightning-plugin" / "checkpoint-4", tmp_path / "stripped",
                   "--strip-prefix", "model.").code == 0
    stripped = load_export(tmp_path / "stripped")
    assert sorted(stripped) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert all(torch.equal(stripped[name], state_dict[f"model.{name}"]) for name in stripped)
    wrong = run_cli("export", ckpt, tmp_path / "wrong", "--strip-prefix", "net.")
    assert wrong.code == 2
    assert "--strip-prefix 'net.': 4 of 4 tensor names do not start with it (e.g. 'model.0.weight')" in wrong.err
    assert not (tmp_path / "wrong").exists()


def test_export_never_replaces_a_folder_unless_asked(manager_runs: ManagerRuns, tmp_path: Path) -> None:
    """An earlier export is replaced only with --overwrite; a folder no export wrote never is (issue 16)."""
    checkpoint = manager_runs.run("safetensors") / "checkpoint-30"
    out = tmp_path / "out"
    assert run_cli("export", manager_runs.run("safetensors") / "checkpoint-20", out).code == 0
    refused = run_cli("export", checkpoint, out)
    assert refused.code == 2 and "is not empty. Choose a new folder, or pass --overwrite" in refused.err
    assert torch.equal(load_export(out)["0.weight"], manager_runs.weights[20]["0.weight"])
    assert run_cli("export", checkpoint, out, "--overwrite").code == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["model.safetensors"]
    assert torch.equal(load_export(out)["0.weight"], manager_runs.weights[30]["0.weight"])
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    for extra in ((), ("--overwrite",)):
        kept = run_cli("export", checkpoint, users, *extra)
        assert kept.code == 2 and "was not written by an export of ckpt-callbacks" in kept.err, kept.err
        assert "never replaced, --overwrite or not" in kept.err
    assert sorted(p.name for p in users.iterdir()) == ["notes.txt"] and (users / "notes.txt").read_text() == "keep me"
    into_itself = run_cli("export", checkpoint, checkpoint.parent, "--overwrite")
    assert into_itself.code == 2 and "holds the checkpoint being exported" in into_itself.err
    bad_size = run_cli("export", checkpoint, tmp_path / "other", "--max-shard-size", "lots")
    assert bad_size.code == 2 and "--max-shard-size 'lots' is not a size" in bad_size.err


def test_diff_lists_the_tensors_that_differ_with_their_max_abs_difference(manager_runs: ManagerRuns) -> None:
    run = manager_runs.run("safetensors")
    result = run_cli("diff", run / "checkpoint-20", run / "checkpoint-30", "--json")
    assert result.code == 1
    report = result.json()
    expected = {name: float((manager_runs.weights[20][name].double() - manager_runs.weights[30][name].double()).abs().max())
                for name in manager_runs.weights[30]}
    assert {d["name"]: d["max_abs_diff"] for d in report["differ"]} == pytest.approx(expected)
    assert report["identical"] is False and report["equal"] == 0
    text = run_cli("diff", run / "checkpoint-20", run / "checkpoint-30")
    assert re.search(r"^0\.weight\s+8x6\s+float32\s+\d\.\d+", text.out, re.M)
    same = run_cli("diff", run / "checkpoint-30", manager_runs.run("hf") / "checkpoint-30")
    assert same.code == 0 and "identical: 4 tensor(s) compared, 0 differ, 4 equal" in same.out


def test_diff_names_missing_and_reshaped_tensors_and_honours_atol(tmp_path: Path) -> None:
    torch.save({"a": torch.zeros(2), "b": torch.zeros(3), "gone": torch.zeros(1)}, tmp_path / "a.pt")
    torch.save({"a": torch.full((2,), 0.5), "b": torch.zeros(4), "new": torch.zeros(1)}, tmp_path / "b.pt")
    report = run_cli("diff", tmp_path / "a.pt", tmp_path / "b.pt", "--json").json()
    assert report["differ"] == [{"name": "a", "shape": [2], "dtype": "float32", "max_abs_diff": 0.5}]
    assert report["mismatched"] == [{"name": "b", "a": "3 float32", "b": "4 float32"}]
    assert (report["only_in_a"], report["only_in_b"]) == (["gone"], ["new"])
    tolerant = run_cli("diff", tmp_path / "a.pt", tmp_path / "b.pt", "--atol", "0.5")
    assert "shape or dtype differs: b: 3 float32 in A, 4 float32 in B" in tolerant.out
    assert "only in A: gone" in tolerant.out and "1 tensor(s) compared, 0 differ, 1 equal" in tolerant.out


def test_prune_keeps_the_newest_and_the_best(manager_runs: ManagerRuns, copy_of: Callable[[Path], Path]) -> None:
    run = copy_of(manager_runs.run("safetensors"))
    dry = run_cli("prune", run, "--keep-last", "2", "--dry-run", "--json").json()
    assert (dry["deleted"], dry["kept"]) == ([10], [20, 30])
    assert (run / "checkpoint-10").is_dir()
    result = run_cli("prune", run, "--keep-last", "1")
    assert result.code == 0
    assert result.out == "deleted: checkpoint-10\nkept: checkpoint-20, checkpoint-30\n"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]


def test_prune_ranks_by_the_metric_asked_for(manager_runs: ManagerRuns, copy_of: Callable[[Path], Path]) -> None:
    run = copy_of(manager_runs.run("torch"))
    report = run_cli("prune", run, "--keep-last", "1", "--metric", "eval_loss", "--greater-is-better", "--json").json()
    assert (report["deleted"], report["kept"]) == ([20], [10, 30])


def test_prune_refuses_while_a_training_process_writes_the_folder(
    manager_runs: ManagerRuns, copy_of: Callable[[Path], Path]
) -> None:
    run = copy_of(manager_runs.run("hf"))
    writer = LocalStore(run)
    writer.acquire_writer_lock()
    try:
        result = run_cli("prune", run, "--keep-last", "1")
    finally:
        writer.release_writer_lock()
    assert result.code == 1
    assert "is being written by a running training process" in result.err
    assert len(list(run.glob("checkpoint-*"))) == 3
    assert run_cli("prune", run).code == 2


def test_export_targets_the_core_refuses_are_refused_through_links_and_dots(
    manager_runs: ManagerRuns, copy_of: Callable[[Path], Path]
) -> None:
    run = copy_of(manager_runs.run("safetensors"))
    link = run.parent / "link-to-run"
    link.symlink_to(run, target_is_directory=True)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    for out in (link, link / "checkpoint-10", run / ".." / run.name / "checkpoint-20" / "export", run.parent):
        result = run_cli("export", run / "checkpoint-30", out, "--overwrite")
        assert result.code == 2, (out, result.err)
        assert "Traceback" not in result.err
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    beside = run_cli("export", run / "checkpoint-30", run / "export")  # the default export folder is fine
    assert beside.code == 0, beside.err
