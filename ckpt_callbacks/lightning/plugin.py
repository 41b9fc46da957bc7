"""Lightning's `CheckpointIO` contract mapped onto the core, for either Lightning namespace.

`CheckpointIOLogic` holds the behaviour; `ckpt_callbacks.lightning` and
`ckpt_callbacks.pytorch_lightning` combine it with their namespace's
`CheckpointIO` base class. It imports no Lightning module itself.

Two kinds of paths arrive here:

- `{run}/checkpoint-{step}/checkpoint.ckpt` (what `CheckpointCallback` asks
  for) goes to the run's `RunController`: a staged folder with `manifest.json`,
  committed by rename, retention applied, asynchronous when configured. The
  file inside is one plain torch zip, so stock loaders read the path as is.
- any other path (stock `ModelCheckpoint`, `trainer.save_checkpoint("x.ckpt")`)
  stays a single file, written atomically with its manifest inside it, and
  complete when `save_checkpoint` returns, exactly as with `TorchCheckpointIO`
  (`ModelCheckpoint` looks at the file system right after a save).

Loading verifies first and always uses `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt_callbacks.config import CheckpointArguments
from ckpt_callbacks.core.distributed.collective import SingleProcess
from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.format.single_file import load_torch_file, remove_file, save_torch_file
from ckpt_callbacks.core.manager import CheckpointManager
from ckpt_callbacks.errors import CheckpointError

if TYPE_CHECKING:
    from ckpt_callbacks.core.run import RunController

logger = logging.getLogger("ckpt_callbacks")

CHECKPOINT_FILE = layout.LIGHTNING_CHECKPOINT_FILE
ENGINE = "torch"


def committed_checkpoint_path(output_dir: str | os.PathLike[str], step: int) -> str:
    """The path `CheckpointCallback` saves to, which the plugin commits as folder `checkpoint-{step}`."""
    return os.path.join(os.fspath(output_dir), layout.checkpoint_name(step), CHECKPOINT_FILE)


def parse_committed_path(path: str | os.PathLike[str]) -> tuple[Path, int, str] | None:
    """(run folder, step, file name) for `{run}/checkpoint-{step}/{file}`, None for any other path."""
    target = Path(path)
    step = layout.parse_checkpoint_step(target.parent.name)
    if step is None or not target.name or target.name.startswith("."):
        return None
    return target.parent.parent, step, target.name


def make_run_manager(args: CheckpointArguments, output_dir: str | os.PathLike[str]) -> CheckpointManager:
    """The manager of one run folder as the Lightning adapter uses it.

    Lightning calls `CheckpointIO` on global rank 0 only, so the manager must not run collectives.
    """
    # save_only_model is Lightning's weights_only dict here: the manager must keep the one piece it is given.
    run_args = args.replace(output_dir=os.fspath(output_dir), engine=None, save_only_model=False)
    return CheckpointManager(run_args, engine=ENGINE, collective=SingleProcess())


class CheckpointIOLogic:
    """Atomic, verified `CheckpointIO` (both the 2.5 and 2.6 signatures), asynchronous for the saves a
    `CheckpointCallback` schedules.

    Args:
        args: `verify_on_load` applies to every path; `async_save` and the rest (retention, metric) to run folders
            that no `CheckpointCallback` registered. A callback's own arguments govern its run folder.
    """

    def __init__(self, args: CheckpointArguments | None = None, **overrides: Any) -> None:
        args = args if args is not None else CheckpointArguments()
        self.args = args.replace(**overrides) if overrides else args
        self._runs: dict[Path, RunController] = {}
        self._managers: dict[Path, CheckpointManager] = {}  # run folders no callback registered
        self._expected_epoch: dict[str, float | None] = {}

    def register_run(self, run: RunController) -> None:
        """Route saves into `run`'s folder through `run` (its retention, metric and async settings)."""
        self._runs[_run_key(run.manager.store.root)] = run

    def expect_save(self, path: str | os.PathLike[str], *, epoch: float | None) -> None:
        """The (fractional) epoch the manifest of the coming save to `path` records (Lightning's dict rounds it).

        Lightning calls `save_checkpoint` on global rank 0 only; on other ranks the note is simply replaced by
        the next one."""
        self._expected_epoch = {os.path.normpath(os.fspath(path)): epoch}

    def run_manager(self, output_dir: str | os.PathLike[str]) -> CheckpointManager:
        key = _run_key(output_dir)
        if key in self._runs:
            return self._runs[key].manager
        if key not in self._managers:
            self._managers[key] = make_run_manager(self.args, output_dir)
        return self._managers[key]

    # ------------------------------------------------------------------ CheckpointIO

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"CheckpointIOPlugin.save_checkpoint got storage_options={storage_options!r}, which it does not use. "
                "Pass storage options through CheckpointArguments, or drop them."
            )
        _refuse_remote(path)
        step = int(checkpoint.get("global_step", 0))
        epoch = self._expected_epoch.pop(os.path.normpath(os.fspath(path)), _epoch_of(checkpoint))
        committed = parse_committed_path(path)
        if committed is None:
            save_torch_file(checkpoint, path, step=step, epoch=epoch)
            return
        run_dir, step, name = committed
        run = self._runs.get(_run_key(run_dir))
        if run is not None:
            run.save(step, {name: checkpoint}, epoch=epoch, capture_rng=False)  # RNG is in Lightning's dict
        else:
            self.run_manager(run_dir).save(step, {name: checkpoint}, epoch=epoch, capture_rng=False)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        # Lightning 2.5 passes (path, map_location); 2.6 adds weights_only. Either way only tensors and plain values
        # are loaded (loading never executes code from a checkpoint), so weights_only=False is not honoured.
        _refuse_remote(path)
        committed = parse_committed_path(path)
        if committed is not None and (committed[0] / layout.checkpoint_name(committed[1]) / layout.MANIFEST_NAME).is_file():
            loaded = self._load_committed(*committed, map_location=map_location)
        else:
            loaded = load_torch_file(path, verify=self.args.verify_on_load, map_location=map_location)
        if not isinstance(loaded, dict):
            raise CheckpointError(f"{path}: holds a {type(loaded).__name__}, not a Lightning checkpoint dict.",
                                  path=str(path))
        return loaded

    def remove_checkpoint(self, path: Any) -> None:
        committed = parse_committed_path(path)
        if committed is None:
            remove_file(path)
            return
        run_dir, step, _ = committed
        self.run_manager(run_dir).delete(step)

    def teardown(self) -> None:
        """Flush every pending write and release the run folders; raise the first failure.

        Lightning may use the plugin again afterwards (another `fit`, or a callback's teardown): writers restart
        lazily, so that is fine.
        """
        errors: list[BaseException] = []
        managers = [run.manager for run in self._runs.values()] + list(self._managers.values())
        for manager in managers:
            try:
                manager.close()
            except BaseException as exc:  # every writer must be flushed before the first failure is raised
                errors.append(exc)
        if errors:
            raise errors[0]

    # ---------------------------------------------------------------- internals

    def _load_committed(self, run_dir: Path, step: int, name: str, *, map_location: Any) -> Any:
        manager = self.run_manager(run_dir)
        manager.wait()  # the checkpoint may still be in this process's write queue
        folder = run_dir / layout.checkpoint_name(step)
        meta = manager.load(folder, {name: None}, restore_rng=False, map_location=map_location)
        return meta["state"][name]


def _run_key(output_dir: str | os.PathLike[str]) -> Path:
    return Path(output_dir).resolve()


def _refuse_remote(path: Any) -> None:
    if "://" in os.fspath(path) and not os.fspath(path).startswith("file://"):
        raise CheckpointError(
            f"{path}: CheckpointIOPlugin writes and reads local paths only. Use a local output_dir (and sync it), "
            "or Lightning's own TorchCheckpointIO for remote single files.",
            path=os.fspath(path),
        )


def _epoch_of(checkpoint: dict[str, Any]) -> float | None:
    epoch = checkpoint.get("epoch")
    return None if epoch is None else float(epoch)
