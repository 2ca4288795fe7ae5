"""Host-side batches for the offline methods (CSR's pairs, ViGoR's SFT set)."""
from __future__ import annotations

import numpy as np


def prompt_batches(task, num_prompts: int, batch_size: int) -> list[tuple[dict, int]]:
    """The first `num_prompts` training prompts (the task's seeded order) as `(batch, n)`:
    full `batch_size`-row batches (static shapes), of which the first `n` rows are used (the
    last batch is filled up with the following prompts, whose results are dropped)."""
    out, position = [], 0
    while position < num_prompts:
        batch, position_next = task.train_batch(position, batch_size)
        out.append((batch, min(batch_size, num_prompts - position)))
        position = position_next
    return out


def pad_to_multiple(arrays: dict, multiple: int) -> dict:
    """Rows repeated from row 0 up to a multiple of `multiple`, with `weight` 1 on real rows
    and 0 on the copies (static shapes for the compiled updates)."""
    n = len(next(iter(arrays.values())))
    if n == 0:
        raise ValueError("pad_to_multiple: no rows")
    size = -(-n // multiple) * multiple
    out = {k: np.concatenate([v, np.repeat(v[:1], size - n, axis=0)]) if size > n else v for k, v in arrays.items()}
    weight = np.zeros(size, np.float32)
    weight[:n] = 1.0
    out["weight"] = weight
    return out

