"""`dcp` engine: `torch.distributed.checkpoint`, every rank writing its own shard in parallel.

For sharded models and optimizers (FSDP2 `fully_shard`, DTensor tensor parallelism). Each piece is a
DCP folder (`{relpath}/__{rank}_0.distcp` + `.metadata`); per-rank pieces (RNG) are not collective and
are stored like the `safetensors` engine does. Loading reads into the live objects' own (possibly
differently sharded) state dicts, so DCP reshards: save at world size 2, resume at 1, or the reverse.
Atomic commit, manifest and retention come from the core as for every engine.
"""

from __future__ import annotations

from typing import Any

from ckpt_callbacks.core.format.engines.base import CheckpointEngine
from ckpt_callbacks.core.format.engines.safetensors_engine import SafetensorsEngine
from ckpt_callbacks.core.state.capture import RNG_STATE, restore_into

__all__ = ["DCPEngine"]


class DCPEngine(CheckpointEngine):
    name = "dcp"
    writes_on_every_rank = True
    supports_host_staging = False  # DTensor shards are staged by DCP itself, not copied into host buffers

    def save(self, state: Any, relpath: str) -> None:
        if _is_per_rank(relpath):
            self._rank_local().save(state, relpath)
            return
        from torch.distributed.checkpoint.state_dict_saver import save

        save(_as_dict(state), checkpoint_id=str(self.directory / relpath), process_group=self.process_group)

    def load(self, relpath: str, map_location: Any = None) -> Any:
        """The full (unsharded) state of `relpath`, read without a template (for tools and plain values)."""
        if _is_per_rank(relpath):
            return self._rank_local().load(relpath, map_location)
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        state = _load_state_dict_from_keys(checkpoint_id=str(self.directory / relpath), process_group=self.process_group)
        return state.get(_WRAPPED, state)

    def load_into(self, relpath: str, target: Any, map_location: Any = None) -> Any:
        if _is_per_rank(relpath) or not hasattr(target, "state_dict"):
            return super().load_into(relpath, target, map_location)
        from torch.distributed.checkpoint.state_dict_loader import load

        _materialize_optimizer_state(target)
        template = target.state_dict()  # the live layout: DCP reads each rank's slice into it (resharding)
        load(template, checkpoint_id=str(self.directory / relpath), process_group=self.process_group)
        return restore_into(relpath, target, template)

    def _rank_local(self) -> SafetensorsEngine:
        engine = SafetensorsEngine(rank=self.rank, world_size=self.world_size)
        engine.open(str(self.directory))
        return engine


_WRAPPED = "value"


def _is_per_rank(relpath: str) -> bool:
    return relpath == RNG_STATE or relpath.startswith(f"{RNG_STATE}_")


def _as_dict(state: Any) -> dict[str, Any]:
    return state if isinstance(state, dict) else {_WRAPPED: state}


def _materialize_optimizer_state(target: Any) -> None:
    """A fresh optimizer has no state tensors to read into; create them (zeros) as DCP's own helpers do."""
    if hasattr(target, "param_groups") and not target.state:
        from torch.distributed.checkpoint.state_dict import _init_optim_state

        _init_optim_state(target)
