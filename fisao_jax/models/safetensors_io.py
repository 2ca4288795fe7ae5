"""Read (sharded) safetensors files into numpy without torch, bfloat16 included."""
from __future__ import annotations

import json
import pathlib
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _read_header(path: pathlib.Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + n


def weight_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of a checkpoint folder (single file or index + shards)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(folder.glob("pytorch_model*.bin"))
        if bins:
            return bins
        raise FileNotFoundError(f"no *.safetensors file in {folder}")
    return files


def iter_tensors(folder: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) for every tensor, memory-mapped where possible."""
    for path in weight_files(pathlib.Path(folder)):
        if path.suffix == ".bin":
            yield from _iter_torch_bin(path)
            continue
        header, offset = _read_header(path)
        data = np.memmap(path, dtype=np.uint8, mode="r")
        for name, info in header.items():
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            arr = data[offset + start: offset + end].view(dtype).reshape(info["shape"])
            yield name, arr


def _iter_torch_bin(path: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    """PyTorch `.bin` checkpoints (some hub repos ship only these): needs torch, weights only."""
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path} is a PyTorch checkpoint: install torch (pip install torch==2.13.0) to "
                          f"convert it, or re-save it as safetensors") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    for name, t in state.items():
        t = t.float() if t.dtype == torch.bfloat16 else t
        yield name, t.numpy()


def read_shapes(folder: pathlib.Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} without reading tensor data."""
    out = {}
    for path in weight_files(pathlib.Path(folder)):
        header, _ = _read_header(path)
        out.update({k: tuple(v["shape"]) for k, v in header.items()})
    return out
