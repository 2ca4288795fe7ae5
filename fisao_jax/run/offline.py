"""Passes over a fixed dataset (CSR's preference pairs, ViGoR's SFT targets): host-shuffled
chunks, one compiled update per chunk, an update with non-finite values skipped."""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np


def train_epochs(step: Callable, state: Any, data: dict, chunk: int, epochs: int, rng: np.random.Generator,
                 put: Callable[[dict], dict]) -> tuple[Any, dict, int]:
    """`epochs` shuffled passes over `data` (NumPy arrays with a 'weight' column, rows a
    multiple of `chunk`): `step(state, put(rows)) -> (state, metrics)` per `chunk` rows.

    Returns (state, metrics averaged over updates weighted by their real rows, skipped count)."""
    sums, weight, skipped = {}, 0.0, 0
    n = len(data["weight"])
    if n % chunk:
        raise ValueError(f"train_epochs: {n} rows are not a multiple of the chunk of {chunk}")
    for _ in range(epochs):
        perm = rng.permutation(n)
        for s in range(0, n, chunk):
            idx = perm[s:s + chunk]
            new, metrics = step(state, put({k: v[idx] for k, v in data.items()}))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not metrics.pop("finite"):
                skipped += 1
                continue
            state = new
            w = float(data["weight"][idx].sum())
            weight += w
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + w * v
    return state, {k: v / max(weight, 1e-12) for k, v in sums.items()}, skipped
