"""Training checkpoints (orbax): a method's train state (`fisao_jax.train_state`) as it is.

Layout: `<workdir>/checkpoints/<step>/`. Frozen weights are not saved: they come from the base
checkpoint named in the config, so a checkpoint is LoRA + value head + optimizer + counters.
A state is restored onto the layout of the state it replaces (each array's sharding), so a
resumed run on a mesh finds every array where a fresh one would be. Restoring never falls
back silently: an unreadable newest checkpoint is an error that says which folder and what
to do.
"""
from __future__ import annotations

import pathlib
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used."""


class Checkpointer:
    """Save / find / restore train-state pytrees under `directory`."""

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 3):
        self.directory = pathlib.Path(directory).resolve()
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> Optional[int]:
        """The newest complete checkpoint's step, or None."""
        self._manager.reload()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Write `state` as checkpoint `step` and wait until it is complete on disk."""
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Read checkpoint `step` into the structure, dtypes and shardings of `abstract_state`
        (arrays or ShapeDtypeStructs; a leaf without a sharding lands on the default device)."""
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                              abstract_state)
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as e:  # orbax raises many types for truncated / mismatched files
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} cannot be restored ({type(e).__name__}: {e}). "
                f"It may be corrupt or from a different config. Move it away to resume from an older "
                f"checkpoint, or use a new workdir to start fresh.") from e

    def close(self) -> None:
        self._manager.close()
