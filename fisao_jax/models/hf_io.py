"""Loading models: Hugging Face checkpoints <-> Flax parameter trees, and the converted format.

    from fisao_jax.models.hf_io import from_hf
    module, params = from_hf("hf/llava-1.5-7b")          # or a tools/convert_hf.py folder

A converted folder holds `fisao_config.json` (our model config, tagged with the model kind)
and `params/` (an orbax checkpoint). A Hugging Face folder holds `config.json` and
safetensors. `from_hf` reads either and detects the architecture. The model files never
import this module: loading depends on the models, not the other way round.

Key layouts accepted for LLaVA: `language_model.model.*` / `model.language_model.*`,
`language_model.lm_head.*` / `lm_head.*`, `vision_tower.*` / `vision_tower.vision_model.*` /
`model.vision_tower.*`, `multi_modal_projector.*` / `model.multi_modal_projector.*`.
InstructBLIP and BLIP-2 (`Blip2ForImageTextRetrieval`) have one layout, the same in
transformers 4 and 5 and on the hub: `vision_model.*`, `query_tokens`, `qformer.*`,
`language_projection.*`, `language_model.model.*`, `language_model.lm_head.*` (InstructBLIP);
`embeddings.*`, `vision_projection.*`, `text_projection.*`, `itm_head.*` (BLIP-2).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax import traverse_util

from fisao_jax.models import blip_configs as B
from fisao_jax.models import configs as C
from fisao_jax.models import config_io
from fisao_jax.models.blip2 import Blip2RetrievalModel
from fisao_jax.models.clip import CLIPModel
from fisao_jax.models.instructblip import InstructBlipModel
from fisao_jax.models.llava import LlavaModel
from fisao_jax.models.lora import init_lora
from fisao_jax.models.safetensors_io import iter_tensors

CONVERTED_CONFIG = "fisao_config.json"
PARAMS_DIR = "params"

# HF buffers that are not parameters.
_IGNORED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")

# Canonical prefixes: each accepted HF prefix -> the one our mapping uses.
_LLAVA_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)
# Our top-level names -> canonical HF prefixes (LLaVA and InstructBLIP).
_LLAVA_TOP = {"language_model": "language_model.model", "lm_head": "language_model.lm_head"}
# Flax list-of-layers names -> transformers' ModuleList indices (LLaMA/CLIP/ViT `layers_N`,
# the Q-Former's BERT `layer_N`).
_LAYER_INDEX = re.compile(r"^(layers?)_(\d+)$")

# kind -> our config class. Policies (LoRA, value head) are the kinds in _POLICY_KINDS.
_KINDS = {"llava": C.LlavaConfig, "clip": C.CLIPConfig, "instructblip": B.InstructBlipConfig,
          "blip2_itm": B.Blip2RetrievalConfig}
_POLICY_KINDS = ("llava", "instructblip")
_BLIP2_ARCH = "Blip2ForImageTextRetrieval"


class ConversionError(ValueError):
    """A checkpoint does not fit the model: lists every offending key."""


def model_kind(hf_config: dict, source: str = "config.json") -> str:
    """'llava', 'clip', 'instructblip' or 'blip2_itm' from a config.json dict; error naming the
    file otherwise (BLIP-2: only the image-text retrieval architecture)."""
    mt = hf_config.get("model_type")
    if mt in ("llava", "clip", "instructblip"):
        return mt
    if mt == "blip-2":
        archs = hf_config.get("architectures") or []
        if _BLIP2_ARCH in archs:
            return "blip2_itm"
        raise ConversionError(f"{source}: BLIP-2 architecture {archs or 'unspecified'} is not supported "
                              f"(only {_BLIP2_ARCH}, e.g. Salesforce/blip2-itm-vit-g)")
    raise ConversionError(f"{source}: unsupported model_type {mt!r} "
                          f"(expected 'llava', 'clip', 'instructblip' or 'blip-2')")


def config_kind(cfg: Any) -> str:
    """The model kind of one of our configs."""
    for kind, cls in _KINDS.items():
        if isinstance(cfg, cls):
            return kind
    raise TypeError(f"no model kind for config type {type(cfg).__name__}")


def build_module(cfg: Any, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, remat: bool = False):
    """The Flax module for a config."""
    kind = config_kind(cfg)
    if kind == "llava":
        return LlavaModel(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat)
    if kind == "instructblip":
        return InstructBlipModel(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat)
    if kind == "clip":
        return CLIPModel(cfg, dtype=dtype, param_dtype=param_dtype)
    return Blip2RetrievalModel(cfg, dtype=dtype, param_dtype=param_dtype)


def _init_fn(module) -> Any:
    """`init(key) -> variables` touching every parameter with the smallest inputs."""
    cfg = module.cfg
    v = cfg.vision
    pixels = jnp.zeros((1, v.num_channels, v.image_size, v.image_size), jnp.float32)
    kind = config_kind(cfg)
    text = jnp.zeros((1, 2), jnp.int32)
    if kind in _POLICY_KINDS:  # one image's tokens, then one text token
        ids = jnp.full((1, cfg.num_image_tokens + 1), cfg.image_token_id, jnp.int32).at[0, -1].set(0)
    if kind == "llava":
        return lambda key: module.init(key, ids, pixel_values=pixels, method=module.init_all)
    if kind == "instructblip":
        return lambda key: module.init(key, ids, pixel_values=pixels, qformer_input_ids=text,
                                       qformer_attention_mask=jnp.ones_like(text), method=module.init_all)
    if kind == "blip2_itm":
        return lambda key: module.init(key, pixels, text, method=module.init_all)
    return lambda key: module.init(key, text, pixels)


def init_params(cfg: Any, key: jax.Array, param_dtype: Any = jnp.float32) -> Any:
    """Freshly initialised parameters of the model of `cfg` (random weights, for tests and the
    synthetic world)."""
    return jax.jit(_init_fn(build_module(cfg, param_dtype=param_dtype)))(key)["params"]


def abstract_params(cfg: Any, param_dtype: Any = jnp.float32) -> Any:
    """ShapeDtypeStruct tree of the model's parameters (no memory allocated)."""
    return jax.eval_shape(_init_fn(build_module(cfg, param_dtype=param_dtype)), jax.random.PRNGKey(0))["params"]


def flatten(tree: Any) -> dict:
    """{path tuple: leaf} of a nested dict."""
    return traverse_util.flatten_dict(tree)


def unflatten(flat: dict) -> dict:
    return traverse_util.unflatten_dict(flat)


def hf_key(path: tuple, kind: str) -> tuple[str, str]:
    """(HF key, transform) for one of our parameter paths. transform: 'linear'|'conv'|'none'."""
    parts = list(path)
    if kind in _POLICY_KINDS and parts[0] in _LLAVA_TOP:
        parts = _LLAVA_TOP[parts[0]].split(".") + parts[1:]
    leaf = parts[-1]
    parts = [_LAYER_INDEX.sub(r"\1.\2", p) for p in parts[:-1]]
    if leaf == "kernel":
        return ".".join(parts + ["weight"]), "kernel"
    if leaf in ("scale", "embedding"):
        return ".".join(parts + ["weight"]), "none"
    return ".".join(parts + [leaf]), "none"


def canonical_hf_key(key: str, kind: str) -> str:
    if kind == "llava":
        for old, new in _LLAVA_PREFIXES:
            if key.startswith(old):
                return new + key[len(old):]
    return key


def _to_ours(arr: np.ndarray, transform: str) -> np.ndarray:
    if transform == "kernel":
        if arr.ndim == 2:
            return arr.T
        if arr.ndim == 4:  # conv OIHW -> HWIO
            return arr.transpose(2, 3, 1, 0)
    return arr


def hf_to_params(folder: pathlib.Path, cfg: Any, param_dtype: Any = jnp.float32) -> dict:
    """Read safetensors from `folder` into our (base, LoRA-free) parameter tree.

    Raises ConversionError listing every missing, unexpected or mis-shaped tensor."""
    kind = config_kind(cfg)
    expected = flatten(abstract_params(_without_lora(cfg), param_dtype))
    wanted = {}
    for path, sds in expected.items():
        if kind in _POLICY_KINDS and path[0] == "value_head":
            continue  # ours, not in HF checkpoints
        key, transform = hf_key(path, kind)
        wanted[key] = (path, transform, sds)

    found, unexpected, bad_shape, dupes = {}, [], [], []
    for name, arr in iter_tensors(folder):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        key = canonical_hf_key(name, kind)
        if key not in wanted:
            unexpected.append(name)
            continue
        if key in found:
            dupes.append(name)
            continue
        path, transform, sds = wanted[key]
        val = _to_ours(arr, transform)
        if tuple(val.shape) != tuple(sds.shape):
            bad_shape.append(f"{name}: checkpoint {tuple(arr.shape)} vs model {tuple(sds.shape)} "
                             f"(as {'/'.join(path)})")
            continue
        found[key] = (path, val)
    missing = sorted(k for k in wanted if k not in found)
    problems = []
    if missing:
        problems.append("missing tensors:\n  " + "\n  ".join(missing))
    if unexpected:
        problems.append("unexpected tensors:\n  " + "\n  ".join(sorted(unexpected)))
    if bad_shape:
        problems.append("shape mismatches:\n  " + "\n  ".join(sorted(bad_shape)))
    if dupes:
        problems.append("tensors given twice (under two key layouts):\n  " + "\n  ".join(sorted(dupes)))
    if problems:
        raise ConversionError(f"checkpoint {folder} does not fit the {kind} model:\n" + "\n".join(problems))
    flat = {path: jnp.asarray(np.asarray(val), dtype=param_dtype) for path, val in found.values()}
    if kind in _POLICY_KINDS:
        for path, sds in expected.items():
            if path[0] == "value_head":
                flat[path] = jnp.zeros(sds.shape, sds.dtype)
    return unflatten(flat)


def _without_lora(cfg: Any) -> Any:
    """The config of the base (adapter-free) model; configs without LoRA unchanged."""
    return dataclasses.replace(cfg, lora=C.LoRAConfig()) if hasattr(cfg, "lora") else cfg


def _config_from_hf(kind: str, hf_cfg: Any) -> Any:
    parse = {"llava": C.llava_from_hf, "clip": C.clip_from_hf, "instructblip": B.instructblip_from_hf,
             "blip2_itm": B.blip2_retrieval_from_hf}[kind]
    return parse(hf_cfg)


def read_hf_config(folder: pathlib.Path) -> tuple[str, Any]:
    """(kind, our config) from a Hugging Face folder's config.json."""
    path = folder / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder}: no config.json (not a Hugging Face model folder) and no "
                                f"{CONVERTED_CONFIG} (not a converted folder)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from e
    kind = model_kind(raw, str(path))
    import transformers

    hf_cfg = transformers.AutoConfig.from_pretrained(str(folder))
    try:
        return kind, _config_from_hf(kind, hf_cfg)
    except ValueError as e:
        raise ConversionError(f"{path}: {e}") from e


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype: str = "float32",
            overwrite: bool = False) -> str:
    """Convert a HF LLaVA, CLIP, InstructBLIP or BLIP-2 retrieval folder into `dst` (orbax
    params + fisao_config.json).

    Output appears atomically: everything is written to a temporary sibling folder that is
    renamed to `dst` only after success. Returns the model kind."""
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    kind, cfg = read_hf_config(src)
    params = hf_to_params(src, cfg, jnp.dtype(dtype))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        save_params(tmp / PARAMS_DIR, params)
        meta = {"kind": kind, "dtype": dtype, "source": str(src.resolve()), "config": config_io.to_dict(cfg)}
        (tmp / CONVERTED_CONFIG).write_text(json.dumps(meta, indent=2))
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                     "preprocessor_config.json", "processor_config.json", "chat_template.json",
                     "chat_template.jinja", "vocab.json", "merges.txt", "config.json", "added_tokens.json",
                     "generation_config.json"):
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return kind


def save_params(path: pathlib.Path, params: Any) -> None:
    """Write a parameter tree as an orbax checkpoint at `path` (must not exist)."""
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(pathlib.Path(path).resolve(), params)
    ckptr.wait_until_finished()


def restore_params(path: pathlib.Path, abstract: Any) -> Any:
    """Read an orbax parameter checkpoint into the structure/dtypes of `abstract`, whole, on
    this process's first device (a leaf of `abstract` with a sharding keeps it): the
    checkpoint's own layout names devices of the machine that wrote it."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).resolve()
    if not path.exists():
        raise FileNotFoundError(f"no parameter checkpoint at {path}")
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or local),
                          abstract)
    return ocp.StandardCheckpointer().restore(path, target)


def from_hf(path, expect: Optional[str] = None, dtype: Any = jnp.float32, param_dtype: Any = None,
            lora: Optional[C.LoRAConfig] = None, lora_key: Optional[jax.Array] = None, remat: bool = False):
    """(module, params) from a Hugging Face folder or a folder written by tools/convert_hf.py.

    `expect` ('llava' | 'clip' | 'instructblip' | 'blip2_itm') makes any other architecture an
    error. `dtype` is the compute dtype, `param_dtype` (default: `dtype`) the frozen weights'.
    `lora` (a `LoRAConfig`, policies only) adds fresh float32 adapters (B = 0) initialised from
    `lora_key`; a policy's value head starts at zero (float32)."""
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    param_dtype = param_dtype or dtype
    if (folder / CONVERTED_CONFIG).exists():
        meta = json.loads((folder / CONVERTED_CONFIG).read_text())
        kind, cfg = meta["kind"], config_io.from_dict(meta["config"])
        if expect is not None and kind != expect:
            raise ConversionError(f"{folder} holds a {kind} model, expected {expect}")
        abstract = abstract_params(_without_lora(cfg), param_dtype)
        params = restore_params(folder / PARAMS_DIR, abstract)
    else:
        kind, cfg = read_hf_config(folder)
        if expect is not None and kind != expect:
            raise ConversionError(f"{folder} holds a {kind} model, expected {expect}")
        params = hf_to_params(folder, cfg, param_dtype)
    if kind in _POLICY_KINDS and lora is not None and lora.rank > 0:
        cfg = dataclasses.replace(cfg, lora=lora)
        # adapters are trained: keep them in float32 whatever the base weights' dtype
        params = init_lora(params, lora.rank, lora_key if lora_key is not None else jax.random.PRNGKey(0),
                           dtype=jnp.float32)
    return build_module(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat), params
