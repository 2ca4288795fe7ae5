"""Reading evaluation inputs (JSON Lines or JSON arrays) with per-line problem reports.

Evaluation CLIs skip bad items instead of failing on the first one: every skipped item
becomes a `Problem` naming the file and line, problems are printed to stderr and
counted by kind in the CLI's JSON output (`--strict` turns them into an error).
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import os
import pathlib
import sys
from typing import Any, Iterable, Sequence

from fisao_jax import atomic


@dataclasses.dataclass(frozen=True)
class Problem:
    """One skipped input item: `where` is "file:line", `kind` a short counter key."""

    where: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclasses.dataclass(frozen=True)
class Record:
    """One parsed input object and where it came from ("file:line")."""

    where: str
    data: dict


def open_text(path: str | os.PathLike) -> Any:
    """Open a text file for reading, transparently un-gzipping `*.gz`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def load_json(path: str | os.PathLike) -> Any:
    """Parse a whole JSON (or JSON.gz) file; a syntax error names the file and line."""
    with open_text(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None


def read_records(
    path: str | os.PathLike, required_keys: Sequence[str]
) -> tuple[list[Record], list[Problem]]:
    """Objects of a JSON Lines file (or a JSON array file) that have `required_keys`.

    Blank lines are ignored. A line that is not a JSON object or lacks a required key is
    skipped and reported as a `Problem` ("malformed_line" / "missing_key"). For a JSON
    array file "line" means the 1-based item number.
    """
    records: list[Record] = []
    problems: list[Problem] = []
    with open_text(path) as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: invalid JSON array ({err.msg})") from None
        numbered: Iterable[tuple[str, Any, str | None]] = (
            (f"{path}: item {i}", item, None) for i, item in enumerate(items, 1)
        )
    else:
        numbered = _parse_lines(path, text)
    for where, item, error in numbered:
        if error is not None:
            problems.append(Problem(where, "malformed_line", error))
        elif not isinstance(item, dict):
            problems.append(Problem(where, "malformed_line", "not a JSON object"))
        else:
            missing = [k for k in required_keys if k not in item]
            if missing:
                problems.append(Problem(where, "missing_key", f"missing key(s) {missing}"))
            else:
                records.append(Record(where, item))
    return records, problems


def _parse_lines(path, text: str):
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{line_no}", json.loads(line), None
        except json.JSONDecodeError as err:
            yield f"{path}:{line_no}", None, f"not valid JSON ({err.msg})"


def image_id_of(value: Any) -> int:
    """COCO image id as int from an int, a digit string or a COCO file name.

    Accepts 296284, "296284", "000000296284", "COCO_val2014_000000296284.jpg".
    Raises ValueError for anything else.
    """
    if isinstance(value, bool):
        raise ValueError(f"image id {value!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        stem = value.rsplit("/", 1)[-1].split(".", 1)[0]
        digits = stem.rsplit("_", 1)[-1]
        if digits.isdigit():
            return int(digits)
    raise ValueError(f"image id {value!r} is not an integer or COCO file name")


def count_problems(problems: Iterable[Problem]) -> dict[str, int]:
    """Number of problems of each kind, e.g. {"unknown_image_id": 2}."""
    return dict(collections.Counter(p.kind for p in problems))


def report_problems(
    problems: Sequence[Problem], strict: bool, stream=sys.stderr, max_per_kind: int = 20
) -> None:
    """Print problems to `stream` (at most `max_per_kind` of each kind, then a count).

    With `strict`, exit with status 2 if there are any.
    """
    shown: collections.Counter = collections.Counter()
    for problem in problems:
        shown[problem.kind] += 1
        if shown[problem.kind] <= max_per_kind:
            print(f"skipped {problem}", file=stream)
    for kind, n in shown.items():
        if n > max_per_kind:
            print(f"skipped {n - max_per_kind} more item(s) of kind {kind!r}", file=stream)
    if strict and problems:
        print(f"error: {len(problems)} bad input item(s) and --strict given", file=stream)
        raise SystemExit(2)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as JSON to `path` via a temporary file and a rename (never half-written)."""
    atomic.write_json(path, obj, indent=1)
