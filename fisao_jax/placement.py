"""Putting data on the mesh and compiling functions for it.

`Layout(mesh)` is what every trainer uses to

- place host batches (numpy) on the mesh, rows sharded over the batch axes (`put_batch`);
- jit a function with declared input / output shardings, traced inside the mesh and the
  logical axis rules so that the models' activation constraints apply (`jit`);
- name the shardings of parameters (by the partition rules), batches, replicated values and
  train states (by the shardings of the arrays in hand, or of an abstract state for
  compiling without weights).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fisao_jax import sharding as sharding_lib
from fisao_jax import hosts


@dataclasses.dataclass(frozen=True)
class Layout:
    """Shardings and compilation for one mesh."""

    mesh: Mesh

    @property
    def batch(self) -> NamedSharding:
        """Leading dim over the batch axes; a prefix for a dict of batch arrays of any ranks."""
        return sharding_lib.batch_sharding(self.mesh)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch_shards(self) -> int:
        return sharding_lib.batch_shards(self.mesh)

    def params(self, tree: Any, rules: Sequence = sharding_lib.LLAVA_RULES) -> Any:
        """NamedSharding tree of a parameter tree (arrays or ShapeDtypeStructs) by the rules."""
        return sharding_lib.param_shardings(tree, self.mesh, rules)

    def of(self, tree: Any) -> Any:
        """The shardings of the arrays in `tree`; leaves on one device become replicated."""
        def one(x):
            s = getattr(x, "sharding", None)
            return s if isinstance(s, NamedSharding) and s.mesh == self.mesh else self.replicated
        return jax.tree.map(one, tree)

    def opt_state(self, optimizer: optax.GradientTransformation, abstract_state: Any, param_shardings: Any) -> Any:
        """Shardings of an optimizer state: moments like their parameters, counters replicated."""
        return optax.tree_map_params(optimizer, lambda _, s: s, abstract_state, param_shardings,
                                     transform_non_params=lambda _: self.replicated)

    def check_batch_size(self, rows: int, what: str) -> None:
        if rows % self.batch_shards:
            raise ValueError(f"{what} ({rows} rows) must be divisible by the {self.batch_shards} batch shards of "
                             f"the mesh {dict(self.mesh.shape)} (mesh axes data x fsdp)")

    def put_batch(self, batch: dict, keys: Optional[Sequence[str]] = None) -> dict:
        """Global device arrays of `batch[keys]` (default: every array entry), rows over the batch
        axes. With several processes, `batch` holds this process's block of rows
        (`fisao_jax.hosts.rows`) and the global batch is every process's blocks in order.
        Non-array entries (lists of ids, sets of objects) are left out."""
        keys = [k for k in batch if isinstance(batch[k], (np.ndarray, jax.Array))] if keys is None else list(keys)
        out = {}
        for k in keys:
            x = batch[k]
            global_rows = np.shape(x)[0] * jax.process_count()
            self.check_batch_size(global_rows, f"batch entry '{k}'")
            out[k] = hosts.to_global(x, self.batch, global_rows)
        return out

    def put_replicated(self, tree: Any) -> Any:
        return self.place(tree, jax.tree.map(lambda _: self.replicated, tree))

    def place(self, tree: Any, shardings: Any) -> Any:
        """`tree` (host or one-device arrays, the same value in every process) laid out by
        `shardings` on the mesh, which may span several processes."""
        if jax.process_count() == 1:
            return jax.device_put(tree, shardings)

        def one(x, s):
            if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding == s:
                return x  # already a global array laid out as asked
            return hosts.from_host(np.asarray(x), s)
        return jax.tree.map(one, tree, shardings)

    @contextlib.contextmanager
    def tracing(self):
        """The mesh and the logical axis rules, for tracing model code."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding_lib.LOGICAL_RULES):
            yield

    def jit(self, fn: Callable, in_shardings: Any = None, out_shardings: Any = None,
            donate_argnums: Sequence[int] = (), static_argnums: Sequence[int] = ()) -> "MeshJit":
        """`jax.jit(fn, ...)` whose tracing (call or `lower`) happens inside `tracing()`."""
        kw = {}
        if in_shardings is not None:
            kw["in_shardings"] = in_shardings
        if out_shardings is not None:
            kw["out_shardings"] = out_shardings
        return MeshJit(jax.jit(fn, donate_argnums=tuple(donate_argnums), static_argnums=tuple(static_argnums), **kw),
                       self)


class MeshJit:
    """A jitted function that is traced inside its layout's mesh and logical rules."""

    def __init__(self, jitted, layout: Layout):
        self.jitted, self.layout = jitted, layout

    def __call__(self, *args, **kwargs):
        with self.layout.tracing():
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with self.layout.tracing():
            return self.jitted.lower(*args, **kwargs)


def single_device_layout() -> Layout:
    """A 1-device layout (tests, tools that run on the host's first device)."""
    return Layout(sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1]))
