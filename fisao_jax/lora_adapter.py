"""LoRA adapters on disk (save, load, apply), and the safetensors writer and atomic folder
writes that the Hugging Face export (`export.py`) shares.

Adapter format (a folder): `adapter.safetensors` holds the LoRA leaves (and the value head,
when present) keyed by our parameter paths joined with '/', e.g.
`language_model/layers_0/self_attn/q_proj/lora_a` ([in, r]) and `.../lora_b` ([r, out]);
`fisao_adapter.json` holds {"format": "fisao-lora", "version": 1, "rank", "alpha",
"dropout", "base"} where `base` is the model folder the adapter was trained on (or null).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import struct
import tempfile
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from fisao_jax.models import configs as C
from fisao_jax.models import hf_io
from fisao_jax.models.lora import LORA_LEAVES
from fisao_jax.models.safetensors_io import iter_tensors

PathLike = Union[str, os.PathLike]

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "fisao_adapter.json"
ADAPTER_FORMAT = "fisao-lora"
ADAPTER_VERSION = 1

_ST_DTYPES = {np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float32): "F32",
              np.dtype(np.float64): "F64", np.dtype(np.int32): "I32", np.dtype(np.int64): "I64"}


class ExportError(ValueError):
    """Bad export input: names the file, key or value at fault."""


# ----------------------------------------------------------------------------- small helpers

def natural_key(name: str) -> list:
    """'layers.10' after 'layers.9'."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def atomic_dir(dst: pathlib.Path, overwrite: bool) -> pathlib.Path:
    """A new temporary folder beside `dst` to write into; `commit_dir` moves it onto `dst`."""
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    return pathlib.Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))


def commit_dir(tmp: pathlib.Path, dst: pathlib.Path) -> None:
    """Replace `dst` (if any) by the finished folder `tmp`."""
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


# ----------------------------------------------------------------------------- safetensors writer

def write_safetensors(path: PathLike, names: Sequence[str], shapes: Sequence[tuple], dtypes: Sequence[Any],
                      arrays: Iterable[np.ndarray], metadata: Optional[dict] = None) -> int:
    """Stream tensors into one safetensors file; returns the bytes of tensor data written.

    The header is built from `names`/`shapes`/`dtypes` up front, then each array of `arrays`
    (same order; may be a generator, so only one tensor is in memory at a time) is checked
    against it and appended. Header padded to 8 bytes as the reference writer does."""
    header: dict = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, shape, dtype in zip(names, shapes, dtypes):
        dtype = np.dtype(dtype)
        if dtype not in _ST_DTYPES:
            raise ExportError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    written = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype, arr in zip(names, shapes, dtypes, arrays):
            arr = np.ascontiguousarray(arr)
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ExportError(f"{path}: tensor {name!r} is {arr.dtype}{list(arr.shape)}, "
                                  f"planned {np.dtype(dtype)}{list(shape)}")
            f.write(arr.reshape(-1).view(np.uint8).data)
            written += arr.nbytes
    if written != offset:
        raise ExportError(f"{path}: wrote {written} bytes of tensor data, planned {offset}")
    return written


# ----------------------------------------------------------------------------- adapters

class Adapter(NamedTuple):
    """A LoRA adapter read from disk: its config, tensors {our path: array}, and base folder."""

    lora: C.LoRAConfig
    tensors: dict
    base: Optional[str]


def is_adapter(path: PathLike) -> bool:
    """True for an adapter folder (or its `adapter.safetensors`)."""
    p = pathlib.Path(path)
    folder = p.parent if p.is_file() else p
    return (folder / ADAPTER_CONFIG).is_file()


def save_adapter(params: Mapping, lora: C.LoRAConfig, dst: PathLike, base: Optional[PathLike] = None,
                 overwrite: bool = False) -> pathlib.Path:
    """Write the LoRA leaves (and value head) of `params` as an adapter folder at `dst`, atomically.

    `lora` gives rank/alpha/dropout (the model's `cfg.lora`); `base` records the model folder
    the adapter belongs to, so export can find it without --base."""
    dst = pathlib.Path(dst)
    if lora.rank <= 0:
        raise ExportError(f"save_adapter: LoRA rank must be > 0, got {lora.rank}")
    flat = {p: v for p, v in hf_io.flatten(params).items() if p[-1] in LORA_LEAVES or p[0] == "value_head"}
    if not any(p[-1] in LORA_LEAVES for p in flat):
        raise ExportError("save_adapter: the parameter tree holds no LoRA leaves (lora_a / lora_b)")
    for p, v in flat.items():
        want = {"lora_a": 1, "lora_b": 0}.get(p[-1])
        if want is not None and v.shape[want] != lora.rank:
            raise ExportError(f"save_adapter: {'/'.join(p)} has shape {tuple(v.shape)}, not rank {lora.rank}")
    names = sorted(flat, key=lambda p: natural_key("/".join(p)))
    arrays = [np.asarray(flat[p]) for p in names]
    tmp = atomic_dir(dst, overwrite)
    try:
        write_safetensors(tmp / ADAPTER_WEIGHTS, ["/".join(p) for p in names], [a.shape for a in arrays],
                          [a.dtype for a in arrays], arrays, {"format": ADAPTER_FORMAT})
        meta = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "rank": int(lora.rank),
                "alpha": float(lora.alpha), "dropout": float(lora.dropout),
                "base": str(pathlib.Path(base).resolve()) if base is not None else None}
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))
        commit_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def load_adapter(path: PathLike) -> Adapter:
    """Read an adapter folder (or its `adapter.safetensors`) written by `save_adapter`."""
    p = pathlib.Path(path)
    folder = p.parent if p.is_file() else p
    meta_path = folder / ADAPTER_CONFIG
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: no {ADAPTER_CONFIG} (not an adapter folder)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{meta_path}: invalid JSON ({e})") from e
    if meta.get("format") != ADAPTER_FORMAT:
        raise ExportError(f"{meta_path}: format is {meta.get('format')!r}, expected {ADAPTER_FORMAT!r}")
    if meta.get("version") != ADAPTER_VERSION:
        raise ExportError(f"{meta_path}: version {meta.get('version')!r} is not supported "
                          f"(this code reads version {ADAPTER_VERSION})")
    try:
        lora = C.LoRAConfig(rank=int(meta["rank"]), alpha=float(meta["alpha"]),
                            dropout=float(meta.get("dropout", 0.0)))
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{meta_path}: needs numeric 'rank' and 'alpha' ({e!r})") from e
    if lora.rank <= 0:
        raise ExportError(f"{meta_path}: rank must be > 0, got {lora.rank}")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: no {ADAPTER_WEIGHTS}")
    tensors, bad = {}, []
    for name, arr in iter_tensors(folder):
        path_t = tuple(name.split("/"))
        if path_t[-1] not in LORA_LEAVES and path_t[0] != "value_head":
            bad.append(f"{name}: not a LoRA leaf (lora_a / lora_b) nor part of value_head")
            continue
        if path_t[-1] == "lora_a" and (arr.ndim != 2 or arr.shape[1] != lora.rank):
            bad.append(f"{name}: shape {tuple(arr.shape)}, expected [in, {lora.rank}]")
        if path_t[-1] == "lora_b" and (arr.ndim != 2 or arr.shape[0] != lora.rank):
            bad.append(f"{name}: shape {tuple(arr.shape)}, expected [{lora.rank}, out]")
        tensors[path_t] = np.array(arr)
    if bad:
        raise ExportError(f"{weights} does not match rank {lora.rank} in {meta_path}:\n  " + "\n  ".join(bad))
    return Adapter(lora, tensors, meta.get("base"))


def apply_adapter(params: Mapping, adapter: Adapter) -> dict:
    """`params` (a base tree) with the adapter's LoRA leaves (and value head) inserted.

    Raises ExportError listing every adapter tensor without a matching kernel, of the wrong
    shape, or whose partner (lora_a without lora_b or vice versa) is missing."""
    flat = hf_io.flatten(params)
    problems = []
    owners: dict[tuple, set] = {}
    for path, arr in adapter.tensors.items():
        name = "/".join(path)
        if path[-1] in LORA_LEAVES:
            kernel = flat.get(path[:-1] + ("kernel",))
            owners.setdefault(path[:-1], set()).add(path[-1])
            if kernel is None or len(kernel.shape) != 2:
                problems.append(f"{name}: the model has no 2-D kernel at {'/'.join(path[:-1])}")
                continue
            want = (kernel.shape[0], adapter.lora.rank) if path[-1] == "lora_a" else (adapter.lora.rank,
                                                                                    kernel.shape[1])
            if tuple(arr.shape) != want:
                problems.append(f"{name}: shape {tuple(arr.shape)}, the model needs {want}")
        else:
            old = flat.get(path)
            if old is None or tuple(old.shape) != tuple(arr.shape):
                problems.append(f"{name}: the model has {'no such parameter' if old is None else tuple(old.shape)}")
    for owner, leaves in owners.items():
        if leaves != set(LORA_LEAVES):
            missing = sorted(set(LORA_LEAVES) - leaves)
            problems.append(f"{'/'.join(owner)}: adapter lacks {missing}")
    if problems:
        raise ExportError("adapter does not fit the model:\n  " + "\n  ".join(problems))
    flat.update({p: jnp.asarray(v) for p, v in adapter.tensors.items()})
    return hf_io.unflatten(flat)
