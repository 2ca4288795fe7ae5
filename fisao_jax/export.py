"""LLaVA parameter trees written back as Hugging Face folders, with LoRA merged, and checked.

The export writes the key layout of `llava-hf/llava-1.5-7b-hf`
(`language_model.model.*`, `language_model.lm_head.weight`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`), which transformers 4.x and 5.x, vLLM and lmms-eval all read,
as safetensors (sharded above `max_shard_bytes`, with `model.safetensors.index.json`), plus
`config.json`, `generation_config.json` and the tokenizer/processor files of the source.
LoRA is merged in float32 per tensor (kernel + alpha/r * A @ B) before the single cast to
the export dtype, so a small update is not rounded away by an intermediate bfloat16 kernel.
The value head is ours and is not exported. Sources may be LoRA adapter folders
(`lora_adapter.py`) on top of a base model.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import Any, Mapping, NamedTuple, Optional

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from fisao_jax.lora_adapter import (
    ExportError,
    PathLike,
    apply_adapter,
    atomic_dir,
    commit_dir,
    is_adapter,
    load_adapter,
    natural_key,
    write_safetensors,
)
from fisao_jax.models import configs as C
from fisao_jax.models import hf_io
from fisao_jax.models.lora import LORA_LEAVES, merge_lora

# Files copied verbatim from the source folder: what AutoTokenizer / AutoProcessor read.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "preprocessor_config.json",
    "processor_config.json", "chat_template.json", "chat_template.jinja",
)
GENERATION_CONFIG = "generation_config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' long-standing default ("5GB")
EXPORT_DTYPES = ("float16", "bfloat16", "float32")


# ----------------------------------------------------------------------------- HF mapping

def hf_export_key(path: tuple) -> tuple[str, str]:
    """(HF key in the llava-hf hub layout, transform 'kernel'|'none') for one of our LLaVA paths."""
    key, transform = hf_io.hf_key(path, "llava")
    if key.startswith("vision_tower."):
        key = "vision_tower.vision_model." + key[len("vision_tower."):]
    return key, transform


def _to_hf(arr: np.ndarray, transform: str) -> np.ndarray:
    if transform == "kernel":
        if arr.ndim == 2:
            return arr.T
        if arr.ndim == 4:  # conv HWIO -> OIHW
            return arr.transpose(3, 2, 0, 1)
    return arr


def _cast(arr: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    with np.errstate(over="ignore"):  # overflow is reported below, naming the tensor
        out = arr.astype(dtype)
    if not np.isfinite(out).all():
        src_bad = int((~np.isfinite(arr)).sum())
        if src_bad:
            raise ExportError(f"{name}: {src_bad} non-finite value(s) in the parameters")
        raise ExportError(f"{name}: values up to {float(np.abs(arr).max()):.4g} overflow {np.dtype(dtype).name}; "
                          f"export as bfloat16 or float32")
    return out


class _Entry(NamedTuple):
    key: str
    shape: tuple
    owner: tuple       # our path of the leaf (or of the LoRA owner)
    transform: str
    merge: bool        # kernel with an adapter to fold in


def _export_plan(params: Mapping) -> list[_Entry]:
    flat = hf_io.flatten(params)
    entries, problems = [], []
    for path, v in flat.items():
        if path[0] == "value_head" or path[-1] in LORA_LEAVES:
            continue
        has_a, has_b = path[:-1] + ("lora_a",) in flat, path[:-1] + ("lora_b",) in flat
        if has_a != has_b:
            problems.append(f"{'/'.join(path[:-1])}: has {'lora_a' if has_a else 'lora_b'} without its partner")
        key, transform = hf_export_key(path)
        shape = tuple(v.shape)
        if transform == "kernel":
            shape = shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
        entries.append(_Entry(key, shape, path, transform, path[-1] == "kernel" and has_a and has_b))
    if problems:
        raise ExportError("inconsistent LoRA leaves:\n  " + "\n  ".join(problems))
    return sorted(entries, key=lambda e: natural_key(e.key))


def _tensor(flat: Mapping[tuple, Any], entry: _Entry, lora: C.LoRAConfig, dtype: np.dtype) -> np.ndarray:
    path = entry.owner
    if entry.merge:
        if lora.rank <= 0:
            raise ExportError(f"{'/'.join(path)} has LoRA leaves but the config's LoRA rank is {lora.rank}")
        node = {k: jnp.asarray(flat[path[:-1] + (k,)], jnp.float32) for k in ("kernel",) + LORA_LEAVES}
        arr = np.asarray(merge_lora(node, lora.alpha, lora.rank)["kernel"])
    else:
        arr = np.asarray(flat[path]).astype(np.float32)
    return _cast(_to_hf(arr, entry.transform), dtype, entry.key)


# ----------------------------------------------------------------------------- config

def hf_config_dict(cfg: C.LlavaConfig, dtype: str = "float16") -> dict:
    """config.json for `LlavaForConditionalGeneration` equal to our config (LoRA aside).

    Written as transformers itself writes it, plus the legacy `rope_theta` / `rope_scaling` /
    `torch_dtype` keys that transformers 4.x reads."""
    import transformers

    t, v = cfg.text, cfg.vision
    if t.rope_scaling_factor != 1.0:
        rope = {"rope_type": "linear", "factor": float(t.rope_scaling_factor), "rope_theta": float(t.rope_theta)}
    else:
        rope = {"rope_type": "default", "rope_theta": float(t.rope_theta)}
    text = transformers.LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, head_dim=t.dims_per_head,
        max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps, rope_parameters=rope,
        attention_bias=t.attention_bias, mlp_bias=t.mlp_bias, tie_word_embeddings=t.tie_word_embeddings,
        bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id, hidden_act="silu")
    vision = transformers.CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        num_channels=v.num_channels, layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act)
    layer = list(cfg.vision_feature_layer) if isinstance(cfg.vision_feature_layer, tuple) else cfg.vision_feature_layer
    extra = {"pad_token_id": t.pad_token_id} if t.pad_token_id is not None else {}
    hf = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=cfg.image_token_id,
        image_seq_length=cfg.num_image_tokens, projector_hidden_act=cfg.projector_hidden_act,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, vision_feature_layer=layer,
        multimodal_projector_bias=cfg.projector_bias, tie_word_embeddings=t.tie_word_embeddings,
        architectures=["LlavaForConditionalGeneration"], dtype=dtype, **extra)
    out = json.loads(hf.to_json_string(use_diff=True))
    out["torch_dtype"] = dtype
    out["text_config"]["rope_theta"] = float(t.rope_theta)
    if t.rope_scaling_factor != 1.0:
        out["text_config"]["rope_scaling"] = {"type": "linear", "factor": float(t.rope_scaling_factor)}
    return out


def _base_config(cfg: C.LlavaConfig) -> C.LlavaConfig:
    """`cfg` without LoRA and with head_dim spelled out (config.json always writes it, so a
    config that left it None reads back with the derived value)."""
    text = dataclasses.replace(cfg.text, head_dim=cfg.text.dims_per_head)
    return dataclasses.replace(cfg, lora=C.LoRAConfig(), text=text)


# ----------------------------------------------------------------------------- export

class ExportSummary(NamedTuple):
    dst: pathlib.Path
    weight_files: list      # file names, in order
    num_tensors: int
    total_bytes: int        # tensor data bytes over all shards
    copied: list            # tokenizer / processor / generation files copied from the source


def _plan_shards(entries: list[_Entry], itemsize: int, max_shard_bytes: int) -> list[list[_Entry]]:
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        n = int(np.prod(e.shape, dtype=np.int64)) * itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def export_llava(params: Mapping, cfg: C.LlavaConfig, dst: PathLike, tokenizer_dir: Optional[PathLike] = None,
                 dtype: str = "float16", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 overwrite: bool = False, progress: bool = True) -> ExportSummary:
    """Write `params` (LoRA merged with `cfg.lora`; value head dropped) as a Hugging Face LLaVA folder.

    params: our LLaVA tree (arrays of any float dtype; LoRA leaves optional). cfg: its config.
    tokenizer_dir: folder whose tokenizer/processor/generation files are copied (usually the
    HF or converted folder the model came from). dtype: 'float16' | 'bfloat16' | 'float32'.
    The folder appears atomically at `dst` (FileExistsError if it exists and not overwrite)."""
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    if not isinstance(cfg, C.LlavaConfig):
        raise ExportError(f"export_llava needs a LlavaConfig, got {type(cfg).__name__}")
    if max_shard_bytes <= 0:
        raise ExportError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    dst = pathlib.Path(dst)
    tokenizer_dir = pathlib.Path(tokenizer_dir) if tokenizer_dir is not None else None
    if tokenizer_dir is not None and not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"tokenizer folder {tokenizer_dir} does not exist")

    _check_against_model(params, cfg)
    entries = _export_plan(params)
    flat = hf_io.flatten(params)
    shards = _plan_shards(entries, np_dtype.itemsize, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    tmp = atomic_dir(dst, overwrite)
    try:
        bar = _progress(len(entries), f"export {dst.name}", progress)
        total, weight_map = 0, {}

        def produce(shard):
            for e in shard:
                yield _tensor(flat, e, cfg.lora, np_dtype)
                bar.update(1)

        for name, shard in zip(names, shards):
            total += write_safetensors(tmp / name, [e.key for e in shard], [e.shape for e in shard],
                                       [np_dtype] * len(shard), produce(shard), {"format": "pt"})
            weight_map.update({e.key: name for e in shard})
        bar.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        hf_cfg = hf_config_dict(_base_config(cfg), dtype)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
        copied = _copy_tokenizer(tokenizer_dir, tmp)
        if GENERATION_CONFIG not in copied:
            gen = {"bos_token_id": cfg.text.bos_token_id, "eos_token_id": cfg.text.eos_token_id,
                   "_from_model_config": True}
            if cfg.text.pad_token_id is not None:
                gen["pad_token_id"] = cfg.text.pad_token_id
            (tmp / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2))
        _verify(tmp, cfg, {e.key for e in entries})
        commit_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportSummary(dst, names, len(entries), total, copied)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)


def _copy_tokenizer(src: Optional[pathlib.Path], dst: pathlib.Path) -> list[str]:
    if src is None:
        return []
    copied = []
    for name in TOKENIZER_FILES + (GENERATION_CONFIG,):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def _check_against_model(params: Mapping, cfg: C.LlavaConfig) -> None:
    """Every base parameter of `cfg`'s model present with its shape; nothing else but LoRA/value head."""
    expected = hf_io.flatten(hf_io.abstract_params(_base_config(cfg)))
    flat = {p: v for p, v in hf_io.flatten(params).items() if p[-1] not in LORA_LEAVES}
    missing = sorted("/".join(p) for p in expected if p not in flat and p[0] != "value_head")
    extra = sorted("/".join(p) for p in flat if p not in expected)
    shapes = sorted(f"{'/'.join(p)}: {tuple(flat[p].shape)} vs config {tuple(s.shape)}"
                    for p, s in expected.items() if p in flat and tuple(flat[p].shape) != tuple(s.shape))
    problems = []
    if missing:
        problems.append("missing parameters:\n  " + "\n  ".join(missing))
    if extra:
        problems.append("parameters the config does not have:\n  " + "\n  ".join(extra))
    if shapes:
        problems.append("shape mismatches:\n  " + "\n  ".join(shapes))
    if problems:
        raise ExportError("parameters do not fit the config:\n" + "\n".join(problems))


def _verify(folder: pathlib.Path, cfg: C.LlavaConfig, keys: set) -> None:
    """The written config parses back to `cfg` and the written tensors are exactly `keys`."""
    back = C.llava_from_hf(json.loads((folder / "config.json").read_text()))
    if back != _base_config(cfg):
        raise ExportError(f"internal error: written config.json reads back as {back}, expected {_base_config(cfg)}")
    from fisao_jax.models.safetensors_io import read_shapes

    written = set(read_shapes(folder))
    if written != keys:
        raise ExportError(f"internal error: written tensors differ from the plan: "
                          f"{sorted(written ^ keys)[:10]}")


# ----------------------------------------------------------------------------- sources

def load_for_export(ckpt: PathLike, base: Optional[PathLike] = None) -> tuple[C.LlavaConfig, dict, pathlib.Path]:
    """(cfg, params, tokenizer folder) from a CLI source.

    ckpt: an adapter folder (base weights from `base`, else the adapter's recorded base), or
    a model folder (converted or Hugging Face). `base` also names the tokenizer folder; it
    defaults to the model folder. Converted folders load in their stored dtype, Hugging Face
    folders in float32 (merging happens in float32 either way)."""
    ckpt = pathlib.Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"--ckpt {ckpt} does not exist")
    if is_adapter(ckpt):
        adapter = load_adapter(ckpt)
        model_dir = pathlib.Path(base) if base is not None else (
            pathlib.Path(adapter.base) if adapter.base else None)
        if model_dir is None:
            raise ExportError(f"{ckpt} is an adapter without a recorded base model: pass --base "
                              "(the converted or Hugging Face folder it was trained on)")
        cfg, params = _load_model(model_dir)
        params = apply_adapter(params, adapter)
        return dataclasses.replace(cfg, lora=adapter.lora), params, model_dir
    cfg, params = _load_model(ckpt)
    return cfg, params, pathlib.Path(base) if base is not None else ckpt


def _load_model(folder: pathlib.Path) -> tuple[C.LlavaConfig, dict]:
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    dtype = jnp.float32
    meta_path = folder / hf_io.CONVERTED_CONFIG
    if meta_path.is_file():
        dtype = jnp.dtype(json.loads(meta_path.read_text()).get("dtype", "float32"))
    module, params = hf_io.from_hf(folder, expect="llava", dtype=dtype, param_dtype=dtype)
    return module.cfg, params
