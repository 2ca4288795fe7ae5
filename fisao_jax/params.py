"""Trainable / frozen split of a parameter tree.

Only the LoRA adapters (leaves named `lora_a` or `lora_b`, anywhere in the tree) and the
value head (everything under the top-level key `value_head`) are trained. Splitting the tree
in two lets the optimizer see the trainable part only, so the frozen weights (the 7B base
model) never enter the optimizer state, not even as zeros, and pass through an update as the
very same arrays.

Trees are nested dicts as produced by flax.linen (`variables["params"]`); the split halves
are plain nested dicts holding only their own leaves (no placeholders).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

LORA_LEAF_NAMES = ("lora_a", "lora_b")
VALUE_HEAD_KEY = "value_head"


def is_trainable_path(path: tuple[str, ...]) -> bool:
    """True for a LoRA leaf (`.../lora_a`, `.../lora_b`) or any leaf under `value_head/`."""
    return bool(path) and (path[0] == VALUE_HEAD_KEY or path[-1] in LORA_LEAF_NAMES)


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def trainable_mask(params: Any) -> Any:
    """Pytree of bools with the structure of `params`: True where the leaf is trained."""
    return jax.tree_util.tree_map_with_path(lambda p, _: is_trainable_path(_path_names(p)), params)


def _split(node: Mapping, path: tuple[str, ...]) -> tuple[dict, dict]:
    trainable, frozen = {}, {}
    for key, value in node.items():
        sub = path + (str(key),)
        if isinstance(value, Mapping):
            t, f = _split(value, sub)
            if t:
                trainable[key] = t
            if f:
                frozen[key] = f
        elif is_trainable_path(sub):
            trainable[key] = value
        else:
            frozen[key] = value
    return trainable, frozen


def split_params(params: Mapping) -> tuple[dict, dict]:
    """Split a params tree into `(trainable, frozen)` nested dicts (see module docstring).

    Raises ValueError when `params` is not a dict or holds no trainable leaf: training would
    silently do nothing.
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"split_params: expected a nested dict of params, got {type(params).__name__}")
    trainable, frozen = _split(params, ())
    if not trainable:
        raise ValueError(
            "split_params: no trainable leaf found (expected leaves named "
            f"{' or '.join(LORA_LEAF_NAMES)} or a top-level '{VALUE_HEAD_KEY}'); "
            f"top-level keys are {sorted(map(str, params))}")
    return trainable, frozen


def merge_params(trainable: Mapping, frozen: Mapping) -> dict:
    """Inverse of `split_params`: one nested dict holding the leaves of both halves.

    Jit-safe (pure dict surgery). Raises ValueError naming the path if both halves hold the
    same leaf, or one holds a leaf where the other holds a subtree.
    """
    return _merge(trainable, frozen, ())


def _merge(a: Mapping, b: Mapping, path: tuple[str, ...]) -> dict:
    out = dict(b)
    for key, value in a.items():
        if key not in out:
            out[key] = dict(value) if isinstance(value, Mapping) else value
            continue
        other = out[key]
        where = "/".join(path + (str(key),))
        if isinstance(value, Mapping) and isinstance(other, Mapping):
            out[key] = _merge(value, other, path + (str(key),))
        else:
            raise ValueError(f"merge_params: both the trainable and the frozen tree hold '{where}'")
    return out
