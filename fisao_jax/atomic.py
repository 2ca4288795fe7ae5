"""Files written whole or not at all: a temporary file in the target's folder, then a rename.

A crash or an exception mid-write leaves the previous file (or none), never half of a new one;
readers that check for a file's existence (caches, resumable runs) can trust what they find.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from typing import Any, Iterable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A fresh temporary path beside `path`, ending in the same suffix (so that writers which
    add an extension, as `np.save` / `np.savez` do, keep it), for the block to write. When the
    block ends without error it is renamed onto `path` (readable by all, 0o644); otherwise it is
    deleted. The parent folder is created if missing."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = pathlib.Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`data` to `path`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """`text` (UTF-8) to `path`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    """`obj` as JSON (non-ASCII kept as is) to `path`, atomically."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False))


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """One JSON object per line to `path`, atomically."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))
