"""Model configs <-> JSON: nested dicts with a `__class__` tag per dataclass (the
`fisao_config.json` of a converted checkpoint)."""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Union

from fisao_jax.models import blip_configs, configs

CLASSES = {**configs.CLASSES, **blip_configs.CLASSES}


def to_dict(cfg: Any) -> dict:
    """Nested dict with a `__class__` tag per dataclass, for JSON."""
    out = {"__class__": type(cfg).__name__}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
    return out


def from_dict(d: dict) -> Any:
    """Inverse of `to_dict`; ValueError naming an unknown class or key."""
    d = dict(d)
    cls_name = d.pop("__class__", None)
    if cls_name not in CLASSES:
        raise ValueError(f"unknown config class {cls_name!r}")
    cls = CLASSES[cls_name]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown keys for {cls_name}: {sorted(unknown)}")
    kw = {k: from_dict(v) if isinstance(v, dict) and "__class__" in v else v for k, v in d.items()}
    if "vision_feature_layer" in kw and isinstance(kw["vision_feature_layer"], list):
        kw["vision_feature_layer"] = tuple(kw["vision_feature_layer"])
    return cls(**kw)


def save_json(cfg: Any, path: Union[str, pathlib.Path]) -> None:
    pathlib.Path(path).write_text(json.dumps(to_dict(cfg), indent=2))


def load_json(path: Union[str, pathlib.Path]) -> Any:
    return from_dict(json.loads(pathlib.Path(path).read_text()))
