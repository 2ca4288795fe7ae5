"""More than one host: JAX's multi-controller runtime, one process per host.

Every process runs the same program on its own devices; together they form one mesh. This
module holds what a run needs to know about that:

- `initialize(...)` starts the runtime (before anything touches a device): with a coordinator
  address, or on its own on a TPU pod slice; one process needs neither.
- `part()` / `rows(n)`: which rows of a global batch this process reads and preprocesses
  (process p of P: the p-th of P equal blocks, in the data's order, so the order, and the run,
  do not depend on P).
- `to_global(...)`, `gather(...)`: a process's rows into one global array, and a global array
  back into host memory on every process (for host steps that need every row: decoding,
  CHAIR, the sentence-level reward).
- `is_primary()`: only process 0 writes files and shows progress bars.
- `wait(name)`: all processes meet (e.g. after process 0 wrote a file the others read).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


class HostsError(RuntimeError):
    """The multi-host runtime could not start: names the process and the coordinator."""


def on_tpu_pod() -> bool:
    """True on a worker of a multi-host TPU slice (its metadata lists more than one worker)."""
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               timeout_s: int = 300) -> None:
    """Start JAX's distributed runtime when this is one of several processes.

    Arguments default to $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID. With an
    address, this process joins it (CPU processes talk through gloo); without one, a TPU pod
    worker initialises from the slice's metadata; otherwise nothing happens (one process).
    HostsError, within `timeout_s`, when the coordinator cannot be reached."""
    address = coordinator_address or os.environ.get(ENV_ADDRESS, "")
    count = num_processes or int(os.environ.get(ENV_COUNT, "0") or 0)
    pid = process_id if process_id >= 0 else int(os.environ.get(ENV_ID, "-1") or -1)
    if not address and not on_tpu_pod():
        if count > 1:
            raise HostsError(f"{count} processes asked for but no coordinator address: pass "
                             f"--coordinator_address=HOST:PORT (or set ${ENV_ADDRESS})")
        return
    kwargs: dict[str, Any] = {"initialization_timeout": int(timeout_s),
                              "heartbeat_timeout_seconds": max(10, min(int(timeout_s), 100))}
    if address:
        if count < 1 or not 0 <= pid < count:
            raise HostsError(f"with a coordinator address ({address}) every process needs --num_processes=N and "
                             f"--process_id=K with 0 <= K < N (got N={count}, K={pid})")
        kwargs.update(coordinator_address=address, num_processes=count, process_id=pid)
        # CPU processes exchange data through gloo (GPUs use NCCL, TPUs their interconnect)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if pid > 0:  # jax aborts the process (no exception) when it cannot reach the coordinator
            _wait_for_coordinator(address, timeout_s, f"process {pid} of {count}")
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # jax raises several types for an unreachable or wrong coordinator
        where = f"process {pid} of {count}" if address else "this TPU worker"
        raise HostsError(f"{where} could not join the coordinator at {address or '(TPU metadata)'} within "
                         f"{timeout_s} s ({type(e).__name__}: {e}). Start every process with the same "
                         f"address, reachable from all hosts, or raise --distributed_timeout.") from e


def _wait_for_coordinator(address: str, timeout_s: float, who: str) -> None:
    """Block until `address` (HOST:PORT) accepts a connection; HostsError after `timeout_s`."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise HostsError(f"coordinator address {address!r} is not HOST:PORT")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise HostsError(f"{who} could not join the coordinator at {address} within {timeout_s:g} s "
                                 f"({e}). Start process 0 first, with the same address, reachable from every "
                                 f"host, or raise --distributed_timeout.") from e
            time.sleep(0.2)


def count() -> int:
    return jax.process_count()


def index() -> int:
    return jax.process_index()


def is_primary() -> bool:
    return jax.process_index() == 0


def part() -> tuple[int, int]:
    """(this process, number of processes)."""
    return jax.process_index(), jax.process_count()


def rows(n: int) -> slice:
    """The rows of a global batch of `n` rows this process holds (an equal contiguous block)."""
    p, total = part()
    if n % total:
        raise ValueError(f"a batch of {n} rows does not split over {total} processes")
    return slice(p * n // total, (p + 1) * n // total)


def to_global(x: np.ndarray, sharding, global_rows: int) -> jax.Array:
    """One global array, rows over `sharding`, from this process's block of rows `x`."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(x), (global_rows,) + tuple(np.shape(x)[1:]))


def from_host(x: np.ndarray, sharding) -> jax.Array:
    """A global array from a value every process holds whole (identical on all of them)."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def gather(x: Any) -> Any:
    """The whole of each (global) array of `x` in this process's host memory, as NumPy."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, x)
    from jax.experimental import multihost_utils
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(x, tiled=True))


def wait(name: str, timeout_s: int = 3600) -> None:
    """All processes meet here (a no-op for one process); `timeout_s` bounds the wait, e.g. for
    process 0 building the synthetic world while the others wait to load it."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed
    distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=int(timeout_s * 1000))


def log_suffix() -> str:
    """'' for process 0, '.process<k>' otherwise (per-process log files)."""
    return "" if is_primary() else f".process{index()}"


def describe() -> Optional[str]:
    """A one-line description of the runtime for the log, None for one process."""
    if jax.process_count() == 1:
        return None
    return (f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local of "
            f"{jax.device_count()} devices")
