"""Passes over a fixed dataset (CSR's preference pairs, ViGoR's SFT targets): host-shuffled
chunks, one compiled update per chunk, an update with non-finite values skipped."""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np


def train_epochs(step: Callable, state: Any, data: dict, chunk: int, epochs: int, rng: np.random.Generator,
                 put: Callable[[dict], dict], key: jax.Array) -> tuple[Any, dict, int]:
    """`epochs` shuffled passes over `data` (NumPy arrays with a 'weight' column, rows a
    multiple of `chunk`): `step(state, put(rows), key_i) -> (state, metrics)` per `chunk` rows,
    key_i = fold_in(key, i) for the i-th call (the LoRA dropout's randomness).

    Returns (state, metrics averaged over updates weighted by their real rows, skipped count)."""
    sums, weight, skipped = {}, 0.0, 0
    n = len(data["weight"])
    if n % chunk:
        raise ValueError(f"train_epochs: {n} rows are not a multiple of the chunk of {chunk}")
    calls = 0
    for _ in range(epochs):
        perm = rng.permutation(n)
        for s in range(0, n, chunk):
            idx = perm[s:s + chunk]
            new, metrics = step(state, put({k: v[idx] for k, v in data.items()}), jax.random.fold_in(key, calls))
            calls += 1
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
