"""Real training processes of the three front ends (HF Trainer, Lightning, a plain loop), started cheaply.

Importing transformers and Lightning takes seconds here, so a fork server pays it once: it imports both,
then forks one training process per order. Each child is a real process running real training, ended by a
real signal from the test or by a normal interpreter exit, whose status the server reports.

Protocol: the test writes one JSON order per line to the server's stdin; the server and its children write
JSON events to the server's stdout ({"event": ..., "pid": ...}). Everything the libraries print goes to
stderr. Events of a child: "training" (handlers installed, first optimizer step about to run), "returned"
(train()/fit()/the loop returned: what it saw then), then the server's "exited" with the exit status
(negative: killed by that signal).

The child scripts follow the documented pattern for preemption: train, then `sys.exit(callback.exit_code)`.
"""

from __future__ import annotations

import gc
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckpt_callbacks.core.preemption import PREEMPTION_SIGNALS

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------- test side


class TrainingProcesses:
    """Client of the fork server: `start(framework=..., output_dir=...)` returns a `Run`."""

    def __init__(self) -> None:
        self.server = subprocess.Popen([sys.executable, "-m", "tests.faults.training_processes"], cwd=REPO,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._current: Run | None = None
        threading.Thread(target=self._read_events, daemon=True).start()
        first = self._events.get(timeout=180)
        assert first is not None and first["event"] == "serving", f"fork server did not start: {first}"

    def start(self, **order: Any) -> Run:
        if self._current is not None:
            self._current.finish()  # a test that failed midway leaves its process behind: end it first
        assert self.server.stdin is not None
        self.server.stdin.write(json.dumps(order) + "\n")
        self.server.stdin.flush()
        self._current = Run(self)
        return self._current

    def next_event(self, timeout: float) -> dict[str, Any]:
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event from the training process within {timeout} s") from None
        if event is None:
            raise AssertionError(f"the fork server ended (status {self.server.poll()})")
        return event

    def close(self) -> None:
        self.server.kill()
        self.server.wait()

    def _read_events(self) -> None:
        assert self.server.stdout is not None
        for line in self.server.stdout:
            self._events.put(json.loads(line))
        self._events.put(None)


class Run:
    """One training process: its events in order, its pid, and its exit status."""

    def __init__(self, processes: TrainingProcesses) -> None:
        self.processes = processes
        self.pid: int | None = None
        self.events: dict[str, dict[str, Any]] = {}
        self.status: int | None = None
        self.failure = ""

    def wait_for(self, name: str, timeout: float = 120) -> dict[str, Any]:
        """The event `name` of this run; fails if the process exits first."""
        deadline = time.monotonic() + timeout
        while name not in self.events:
            if self.status is not None:
                raise AssertionError(f"training process {self.pid} exited with {self.status} before '{name}'"
                                     f"{self.failure}")
            try:
                self._take(self.processes.next_event(max(0.0, deadline - time.monotonic())))
            except AssertionError:
                self.kill()
                raise
        return self.events[name]

    def exit_status(self, timeout: float = 120) -> int:
        """The exit status: the code, or minus the number of the signal that ended the process."""
        while self.status is None:
            self._take(self.processes.next_event(timeout))
        return self.status

    def expect_exit(self, status: int) -> None:
        actual = self.exit_status()
        assert actual == status, f"training process {self.pid} exited with {actual}, expected {status}{self.failure}"

    def send(self, signum: int) -> None:
        assert self.pid is not None
        os.kill(self.pid, signum)

    def kill(self) -> None:
        if self.pid is not None and self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def finish(self) -> None:
        """End the process if it still runs, and consume its events up to its exit."""
        if self.status is None:
            if self.pid is None:
                self._take(self.processes.next_event(120))
            self.kill()
            self.exit_status()

    def _take(self, event: dict[str, Any]) -> None:
        self.pid = self.pid or event["pid"]
        assert event["pid"] == self.pid, f"event of another process: {event}"
        if event["event"] == "exited":
            self.status = int(event["status"])
        elif event["event"] == "failed":
            self.failure = f"; it failed with:\n{event['traceback']}"
        else:
            self.events[event["event"]] = event


# ---------------------------------------------------------------------------------------------- children

_EVENTS: Any = None  # the protocol stream, opened by serve()


def emit(event: str, **fields: Any) -> None:
    _EVENTS.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")
    _EVENTS.flush()


class TrainingProbe:
    """What a child reports: the step reached when a signal arrived, and that training has started.

    `started()` runs at the first step, after the library installed its handlers; it wraps them so that the
    step counter is read at the instant of delivery, then calls the library's handler unchanged.
    """

    def __init__(self, current_step: Callable[[], int]) -> None:
        self.current_step = current_step
        self.received_at: int | None = None
        self.announced = False

    def started(self) -> None:
        if self.announced:
            return
        self.announced = True
        for signum in PREEMPTION_SIGNALS:
            library_handler = signal.getsignal(signum)
            if callable(library_handler):
                signal.signal(signum, self._recording(library_handler))
        emit("training", step=self.current_step())

    def _recording(self, library_handler: Callable[[int, Any], Any]) -> Callable[[int, Any], None]:
        def handler(signum: int, frame: Any) -> None:
            if self.received_at is None:
                self.received_at = self.current_step()
            library_handler(signum, frame)

        return handler

    def returned(self, checkpoint_dir: Path, exit_code: int, preempted: bool) -> None:
        """Report what is on disk the instant training returned: pending writes must be durable by then."""
        emit("returned", received_at=self.received_at, final_step=self.current_step(), exit_code=exit_code,
             preempted=preempted, listing=sorted(os.listdir(checkpoint_dir)),
             exported=(checkpoint_dir / "export").exists())


def run_hf(order: dict[str, Any]) -> int:
    from transformers import TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint

    from ckpt_callbacks.hf import CheckpointCallback
    from tests.hf.conftest import make_trainer

    output_dir = Path(order["output_dir"])
    callback = CheckpointCallback(**order["flags"])
    holder: dict[str, Any] = {}
    probe = TrainingProbe(lambda: int(holder["trainer"].state.global_step))

    class Probe(TrainerCallback):
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            probe.started()

    trainer = make_trainer(output_dir, [callback, Probe()], model_seed=order["seed"], max_steps=order["max_steps"],
                           logging_steps=1000)
    holder["trainer"] = trainer
    resume = get_last_checkpoint(str(output_dir)) if output_dir.exists() else None
    trainer.train(resume_from_checkpoint=resume)
    probe.returned(output_dir, callback.exit_code, callback.preempted)
    assert trainer.model is not None
    save_weights(order, trainer.model.state_dict())
    return callback.exit_code


def run_lightning(order: dict[str, Any]) -> int:
    from tests.lightning.helpers import namespace, seed_everything, train_loader, val_loader

    ns = namespace("lightning.pytorch")
    root = Path(order["output_dir"])
    seed_everything(order["seed"])
    module = ns.Tiny()
    plugin, callback = ns.ours(root, **order["flags"])
    holder: dict[str, Any] = {}
    probe = TrainingProbe(lambda: int(holder["trainer"].global_step))

    class Probe(ns.pl.Callback):  # type: ignore[name-defined]
        def on_train_batch_start(self, *args: Any) -> None:
            probe.started()

    trainer = ns.trainer(root, callbacks=[callback, Probe()], plugins=[plugin], max_steps=order["max_steps"],
                         max_epochs=-1)
    holder["trainer"] = trainer
    trainer.fit(module, train_loader(), val_loader(), ckpt_path="last")
    probe.returned(root / "checkpoints", callback.exit_code, callback.preempted)
    save_weights(order, module.state_dict())
    return int(callback.exit_code)


def run_plain(order: dict[str, Any]) -> int:
    import torch

    from ckpt_callbacks import CheckpointArguments, CheckpointManager

    output_dir = Path(order["output_dir"])
    torch.manual_seed(order["seed"])
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(128, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.5)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    manager = CheckpointManager(CheckpointArguments(output_dir=str(output_dir), **order["flags"]))
    completed = {"step": 0}
    if manager.latest() is not None:
        completed["step"], _ = manager.load_last(state)
    probe = TrainingProbe(lambda: completed["step"])
    manager.handle_signals()
    probe.started()
    max_steps = order["max_steps"]
    for step in range(completed["step"] + 1, max_steps + 1):
        inputs = torch.randn(64, 32, generator=torch.Generator().manual_seed(step))  # dropout: the global RNG
        model(inputs).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        completed["step"] = step
        stop = manager.preempted  # read once: a signal after this line is handled at the next step
        if stop or manager.should_save_step(step, max_steps=max_steps):
            manager.save(step, state)
        if stop:
            break
    manager.close()
    probe.returned(output_dir, manager.exit_code, manager.preempted)
    save_weights(order, model.state_dict())
    return manager.exit_code


FRAMEWORKS: dict[str, Callable[[dict[str, Any]], int]] = {"hf": run_hf, "lightning": run_lightning, "plain": run_plain}


def save_weights(order: dict[str, Any], state_dict: dict[str, Any]) -> None:
    import torch

    if order.get("weights"):
        torch.save({name: tensor.detach().clone() for name, tensor in state_dict.items()}, order["weights"])


def slow_down_publishing(seconds: float) -> None:
    """A slow disk: every checkpoint takes `seconds` longer to become visible, so a process that returned
    before its pending write finished would be caught with the checkpoint missing."""
    from ckpt_callbacks.core.storage.store import LocalStore

    publish = LocalStore.publish

    def slow_publish(self: LocalStore, staging_dir: Path, name: str) -> None:
        time.sleep(seconds)
        publish(self, staging_dir, name)

    LocalStore.publish = slow_publish  # type: ignore[method-assign]


def run_child(order: dict[str, Any]) -> int:
    if order.get("slow_publish"):
        slow_down_publishing(order["slow_publish"])
    return FRAMEWORKS[order["framework"]](order)


# ---------------------------------------------------------------------------------------------- server


def serve() -> None:
    global _EVENTS
    _EVENTS = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the libraries print (HF log lines, Lightning banners) must not enter the protocol
    import torch

    torch.set_num_threads(1)  # before any torch op: no intra-op thread pool exists when the server forks
    import lightning.pytorch  # noqa: F401
    import transformers  # noqa: F401

    import ckpt_callbacks.hf  # noqa: F401
    import ckpt_callbacks.lightning  # noqa: F401
    import tests.hf.conftest  # noqa: F401
    import tests.lightning.helpers  # noqa: F401

    torch.optim.AdamW(torch.nn.Linear(1, 1).parameters())  # imports a lot lazily: pay it once, before forking
    assert threading.active_count() == 1, "forking a process with threads could deadlock its children"
    gc.freeze()  # children neither copy nor collect the imported modules: their exit takes 0.3 s instead of 1.3 s
    emit("serving")
    for line in sys.stdin:
        order = json.loads(line)
        pid = os.fork()
        if pid == 0:
            sys.exit(child_main(order))  # a normal interpreter exit: atexit handlers and thread joins run
        _, status = os.waitpid(pid, 0)
        emit("exited", pid=pid, status=os.waitstatus_to_exitcode(status))


def child_main(order: dict[str, Any]) -> int:
    try:
        return run_child(order)
    except BaseException:
        import traceback

        emit("failed", traceback=traceback.format_exc())
        return 1


if __name__ == "__main__":
    serve()
