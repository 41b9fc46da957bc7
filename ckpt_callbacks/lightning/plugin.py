"""Lightning's `CheckpointIO` contract mapped onto the core, for either Lightning namespace.

`CheckpointIOLogic` holds the behaviour; `ckpt_callbacks.lightning` and
`ckpt_callbacks.pytorch_lightning` combine it with their namespace's
`CheckpointIO` base class. It imports no Lightning module itself.

Two kinds of paths arrive here, local paths or fsspec URLs (`s3://`, `memory://`, ...):

- `{run}/checkpoint-{step}/checkpoint.ckpt` (what `CheckpointCallback` asks
  for) goes to the run's `RunController`: a staged folder with `manifest.json`,
  committed by rename (uploaded manifest-last on an object store), retention
  applied, asynchronous when configured. The file inside is one plain torch zip,
  so stock loaders read the path as is.
- any other path (stock `ModelCheckpoint`, `trainer.save_checkpoint("x.ckpt")`)
  stays a single file, written atomically with its manifest inside it, and
  complete when `save_checkpoint` returns, exactly as with `TorchCheckpointIO`
  (`ModelCheckpoint` looks at the file system right after a save).

Every save the library does not schedule itself is complete when `save_checkpoint` returns; only the saves a
`CheckpointCallback` announces (`expect_save`) are written in the background.

Loading verifies first and always uses `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt_callbacks.config import CheckpointArguments
from ckpt_callbacks.core.distributed.collective import Collective, SingleProcess
from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.format.single_file import is_url, load_torch_file, remove_file, save_torch_file
from ckpt_callbacks.core.manager import CheckpointManager
from ckpt_callbacks.errors import CheckpointError

if TYPE_CHECKING:
    from ckpt_callbacks.core.run import RunController

logger = logging.getLogger("ckpt_callbacks")

CHECKPOINT_FILE = layout.LIGHTNING_CHECKPOINT_FILE
ENGINE = "torch"


def join_path(folder: str | os.PathLike[str], *names: str) -> str:
    """`folder/names...` for a local path or an fsspec URL (whose `//` must survive)."""
    text = os.fspath(folder)
    if is_url(text):
        return "/".join([text.rstrip("/"), *names])
    return os.path.join(text, *names)


def committed_checkpoint_path(output_dir: str | os.PathLike[str], step: int) -> str:
    """The path `CheckpointCallback` saves to, which the plugin commits as folder `checkpoint-{step}`."""
    return join_path(output_dir, layout.checkpoint_name(step), CHECKPOINT_FILE)


def parse_committed_path(path: str | os.PathLike[str]) -> tuple[str, int, str] | None:
    """(run folder, step, file name) for `{run}/checkpoint-{step}/{file}`, None for any other path."""
    text = os.fspath(path)
    if is_url(text):
        folder, _, name = text.rstrip("/").rpartition("/")
        run_dir, _, checkpoint = folder.rpartition("/")
        if "://" not in run_dir:  # `s3://bucket` itself has no run folder above it
            return None
    else:
        target = Path(text)
        name, checkpoint, run_dir = target.name, target.parent.name, str(target.parent.parent)
    step = layout.parse_checkpoint_step(checkpoint)
    if step is None or not name or name.startswith("."):
        return None
    return run_dir, step, name


def make_run_manager(args: CheckpointArguments, output_dir: str | os.PathLike[str], *, engine: str = ENGINE,
                     collective: Collective | None = None) -> CheckpointManager:
    """The manager of one run folder as the Lightning adapter uses it.

    Lightning calls `CheckpointIO` on global rank 0 only, so by default the manager runs no collectives; a sharded
    strategy's saves are collective (every rank writes its shard), with the Trainer's `collective` and the `dcp`
    engine that reads them back.
    """
    # save_only_model is Lightning's weights_only dict here: the manager must keep the one piece it is given.
    run_args = args.replace(output_dir=os.fspath(output_dir), engine=None, save_only_model=False)
    return CheckpointManager(run_args, engine=engine, collective=collective if collective is not None else SingleProcess())


def run_key(output_dir: str | os.PathLike[str]) -> str:
    """One key per run folder, however it is spelled (a URL as given, a local path resolved)."""
    text = os.fspath(output_dir)
    return text.rstrip("/") if is_url(text) else str(Path(text.removeprefix("file://")).expanduser().resolve())


class CheckpointIOLogic:
    """Atomic, verified `CheckpointIO` (both the 2.5 and 2.6 signatures) for local paths and fsspec URLs,
    asynchronous for the saves a `CheckpointCallback` schedules.

    Args:
        args: `verify_on_load` applies to every path; `async_save` to the saves a `CheckpointCallback` schedules
            into a run folder it did not register (a registered run's own arguments govern it). Every other save
            (a stock `ModelCheckpoint`, `trainer.save_checkpoint(path)`) is complete when it returns.
        **overrides: fields of `CheckpointArguments`, e.g. `CheckpointIOPlugin(verify_on_load="size")`; each also
            has its own keyword parameter (see `ckpt_callbacks.lightning.adapter`), so `LightningCLI` and
            jsonargparse accept `init_args: {async_save: false}`.
    """

    def __init__(self, args: CheckpointArguments | None = None, **overrides: Any) -> None:
        args = args if args is not None else CheckpointArguments()
        self.args = args.replace(**overrides) if overrides else args
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._runs: dict[str, RunController] = {}
        self._managers: dict[str, CheckpointManager] = {}  # run folders no callback registered
        self._expected: dict[str, tuple[float | None, dict[str, float]]] = {}

    # Pickling (`torch.save(trainer)`): writers, staging buffers and run controllers are process-local and
    # re-created lazily; what a plugin is configured with travels.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("_runs", "_managers", "_expected"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_runtime()

    def register_run(self, run: RunController) -> None:
        """Route saves into `run`'s folder through `run` (its retention, metric and async settings)."""
        self._runs[run_key(run.manager.store.root)] = run

    def expect_save(self, path: str | os.PathLike[str], *, epoch: float | None,
                    metrics: Mapping[str, float] | None = None) -> None:
        """The coming save to `path` is one the library scheduled (it may be written in the background), and the
        (fractional) epoch and metrics its manifest records (Lightning's dict rounds the epoch).

        Lightning calls `save_checkpoint` on global rank 0 only; on other ranks the note is simply replaced by
        the next one."""
        self._expected = {_path_key(path): (epoch, dict(metrics or {}))}

    def run_manager(self, output_dir: str | os.PathLike[str]) -> CheckpointManager:
        key = run_key(output_dir)
        if key in self._runs:
            return self._runs[key].manager
        if key not in self._managers:
            self._managers[key] = make_run_manager(self.args, output_dir)
        return self._managers[key]

    # ------------------------------------------------------------------ CheckpointIO

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                "`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg is not supported for "
                f"`{type(self).__name__}` (as for TorchCheckpointIO). Pass fsspec options through the environment "
                "(e.g. AWS_ENDPOINT_URL), or drop them."
            )
        step = int(checkpoint.get("global_step", 0))
        expected = self._expected.pop(_path_key(path), None)
        epoch, metrics = expected if expected is not None else (_epoch_of(checkpoint), {})
        committed = parse_committed_path(path)
        if committed is None:
            save_torch_file(checkpoint, path, step=step, epoch=epoch, metrics=metrics)
            return
        run_dir, step, name = committed
        run = self._runs.get(run_key(run_dir))
        if run is not None:
            # RNG is in Lightning's dict
            run.save(step, {name: checkpoint}, epoch=epoch, capture_rng=False, metrics=metrics)
            manager = run.manager
        else:
            manager = self.run_manager(run_dir)
            manager.save(step, {name: checkpoint}, epoch=epoch, metrics=metrics or None, capture_rng=False)
        if expected is None:
            manager.wait()  # a save the library did not schedule: complete when it returns, as TorchCheckpointIO

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        # Lightning 2.5 passes (path, map_location); 2.6 adds weights_only. Either way only tensors and plain values
        # are loaded (loading never executes code from a checkpoint), so weights_only=False is not honoured.
        committed = parse_committed_path(path)
        manager = self.run_manager(committed[0]) if committed is not None else None
        if committed is not None and manager is not None and self._is_committed(manager, committed[1]):
            loaded = self._load_committed(manager, *committed, map_location=map_location)
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

    @staticmethod
    def _is_committed(manager: CheckpointManager, step: int) -> bool:
        manager.wait()  # the checkpoint may still be in this process's write queue
        return manager.store.read_manifest(layout.checkpoint_name(step)) is not None

    def _load_committed(self, manager: CheckpointManager, run_dir: str, step: int, name: str, *,
                        map_location: Any) -> Any:
        meta = manager.load(step, {name: None}, restore_rng=False, map_location=map_location)
        return meta["state"][name]


def _path_key(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    return text if is_url(text) else os.path.normpath(text)


def _epoch_of(checkpoint: dict[str, Any]) -> float | None:
    epoch = checkpoint.get("epoch")
    return None if epoch is None else float(epoch)
