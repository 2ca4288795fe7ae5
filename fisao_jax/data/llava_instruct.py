"""LLaVA-Instruct-150k prompts for FiSAO rollouts: first human turn + its COCO image.

Source: a local JSON / JSONL (optionally .gz) list of
`{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}, ...]}` (the format of
`llava_instruct_150k.json`), or a Hugging Face `datasets` id (needs the optional
`datasets` package). The first `limit` entries of the source are read (the paper's "first
8k"); entries that cannot be used are skipped and counted by reason, or raise with
`on_error='raise'`. A `LoadReport` says what happened.

The prompt is the first human turn with its `<image>` placeholder removed (LLaVA's
`preprocess_multimodal` moves it to the front; `prompts.format_prompt` puts it back).

Batches: `batch_at(records, position, ...)` is a pure function of an integer data position
(number of examples consumed so far), so the trainer keeps that integer in its state and
resumes exactly. Epoch e visits the records in a permutation seeded by (seed, e).
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
import re
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from fisao_jax.data import image as image_lib
from fisao_jax.data.image_config import ImageConfig
from fisao_jax.data.prompts import VICUNA_V1_SYSTEM, encode_prompts, format_prompt, strip_image_placeholder

log = logging.getLogger(__name__)

SKIP_REASONS = ("malformed", "no_image", "empty_turn", "missing_image", "unreadable_image")
HUMAN_ROLES = ("human", "user")
_COCO_NUMBER = re.compile(r"(?:COCO_(?:train|val)2014_)?(\d+)\.(?:jpg|jpeg|png)$", re.IGNORECASE)
_HF_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class InstructDataError(ValueError):
    """An unusable entry under `on_error='raise'` (the message names source, entry and id)."""


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One rollout prompt: `prompt` is plain question text (no `<image>`); `image_path` exists."""

    id: str
    prompt: str
    image_path: str


@dataclasses.dataclass
class LoadReport:
    """Counts of entries read, kept and skipped (by reason), with the first few examples."""

    source: str
    read: int = 0
    kept: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=lambda: {r: 0 for r in SKIP_REASONS})
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    max_examples: int = 5

    def skip(self, reason: str, message: str) -> None:
        """Count one skipped entry under `reason`, keeping its message if among the first few."""
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(message)

    @property
    def num_skipped(self) -> int:
        """Total entries skipped."""
        return sum(self.skipped.values())

    def summary(self) -> str:
        """Human-readable multi-line report."""
        lines = [f"{self.source}: read {self.read}, kept {self.kept}, skipped {self.num_skipped}"]
        for reason in SKIP_REASONS:
            if self.skipped[reason]:
                lines.append(f"  {reason}: {self.skipped[reason]}")
                lines.extend(f"    e.g. {m}" for m in self.examples.get(reason, []))
        return "\n".join(lines)


def read_entries(source: str | os.PathLike, limit: int | None = None, hf_data_files: str | None = None,
                 hf_split: str = "train") -> Iterator[Any]:
    """The first `limit` raw entries of a local JSON/JSONL(.gz) file or a HF datasets id."""
    path = os.fspath(source)
    if os.path.exists(path):
        entries: Iterable[Any] = _read_local(path)
    elif _HF_ID.match(path) and not path.lower().endswith((".json", ".jsonl", ".gz")):
        entries = _read_hf(path, hf_data_files, hf_split)
    else:
        raise FileNotFoundError(f"LLaVA-Instruct file not found: {path}")
    for i, entry in enumerate(entries):
        if limit is not None and i >= limit:
            return
        yield entry


def _read_local(path: str) -> list[Any]:
    opener = gzip.open if path.endswith(".gz") else open
    stem = path[:-3] if path.endswith(".gz") else path
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if stem.endswith(".jsonl"):
                entries = []
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            entries.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{path}: invalid JSON on line {lineno}: {e.msg}") from None
                return entries
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations, got {type(data).__name__}")
    return data


def _read_hf(dataset_id: str, data_files: str | None, split: str) -> Iterable[Any]:
    try:
        import datasets  # optional dependency
    except ImportError:
        raise ImportError(
            f"'{dataset_id}' is not a local file, and reading a Hugging Face dataset needs the optional "
            "'datasets' package (pip install datasets); or pass the path of a downloaded "
            "llava_instruct_150k.json") from None
    return datasets.load_dataset(dataset_id, data_files=data_files, split=split, streaming=True)


def image_candidates(coco_root: str | os.PathLike, image: str) -> list[str]:
    """Paths where `image` may live: as given, under coco_root, train2017/, train2014/, val2014/.

    COCO 2017 train names (`000000033471.jpg`) are also tried as 2014 names
    (`COCO_train2014_000000033471.jpg`, `COCO_val2014_...`) and vice versa.
    """
    root = os.fspath(coco_root)
    if os.path.isabs(image):
        return [image]
    names = [os.path.join(root, image), os.path.join(root, os.path.basename(image))]
    match = _COCO_NUMBER.search(os.path.basename(image))
    if match:
        number = int(match.group(1))
        names += [os.path.join(root, "train2017", f"{number:012d}.jpg"),
                  os.path.join(root, "train2014", f"COCO_train2014_{number:012d}.jpg"),
                  os.path.join(root, "val2014", f"COCO_val2014_{number:012d}.jpg"),
                  os.path.join(root, "val2017", f"{number:012d}.jpg")]
    else:
        names += [os.path.join(root, split, os.path.basename(image)) for split in ("train2017", "train2014")]
    return list(dict.fromkeys(names))


def resolve_image(coco_root: str | os.PathLike, image: str) -> str | None:
    """First existing candidate path for `image`, or None."""
    for candidate in image_candidates(coco_root, image):
        if os.path.isfile(candidate):
            return candidate
    return None


def first_human_turn(entry: Any) -> str:
    """Text of the first human turn ('' if there is none); ValueError if the entry is malformed."""
    if not isinstance(entry, dict):
        raise ValueError(f"entry is a {type(entry).__name__}, not an object")
    turns = entry.get("conversations")
    if not isinstance(turns, list):
        raise ValueError("'conversations' is missing or not a list")
    for turn in turns:
        if isinstance(turn, dict) and turn.get("from") in HUMAN_ROLES:
            value = turn.get("value")
            if not isinstance(value, str):
                raise ValueError("human turn has no string 'value'")
            return value
    return ""


def load_llava_instruct(source: str | os.PathLike, coco_root: str | os.PathLike, limit: int | None = 8000,
                        on_error: str = "skip", check_images: str = "open", hf_data_files: str | None = None,
                        hf_split: str = "train", progress: bool = True) -> tuple[list[PromptRecord], LoadReport]:
    """Read the first `limit` entries into `PromptRecord`s (source order).

    on_error: 'skip' (count by reason in the report) or 'raise' (`InstructDataError`).
    check_images: 'exists', 'open' (PIL parses the header; default) or 'decode' (full decode,
      catches truncated files; slower).
    hf_data_files: for a datasets id, e.g. 'llava_instruct_150k.json' for
      'liuhaotian/LLaVA-Instruct-150K'.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if check_images not in image_lib.CHECK_MODES:
        raise ValueError(f"check_images must be one of {image_lib.CHECK_MODES}, got {check_images!r}")
    if not os.path.isdir(coco_root):
        raise FileNotFoundError(f"COCO image folder not found: {os.fspath(coco_root)}")
    source_name = os.fspath(source)
    report = LoadReport(source=source_name)
    records: list[PromptRecord] = []
    entries = read_entries(source, limit, hf_data_files, hf_split)
    if progress:
        from tqdm import tqdm
        entries = tqdm(entries, total=limit, desc="LLaVA-Instruct", unit="conversation")

    for index, entry in enumerate(entries):
        report.read += 1
        entry_id = str(entry.get("id", index)) if isinstance(entry, dict) else str(index)
        where = f"{source_name} entry {index} (id {entry_id})"

        def fail(reason: str, message: str) -> None:
            if on_error == "raise":
                raise InstructDataError(f"{where}: {message}")
            report.skip(reason, f"{where}: {message}")

        try:
            question = first_human_turn(entry)
        except ValueError as e:
            fail("malformed", str(e))
            continue
        image_name = entry.get("image")
        if not isinstance(image_name, str) or not image_name.strip():
            fail("no_image", "no 'image' field")
            continue
        prompt = strip_image_placeholder(question)
        if not prompt:
            fail("empty_turn", "no human turn, or it is empty")
            continue
        path = resolve_image(coco_root, image_name)
        if path is None:
            fail("missing_image", f"image {image_name!r} not found under {os.fspath(coco_root)}")
            continue
        problem = image_lib.check_image_file(path, check_images)
        if problem is not None:
            fail("unreadable_image", f"image {path}: {problem}")
            continue
        records.append(PromptRecord(id=entry_id, prompt=prompt, image_path=path))
        report.kept += 1

    log.info("%s", report.summary())
    return records, report


def encode_batch(records: Sequence[PromptRecord], tokenizer, image_token_id: int, num_image_tokens: int,
                 max_len: int | None, image_config: ImageConfig = ImageConfig(),
                 system: str | None = VICUNA_V1_SYSTEM, num_workers: int = 0) -> dict[str, np.ndarray]:
    """Model inputs for a batch of records, as `transformers.LlavaProcessor` would give them.

    Returns `input_ids`, `attention_mask` (int32 `[batch, max_len]`, left-padded; see
    `prompts.encode_prompts`) and `pixel_values` (float32 `[batch, 3, height, width]`).
    """
    texts = [format_prompt(r.prompt, system=system) for r in records]
    input_ids, attention_mask = encode_prompts(tokenizer, texts, image_token_id, num_image_tokens, max_len)
    pixel_values = image_lib.preprocess_batch([r.image_path for r in records], image_config, num_workers)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def epoch_order(num_records: int, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """int64 `[num_records]`: the visiting order of epoch `epoch` (a seeded permutation)."""
    if not shuffle:
        return np.arange(num_records)
    return np.random.default_rng([seed, epoch]).permutation(num_records)


def batch_indices(num_records: int, position: int, batch_size: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """int64 `[batch_size]`: record indices of the examples at data positions
    `position .. position + batch_size - 1` (positions run on across epochs)."""
    if num_records < 1:
        raise ValueError("no records to batch")
    if position < 0 or batch_size < 1:
        raise ValueError(f"need position >= 0 and batch_size >= 1, got {position}, {batch_size}")
    positions = position + np.arange(batch_size)
    epochs, offsets = positions // num_records, positions % num_records
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        here = epochs == epoch
        out[here] = epoch_order(num_records, int(epoch), seed, shuffle)[offsets[here]]
    return out


def batch_at(records: Sequence[Any], position: int, batch_size: int, seed: int = 0,
             shuffle: bool = True) -> tuple[list[Any], int]:
    """(batch of `batch_size` records starting at data `position`, next position)."""
    indices = batch_indices(len(records), position, batch_size, seed, shuffle)
    return [records[i] for i in indices], position + batch_size


def iterate_batches(records: Sequence[Any], batch_size: int, seed: int = 0, position: int = 0,
                    shuffle: bool = True) -> Iterator[tuple[list[Any], int]]:
    """Endless `(batch, next_position)` from `position`; save `next_position` to resume."""
    while True:
        batch, position = batch_at(records, position, batch_size, seed, shuffle)
        yield batch, position
