"""Atomic file writes: whole new content or the old file, never a partial one or a stray temp file."""
import json
import os
import stat

import numpy as np
import pytest

from fisao_jax import atomic


def test_writes_create_folders_and_readable_files(tmp_path):
    path = tmp_path / "a" / "b" / "x.json"
    atomic.write_json(path, {"word": "café", "n": [1, 2]})
    assert json.loads(path.read_text(encoding="utf-8")) == {"word": "café", "n": [1, 2]}
    assert "café" in path.read_text(encoding="utf-8")  # non-ASCII kept as is
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    atomic.write_jsonl(tmp_path / "r.jsonl", [{"a": 1}, {"b": 2}])
    assert (tmp_path / "r.jsonl").read_text() == '{"a": 1}\n{"b": 2}\n'
    atomic.write_bytes(tmp_path / "raw.bin", b"\x00\x01")
    assert (tmp_path / "raw.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "r.jsonl", "raw.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "table.npy"
    np.save(path, np.arange(3))
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.atomic_path(path) as tmp:
            tmp.write_bytes(b"half a tab")
            raise RuntimeError("disk full")
    np.testing.assert_array_equal(np.load(path), np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["table.npy"]


def test_writers_that_add_a_suffix_write_the_named_file(tmp_path):
    # np.save / np.savez append .npy / .npz unless the name already ends with it
    with atomic.atomic_path(tmp_path / "t.npy") as tmp:
        np.save(tmp, np.ones(2))
    with atomic.atomic_path(tmp_path / "d.npz") as tmp:
        np.savez(tmp, x=np.zeros(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "t.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "t.npy"), np.ones(2))
    np.testing.assert_array_equal(np.load(tmp_path / "d.npz")["x"], np.zeros(1))
