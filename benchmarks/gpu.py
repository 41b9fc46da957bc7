"""(11) On a GPU: pinned staging at the link's bandwidth, the stall per save against DCP, and a bitwise resume.

Skipped (reported as such) without CUDA. With a GPU, for a GPT-2 + AdamW state on the device:

- the link: a 1 GiB device-to-host copy into pinned memory (non-blocking, one synchronize), and our staging of
  the whole state into its reused pinned buffers (`HostStager`, non-blocking copies, one synchronize): GB/s,
  target >= 80% of the link;
- the training stall per save: ours (`save()` copying before it returns; and `defer_staging=True`, the copy
  overlapping the next forward/backward, waited for before the optimizer step) against DCP `async_save` with a
  reused `DefaultStager` (pinned memory, non-blocking copies, background staging, waited for before the
  optimizer step): the extra time of a training step that saves, against one that does not;
- a bitwise resume with CUDA RNG: a run with dropout saves at step K and goes on to step N; a fresh process
  loads checkpoint-K (CUDA RNG included) and trains to N; every weight and the CUDA RNG state must be equal
  (deterministic algorithms on, `CUBLAS_WORKSPACE_CONFIG=:4096:8`).

`CKPT_BENCH_GPU_ON_CPU=1` runs the same code on the CPU (pageable memory), to check the script where there is
no GPU; its figures mean nothing for a GPU.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    gb,
    gpt2,
    in_fresh_process,
    medians,
    quiet,
    ratio,
    row,
    scratch,
    single_process_group,
    tokens,
)
from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.core.save.staging import HostStager

ON_CPU = os.environ.get("CKPT_BENCH_GPU_ON_CPU") == "1"
RESUME_STEPS, RESUME_SAVE_AT = 6, 3


def device() -> torch.device:
    return torch.device("cpu" if ON_CPU else "cuda")


def run(size: str, repeats: int) -> dict[str, Any]:
    if not torch.cuda.is_available() and not ON_CPU:
        return {"scenario": "gpu", "size": size, "skipped": "no CUDA device on this machine"}
    model = gpt2(size).to(device())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _step(model, optimizer, 0)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    nbytes = sum(t.numel() * t.element_size() for t in _tensors(state))
    rows = [row("link: 1 GiB device-to-host into pinned memory", _link(repeats), unit="GB/s"),
            row("ours: staging the state into reused pinned buffers", _staging(state, nbytes, repeats), unit="GB/s")]
    with scratch("gpu") as root:
        rows += _stalls(model, optimizer, root, repeats)
        rows.append(row("bitwise resume with CUDA RNG (1 = every weight and the RNG state equal)",
                        [float(_bitwise_resume(size, root / "resume"))], unit="of 1"))
    m = medians(rows)
    return {
        "scenario": "gpu", "title": "(11) GPU: pinned staging, stall per save vs DCP, bitwise resume", "size": size,
        "bytes": nbytes, "rows": rows, "device": "cpu (CKPT_BENCH_GPU_ON_CPU)" if ON_CPU else torch.cuda.get_device_name(),
        "ratios": [
            ratio("staging / link bandwidth", m["ours: staging the state into reused pinned buffers"],
                  m["link: 1 GiB device-to-host into pinned memory"], target=0.8, higher_is_better=True),
            ratio("stall per save: ours (deferred) / DCP async_save", m[f"{OURS_DEFERRED}: stall per save"],
                  m[f"{DCP}: stall per save"], target=1.0),
            ratio("stall per save: ours (copy before returning) / DCP async_save", m[f"{OURS}: stall per save"],
                  m[f"{DCP}: stall per save"]),
        ],
    }


def _tensors(state: Any) -> list[torch.Tensor]:
    """Every distinct tensor of `state` (tied weights once)."""
    found: dict[int, torch.Tensor] = {}
    pending = [state]
    while pending:
        value = pending.pop()
        if isinstance(value, torch.Tensor):
            found.setdefault(value.data_ptr(), value)
        elif isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, (list, tuple)):
            pending.extend(value)
    return list(found.values())


def _synchronize() -> None:
    if not ON_CPU:
        torch.cuda.synchronize()


def _link(repeats: int) -> list[float]:
    source = torch.empty(1 << 30, dtype=torch.uint8, device=device())
    target = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=not ON_CPU)
    speeds = []
    for _ in range(repeats + 1):
        _synchronize()
        started = time.perf_counter()
        target.copy_(source, non_blocking=True)
        _synchronize()
        speeds.append(gb(1 << 30) / (time.perf_counter() - started))
    return speeds[1:]


def _staging(state: dict[str, Any], nbytes: int, repeats: int) -> list[float]:
    stager = HostStager(pin_memory=not ON_CPU, skip_unchanged=False)
    stager.stage(state, prefix=("state",))  # allocates the pinned buffers once
    speeds = []
    for _ in range(repeats):
        _synchronize()
        started = time.perf_counter()
        stager.stage(state, prefix=("state",))
        speeds.append(gb(nbytes) / (time.perf_counter() - started))
    return speeds


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int, before_update: Any = None) -> None:
    batch = tokens(4, 128, seed=seed).to(device())
    model(input_ids=batch, labels=batch).loss.backward()
    if before_update is not None:
        before_update()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _synchronize()


OURS = "ours, save() (copy before returning)"
OURS_DEFERRED = "ours, save(defer_staging=True)"
DCP = "DCP async_save, reused DefaultStager (pinned, non-blocking, background staging)"


def _stalls(model: torch.nn.Module, optimizer: torch.optim.Optimizer, root: Path, repeats: int) -> list[dict[str, Any]]:
    """Per variant: the extra seconds of a training step that saves (the save, then the step's wait before its
    optimizer update), against a plain step measured just before it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict import get_state_dict

    single_process_group()
    manager = CheckpointManager(CheckpointArguments(output_dir=str(root / "ours")))
    stager = DefaultStager(StagingOptions(use_pinned_memory=not ON_CPU, use_shared_memory=False, use_async_staging=True,
                                          use_non_blocking_copy=not ON_CPU))
    pending: list[Any] = []

    def ours(step: int) -> Any:
        manager.save(step, {"model": model, "optimizer": optimizer})
        return None

    def ours_deferred(step: int) -> Any:
        manager.save(step, {"model": model, "optimizer": optimizer}, defer_staging=True)
        return manager.wait_for_staging

    def dcp_save(step: int) -> Any:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        response = dcp.async_save({"model": model_state, "optim": optimizer_state},
                                  checkpoint_id=str(root / "dcp" / f"step-{step}"), async_stager=stager)
        pending.append(response.upload_completion)  # type: ignore[union-attr]
        return response.staging_completion.result  # type: ignore[union-attr]

    stalls: dict[str, list[float]] = {OURS: [], OURS_DEFERRED: [], DCP: []}
    savers = {OURS: ours, OURS_DEFERRED: ours_deferred, DCP: dcp_save}
    step = 1
    for repeat in range(repeats + 1):
        for name, save in savers.items():
            started = time.perf_counter()
            _step(model, optimizer, step)
            plain = time.perf_counter() - started
            step += 1
            started = time.perf_counter()
            wait = save(step)
            _step(model, optimizer, step, before_update=wait)
            saving = time.perf_counter() - started
            step += 1
            manager.wait()
            while pending:
                pending.pop().result()
            if repeat:
                stalls[name].append(saving - plain)
    manager.close()
    stager.close()
    return [row(f"{name}: stall per save", values) for name, values in stalls.items()]


def _bitwise_resume(size: str, folder: Path) -> bool:
    full = in_fresh_process("benchmarks.gpu", "train", size, str(folder / "full"), "0")
    resumed = in_fresh_process("benchmarks.gpu", "train", size, str(folder / "full"), str(RESUME_SAVE_AT))
    return bool(full == resumed)


def _train_here(size: str, output_dir: str, resume_from: int) -> str:
    """Train to RESUME_STEPS (saving at RESUME_SAVE_AT), or resume from that checkpoint; a digest of the weights
    and the device RNG state at the end."""
    quiet()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    model = gpt2(size).to(device())  # dropout 0.1: the device RNG matters
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    manager = CheckpointManager(CheckpointArguments(output_dir=output_dir, async_save=True))
    start = 1
    if resume_from:
        manager.load(resume_from, {"model": model, "optimizer": optimizer})
        start = resume_from + 1
    for step in range(start, RESUME_STEPS + 1):
        _step(model, optimizer, step)
        if not resume_from and step == RESUME_SAVE_AT:
            manager.save(step, {"model": model, "optimizer": optimizer})
    manager.close()
    import hashlib

    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    rng = torch.get_rng_state() if ON_CPU else torch.cuda.get_rng_state()
    digest.update(rng.numpy().tobytes())
    return digest.hexdigest()


if __name__ == "__main__":
    if sys.argv[1] == "train":
        print(json.dumps(_train_here(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
