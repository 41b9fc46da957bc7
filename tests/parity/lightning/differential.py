"""Run one Lightning scenario stock and with ckpt_callbacks, and return what a user can observe of each run.

Three flavors of the same scenario:

- "stock": Lightning as shipped (`TorchCheckpointIO`, the scenario's own `ModelCheckpoint`).
- "plugin": `CheckpointIOPlugin()` added to every Trainer, the stock `ModelCheckpoint` kept. The plugin promises
  to be a drop-in for `TorchCheckpointIO`, so *everything* observed must be equal to "stock".
- "ours": `CheckpointIOPlugin()` plus `CheckpointCallback` in place of `ModelCheckpoint`. The layout differs
  (`checkpoint-{step}/checkpoint.ckpt`, documented in docs/migration.md), so tests compare what the layout
  does not change: which steps were saved, the best and last step, the checkpoint dicts' keys and contents,
  loop progress after a resume, final weights and exception types.

A scenario is a function of a `Run`; it builds Trainers and fits through the `Run`, which records each fit:

    def scenario(run: Run) -> None:
        trainer = run.trainer([run.model_checkpoint(monitor="val_loss", save_top_k=2)], max_epochs=4)
        run.fit(trainer, run.module(val_losses=(3, 1, 2, 0.5)))

    stock, plugin = differential(ns, tmp_path, scenario)
    assert_plugin_parity(stock, plugin)
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from tests.lightning.helpers import Namespace, SimulatedCrash, dataset, seed_everything

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*ckpt_path.*")
warnings.filterwarnings("ignore", ".*exists and is not empty.*")
warnings.filterwarnings("ignore", ".*manual optimization and every_n_train_steps.*")
warnings.filterwarnings("ignore", ".*SWA is currently only supported every epoch.*")
warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before the epoch ended.*")

BATCHES_PER_EPOCH = 10
BATCH_SIZE = 4
FLAVORS = ("stock", "plugin", "ours")

__all__ = [
    "BATCHES_PER_EPOCH", "Fit", "Outcome", "Run", "SimulatedCrash", "assert_callback_parity", "assert_plugin_parity",
    "assert_same", "crash_at", "differential", "files_by_step", "net_class", "saved_steps", "step_of",
]


# --------------------------------------------------------------------------- the module


@cache
def net_class(namespace_name: str) -> Any:
    """A BoringModel-sized LightningModule for namespace `namespace_name`, counting what it trains.

    `dropout > 0` and a shuffled loader make the run depend on the RNG (what exact resume is about); with
    `dropout=0` and `shuffle=False` nothing random happens, so runs with different resume points or callbacks
    can be compared weight for weight. `val_losses` scripts `val_loss` per epoch (to know the best one)."""
    import importlib

    pl = importlib.import_module(namespace_name)

    class Net(pl.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(self, dropout: float = 0.0, val_losses: tuple[float, ...] = (), lr: float = 0.05,
                     manual: bool = False, ballast_mb: int = 0) -> None:
            super().__init__()
            self.save_hyperparameters()
            # a checkpoint big enough that writing it takes a while: a reader racing an unfinished write loses
            self.register_buffer("ballast", torch.zeros(ballast_mb * 2**18))
            self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(dropout))
            self.head = nn.Linear(16, 1)
            self.automatic_optimization = not manual
            self.batches = 0  # training_step calls in this module's life (a resumed fit starts from 0)
            self.start_step: int | None = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

        def on_train_start(self) -> None:
            self.start_step = self.global_step

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            self.batches += 1
            x, y, _ = batch
            loss = nn.functional.mse_loss(self(x), y)
            if self.automatic_optimization:
                return loss
            for optimizer in self.optimizers():  # two optimizers: global_step counts 2 per batch
                optimizer.zero_grad()
                self.manual_backward(nn.functional.mse_loss(self(x), y))
                optimizer.step()
            return None

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y, _ = batch
            loss = nn.functional.mse_loss(self(x), y)
            if self.hparams.val_losses:
                loss = torch.tensor(float(self.hparams.val_losses[self.current_epoch]))
            self.log("val_loss", loss)

        def configure_optimizers(self) -> Any:
            trainable = [p for p in self.parameters() if p.requires_grad]
            if not self.automatic_optimization:
                return (torch.optim.SGD(self.backbone.parameters(), lr=self.hparams.lr, momentum=0.9),
                        torch.optim.SGD(self.head.parameters(), lr=self.hparams.lr, momentum=0.9))
            optimizer = torch.optim.SGD(trainable, lr=self.hparams.lr, momentum=0.9)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    return _module_level(Net, namespace_name)


@cache
def data_module_class(namespace_name: str) -> Any:
    import importlib

    pl = importlib.import_module(namespace_name)

    class ParityData(pl.LightningDataModule):  # type: ignore[name-defined,misc]
        def __init__(self, shuffle: bool = False) -> None:
            super().__init__()
            self.shuffle = shuffle

        def train_dataloader(self) -> DataLoader:
            return train_loader(self.shuffle)

        def val_dataloader(self) -> DataLoader:
            return val_loader()

    return _module_level(ParityData, namespace_name)


def _module_level(cls: type, namespace_name: str) -> Any:
    """Make `cls` a module attribute under a per-namespace name, so pickle (`torch.save(trainer)`) finds it."""
    cls.__name__ = cls.__qualname__ = f"{cls.__name__}_{namespace_name.replace('.', '_')}"
    cls.__module__ = __name__
    globals()[cls.__name__] = cls
    return cls


def train_loader(shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset(BATCH_SIZE * BATCHES_PER_EPOCH, 123), batch_size=BATCH_SIZE, shuffle=shuffle)


def val_loader() -> DataLoader:
    return DataLoader(dataset(8, 7), batch_size=BATCH_SIZE)


def crash_at(ns: Namespace, step: int) -> Any:
    """Raises `SimulatedCrash` after optimizer step `step` (before any Checkpoint callback sees that batch end:
    Lightning calls Checkpoint callbacks last)."""

    class Crash(ns.pl.Callback):  # type: ignore[name-defined,misc]
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == step:
                raise SimulatedCrash(f"simulated crash after step {step}")

    return Crash()


# --------------------------------------------------------------------------- one run of a scenario


@dataclass
class Fit:
    """One `trainer.fit` call as the user saw it."""

    start_step: int | None  # global_step at on_train_start (the step resumed from)
    batches: int  # training batches this call ran
    global_step: int
    epoch: int
    error: BaseException | None
    weights: dict[str, torch.Tensor]

    @property
    def error_type(self) -> type[BaseException] | None:
        return None if self.error is None else type(self.error)


@dataclass
class Outcome:
    """What a user can observe after a scenario ran: files, checkpoint contents, callback attributes, fits."""

    flavor: str
    root: Path
    files: dict[str, str]  # path relative to root -> "file" | "dir" | "link -> target"
    checkpoints: dict[str, Any]  # path relative to root -> normalized checkpoint dict, or "<unloadable: Type>"
    callbacks: list[dict[str, Any]]  # the last Trainer's checkpoint callbacks' public attributes, normalized
    fits: list[Fit]
    extra: dict[str, Any] = field(default_factory=dict)

    def checkpoint(self, relative: str) -> dict[str, Any]:
        loaded = self.checkpoints[relative]
        assert isinstance(loaded, dict), f"{self.flavor}: {relative} is {loaded}"
        return loaded


class Run:
    """Builds the Trainers of one flavor of a scenario and records every fit."""

    def __init__(self, ns: Namespace, root: Path, flavor: str, plugin_args: dict[str, Any] | None = None) -> None:
        assert flavor in FLAVORS, flavor
        self.ns = ns
        self.root = root
        self.flavor = flavor
        self.plugin_args = dict(plugin_args or {})
        self.fits: list[Fit] = []
        self.trainers: list[Any] = []
        self.extra: dict[str, Any] = {}
        root.mkdir(parents=True, exist_ok=True)

    def sub(self, name: str) -> Run:
        """A run of the same flavor in `root/name` (its own dirpath) whose fits are recorded with this one's."""
        other = Run(self.ns, self.root / name, self.flavor, self.plugin_args)
        other.fits, other.trainers, other.extra = self.fits, self.trainers, self.extra
        return other

    @property
    def dirpath(self) -> Path:
        return self.root / "checkpoints"

    @property
    def ours(self) -> bool:
        return self.flavor == "ours"

    def module(self, *, seed: int | None = None, **kwargs: Any) -> Any:
        """A new `Net`; with `seed`, the global RNGs are seeded first (same initial weights and random stream as
        any other run seeded so: what comparing an interrupted run with an uninterrupted one needs)."""
        if seed is not None:
            seed_everything(seed)
        return net_class(self.ns.name)(**kwargs)

    def model_checkpoint(self, **kwargs: Any) -> Any:
        kwargs.setdefault("dirpath", str(self.dirpath))
        return self.ns.callback_class("ModelCheckpoint")(**kwargs)

    def callback(self, **args: Any) -> Any:
        """`CheckpointCallback` writing to `dirpath`, without the final export unless asked."""
        from ckpt_callbacks import CheckpointArguments

        args.setdefault("output_dir", str(self.dirpath))
        args.setdefault("export_at_end", False)
        return self.ns.adapter.CheckpointCallback(CheckpointArguments(**args))

    def checkpointing(self, stock: dict[str, Any], ours: dict[str, Any]) -> Any:
        """The flavor's checkpoint callback: `ModelCheckpoint(**stock)`, or `CheckpointCallback(**ours)`."""
        return self.callback(**ours) if self.ours else self.model_checkpoint(**stock)

    def plugin(self) -> Any:
        from ckpt_callbacks import CheckpointArguments

        return self.ns.adapter.CheckpointIOPlugin(CheckpointArguments(**self.plugin_args))

    def trainer(self, callbacks: Iterable[Any] = (), **kwargs: Any) -> Any:
        kwargs.setdefault("max_epochs", 2)
        kwargs.setdefault("devices", 1)
        kwargs.setdefault("logger", False)
        kwargs.setdefault("num_sanity_val_steps", 0)
        plugins = list(kwargs.pop("plugins", []))
        if self.flavor != "stock":
            plugins.append(self.plugin())
        trainer = self.ns.pl.Trainer(
            default_root_dir=str(self.root), accelerator="cpu", callbacks=list(callbacks), plugins=plugins,
            enable_progress_bar=False, enable_model_summary=False, **kwargs,
        )
        self.trainers.append(trainer)
        return trainer

    def fit(self, trainer: Any, module: Any, *, shuffle: bool = False, ckpt_path: Any = None) -> Fit:
        """`trainer.fit` on the standard loaders, recording progress, weights and the exception (caught, not
        raised: the tests compare it)."""
        before = module.batches
        error: BaseException | None = None
        try:
            trainer.fit(module, train_loader(shuffle), val_loader(), ckpt_path=ckpt_path)
        except Exception as exc:  # the scenario compares exception types between flavors
            error = exc
        return self.record(trainer, module, error, batches_before=before)

    def record(self, trainer: Any, module: Any, error: BaseException | None, *, batches_before: int = 0) -> Fit:
        """Record a fit that ran elsewhere (a LightningCLI run, a DDP process)."""
        if trainer not in self.trainers:
            self.trainers.append(trainer)
        record = Fit(start_step=module.start_step, batches=module.batches - batches_before,
                     global_step=trainer.global_step, epoch=trainer.current_epoch, error=error,
                     weights=weights_of(module))
        module.start_step = None
        self.fits.append(record)
        return record

    def outcome(self, locations: Iterable[str] = ()) -> Outcome:
        locations = list(locations)
        files = observe_tree(self.root)
        checkpoints = {rel: load_normalized(self.root / rel, self.root) for rel, kind in files.items() if kind != "dir"}
        for url in locations:  # remote folders: fsspec URLs
            remote = observe_remote(url)
            files.update({f"<remote>/{rel}": "file" for rel in remote})
            checkpoints.update({f"<remote>/{rel}": data for rel, data in remote.items()})
        callbacks = []
        if self.trainers:
            for callback in self.trainers[-1].checkpoint_callbacks:
                attributes = normalize(checkpoint_attributes(callback), self.root)
                for url in locations:
                    attributes = normalize(attributes, url)
                callbacks.append(attributes)
        return Outcome(self.flavor, self.root, files, checkpoints, callbacks, self.fits, normalize(self.extra, self.root))


def differential(ns: Namespace, tmp_path: Path, scenario: Callable[[Run], None],
                 flavors: Iterable[str] = ("stock", "plugin"), plugin_args: dict[str, Any] | None = None,
                 locations: Callable[[Run], Iterable[str]] | None = None) -> list[Outcome]:
    """Run `scenario` once per flavor, each in its own root under `tmp_path`, from the same seed."""
    outcomes = []
    for flavor in flavors:
        seed_everything(0)
        run = Run(ns, tmp_path / flavor, flavor, plugin_args)
        scenario(run)
        outcomes.append(run.outcome(locations(run) if locations else ()))
    return outcomes


# --------------------------------------------------------------------------- observing


def weights_of(module: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def observe_tree(root: Path) -> dict[str, str]:
    """Every entry under `root`: what `ls -R` shows a user (hidden files included)."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[rel] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = "file"
    return dict(sorted(found.items()))


def load_normalized(path: Path, root: Path) -> Any:
    """`torch.load` as a user would (weights_only, the torch >= 2.6 default), with `root` made relative."""
    try:
        return normalize(torch.load(path, map_location="cpu", weights_only=True), root)
    except Exception as exc:
        return f"<unloadable: {type(exc).__name__}>"


def observe_remote(url: str) -> dict[str, Any]:
    """Every object below fsspec `url`, loaded with `torch.load` (relative name -> normalized dict)."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(url)
    base = base.rstrip("/")
    fs.invalidate_cache()
    try:
        names = sorted(fs.find(base))
    except FileNotFoundError:
        return {}
    found: dict[str, Any] = {}
    for name in names:
        rel = str(name).removeprefix(base).lstrip("/")
        try:
            with fs.open(name, "rb") as f:
                data = f.read()
            found[rel] = normalize(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), url)
        except Exception as exc:
            found[rel] = f"<unloadable: {type(exc).__name__}>"
    return found


def checkpoint_attributes(callback: Any) -> dict[str, Any]:
    """The attributes user code reads from a checkpoint callback (those it has)."""
    names = ("best_model_path", "best_model_score", "last_model_path", "best_k_models", "kth_best_model_path",
             "kth_value", "current_score", "dirpath")
    return {name: getattr(callback, name) for name in names if hasattr(callback, name)}


def normalize(value: Any, root: Path | str) -> Any:
    """`value` with every occurrence of `root` in strings (and dict keys) replaced by "<root>"."""
    roots = sorted({str(root), os.path.realpath(str(root))} if not isinstance(root, str) or "://" not in root
                   else {root.rstrip("/"), root.split("://", 1)[1].rstrip("/")}, key=len, reverse=True)

    def fix(item: Any) -> Any:
        if isinstance(item, str):
            for prefix in roots:
                item = item.replace(prefix, "<root>")
            return item
        if isinstance(item, Path):
            return fix(str(item))
        if isinstance(item, dict):
            return {fix(k): fix(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return type(item)(fix(v) for v in item)
        return item

    return fix(value)


# --------------------------------------------------------------------------- comparing


def differences(a: Any, b: Any, where: str = "", limit: int = 12) -> list[str]:
    """Where `a` and `b` differ (tensors by `torch.equal`, floats NaN-aware), at most `limit` places."""
    found: list[str] = []

    def walk(x: Any, y: Any, at: str) -> None:
        if len(found) >= limit:
            return
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                    and x.dtype == y.dtype and torch.equal(x, y)):
                found.append(f"{at or '.'}: tensors differ")
            return
        if isinstance(x, dict) and isinstance(y, dict):
            if x.keys() != y.keys():
                found.append(f"{at or '.'}: keys {sorted(map(str, x.keys() - y.keys()))} only in the first, "
                             f"{sorted(map(str, y.keys() - x.keys()))} only in the second")
            for key in x.keys() & y.keys():
                walk(x[key], y[key], f"{at}[{key!r}]")
            return
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and type(x) is type(y):
            if len(x) != len(y):
                found.append(f"{at or '.'}: length {len(x)} != {len(y)}")
            for index, (p, q) in enumerate(zip(x, y, strict=False)):  # a length difference is reported above
                walk(p, q, f"{at}[{index}]")
            return
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            return
        if type(x) is not type(y) or x != y:
            found.append(f"{at or '.'}: {x!r} != {y!r}")

    walk(a, b, where)
    return found


def assert_same(a: Any, b: Any, what: str) -> None:
    diffs = differences(a, b)
    assert not diffs, f"{what} differ:\n  " + "\n  ".join(diffs)


def assert_plugin_parity(stock: Outcome, plugin: Outcome) -> None:
    """Everything observed after the "plugin" flavor equals the "stock" one: the plugin is a drop-in.

    Every aspect is compared before failing, so the message lists all that differ."""
    problems = []
    if plugin.files != stock.files:
        kinds = {k: (stock.files[k], plugin.files[k]) for k in stock.files.keys() & plugin.files.keys()
                 if stock.files[k] != plugin.files[k]}
        problems.append(f"files: only stock {sorted(stock.files.keys() - plugin.files.keys())}, only with the plugin "
                        f"{sorted(plugin.files.keys() - stock.files.keys())}, other kinds {kinds}")
    common = stock.checkpoints.keys() & plugin.checkpoints.keys()
    for what, a, b in (("checkpoint contents", {k: stock.checkpoints[k] for k in common},
                        {k: plugin.checkpoints[k] for k in common}),
                       ("checkpoint callback attributes", stock.callbacks, plugin.callbacks)):
        diffs = differences(a, b)
        if diffs:
            problems.append(f"{what}: " + "; ".join(diffs))
    try:
        assert_same_fits(stock, plugin)
    except AssertionError as exc:
        problems.append(str(exc))
    assert not problems, "the plugin changed what a stock ModelCheckpoint user observes:\n- " + "\n- ".join(problems)


def assert_same_fits(stock: Outcome, other: Outcome, *, weights: bool = True) -> None:
    assert len(stock.fits) == len(other.fits)
    for index, (a, b) in enumerate(zip(stock.fits, other.fits, strict=True)):
        if a.error_type is None or b.error_type is None:
            assert a.error_type is b.error_type, f"fit {index}: stock raised {a.error!r}, {other.flavor} raised {b.error!r}"
        else:
            assert issubclass(b.error_type, a.error_type), (
                f"fit {index}: stock raised {a.error_type.__name__}, {other.flavor} raised {b.error!r}")
        progress_a = (a.start_step, a.batches, a.global_step, a.epoch)
        progress_b = (b.start_step, b.batches, b.global_step, b.epoch)
        assert progress_a == progress_b, (
            f"fit {index} (start_step, batches, global_step, epoch): stock {progress_a}, {other.flavor} {progress_b}")
        if weights:
            assert_same(a.weights, b.weights, f"fit {index}: final weights")


# --------------------------------------------------------------------------- steps of saved checkpoints

_STEP_FOLDER = re.compile(r"(?:^|/)checkpoint-(\d+)/checkpoint\.ckpt$")


def saved_steps(outcome: Outcome, *, include_last: bool = False) -> list[int]:
    """The global steps of the checkpoints left in the run's folder (stock: every `.ckpt` file except `last*`,
    unless `include_last`; ours: every `checkpoint-{step}`)."""
    steps = set()
    for rel, data in outcome.checkpoints.items():
        name = rel.rsplit("/", 1)[-1]
        if not name.endswith(".ckpt") or (name.startswith("last") and not include_last):
            continue
        if isinstance(data, dict):
            steps.add(int(data["global_step"]))
    return sorted(steps)


def step_of(outcome: Outcome, path: str) -> int | None:
    """The global step of the checkpoint a callback attribute (a normalized path) names; None for ""."""
    if not path:
        return None
    rel = path.removeprefix("<root>/")
    return int(outcome.checkpoint(rel)["global_step"])


def without(checkpoint: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in checkpoint.items() if k not in keys}


_VERSIONED = re.compile(r"-v\d+(?:\.ckpt$|/)")  # stock `name-v1.ckpt`; ours `checkpoints-v1/` (a later run's)


def files_by_step(outcome: Outcome) -> dict[int, str]:
    """Global step -> the (first, by name) checkpoint file holding it, the first run's before a later run's
    (`-v{N}` names); `last*` copies left out."""
    found: dict[int, str] = {}
    for rel in sorted(outcome.checkpoints, key=lambda rel: (bool(_VERSIONED.search(rel)), rel)):
        name = rel.rsplit("/", 1)[-1]
        data = outcome.checkpoints[rel]
        if name.endswith(".ckpt") and not name.startswith("last") and isinstance(data, dict):
            found.setdefault(int(data["global_step"]), rel)
    return found


def assert_callback_parity(stock: Outcome, ours: Outcome, *, weights: bool = True, best: bool = True,
                           contents: bool = True, attributes: bool = True) -> None:
    """What `CheckpointCallback` leaves equals what `ModelCheckpoint` left, up to the documented layout: the saved
    steps, the steps `last_model_path` and `best_model_path` name, `best_model_score`, each saved step's checkpoint
    dict (keys; weights, optimizer and scheduler states, epoch, step), and every fit's progress, weights and error.
    `attributes=False` leaves out the callback attributes (remote folders: stock's name objects by URL, which the
    file comparison already covers)."""
    problems = []
    if saved_steps(stock) != saved_steps(ours):
        problems.append(f"saved steps: stock {saved_steps(stock)}, ours {saved_steps(ours)}")
    a, b = (stock.callbacks or [{}])[0], (ours.callbacks or [{}])[0]
    pairs = [("last_model_path", attributes), ("best_model_path", best and attributes)]
    for name, wanted in pairs:
        if not wanted:
            continue
        try:
            steps = (step_of(stock, a.get(name, "")), step_of(ours, b.get(name, "")))
        except (KeyError, AssertionError) as exc:
            problems.append(f"{name}: names no readable checkpoint ({exc})")
            continue
        if steps[0] != steps[1]:
            problems.append(f"{name}: stock names step {steps[0]} ({a.get(name)!r}), ours step {steps[1]} ({b.get(name)!r})")
    if best and attributes:
        scores = [None if s is None else float(s) for s in (a.get("best_model_score"), b.get("best_model_score"))]
        if scores[0] != scores[1]:
            problems.append(f"best_model_score: stock {scores[0]}, ours {scores[1]}")
    if contents:
        stock_files, our_files = files_by_step(stock), files_by_step(ours)
        for step in sorted(stock_files.keys() & our_files.keys()):
            x, y = stock.checkpoint(stock_files[step]), ours.checkpoint(our_files[step])
            if x.keys() != y.keys():
                problems.append(f"step {step}: checkpoint keys {sorted(x)} (stock) != {sorted(y)} (ours)")
            compared = ("epoch", "global_step", "state_dict", "optimizer_states", "lr_schedulers", "hyper_parameters")
            diffs = differences({k: x.get(k) for k in compared}, {k: y.get(k) for k in compared}, f"step {step}")
            if weights and diffs:
                problems.append("; ".join(diffs))
    try:
        assert_same_fits(stock, ours, weights=weights)
    except AssertionError as exc:
        problems.append(str(exc))
    assert not problems, "CheckpointCallback differs from ModelCheckpoint:\n- " + "\n- ".join(problems)
