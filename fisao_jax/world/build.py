"""Pretrain the synthetic world's tokenizer, CLIP and SFT LLaVA, or load them from the cache.

    arts = build_world("runs/tiny", default_build_config())
    tokenizer = arts.load_tokenizer()
    clip_module, clip_params = arts.load_clip()
    llava_module, llava_params = arts.load_llava(lora=LoRAConfig(rank=8, alpha=16))

Three stages, each cached in its own folder under `workdir/world/`:

    tokenizer-<key>/   transformers tokenizer files
    clip-<key>/        fisao_config.json + params/ (CLIP, the verifier)
    llava-<key>/       fisao_config.json + params/ (SFT LLaVA, the policy)

A stage's key hashes the settings it depends on (`stage_settings`), FORMAT_VERSION and
the file contents of the stages it was trained from. So changing SFT settings or the
hallucination rate keeps the tokenizer and CLIP, and a retrained upstream stage whose
files differ can never be paired with a downstream stage trained on the old one.

Each folder also holds `stage.json`: its key, settings, quality metrics, training history
and the sha256 of every file. A stage is written into a temporary sibling and renamed into
place only when complete, so a crash never leaves a half-written stage under the final
name. A final-named folder that fails its check (missing, altered or extra files, wrong
key) raises `WorldCacheError`, or with `on_invalid="rebuild"` is deleted and rebuilt; it
is never used in part.

Data: all stages train on scenes of split `configs.PRETRAIN_SPLIT` ("pretrain") and report
metrics on `configs.EVAL_SPLIT` ("pretrain-eval"), both under `cfg.seed`; use other split
names for PPO prompts, calibration and evaluation.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from fisao_jax.data import synthetic
import fisao_jax.world.configs as wc

FORMAT_VERSION = 1
"""Bump when the training code changes what a given configuration produces."""
STAGE_FILE = "stage.json"
STAGES = ("tokenizer", "clip", "llava")


class WorldCacheError(RuntimeError):
    """A cached stage folder is incomplete, altered, or not the stage its name says."""


@dataclasses.dataclass(frozen=True)
class WorldArtifacts:
    """Paths and facts of a built world. Load models with the methods.

    prompt_len: left-padded prompt length (image tokens included) the SFT used; pass it to
      `encode_prompts` so every prompt of the world fits.
    system: the prompt template's system message (None = "USER: <image>\\n... ASSISTANT:").
    metrics: {'clip': presence AUCs, 'llava': greedy caption metrics, 'prior': the same
      metrics of the biased captions}, from each stage's stage.json.
    trained: stages trained by this call (empty when everything came from the cache).
    seconds: wall time of each stage in this call (training or loading).
    keys: {stage: cache key}; a changed key means a retrained model.
    """

    workdir: pathlib.Path
    tokenizer_dir: pathlib.Path
    clip_dir: pathlib.Path
    llava_dir: pathlib.Path
    config: wc.WorldBuildConfig
    prompt_len: int
    system: Optional[str]
    max_new_tokens: int
    metrics: dict
    trained: tuple[str, ...]
    seconds: dict
    keys: dict

    @property
    def world(self) -> synthetic.WorldConfig:
        return self.config.world

    def load_tokenizer(self):
        """The transformers tokenizer (<unk>=0, <s>=1, </s>=2, <image>, <pad>)."""
        import transformers
        return transformers.AutoTokenizer.from_pretrained(str(self.tokenizer_dir))

    def load_clip(self, dtype: Any = None):
        """(CLIPModel, params): the verifier."""
        from fisao_jax.models import hf_io
        return hf_io.from_hf(self.clip_dir) if dtype is None else hf_io.from_hf(self.clip_dir, dtype=dtype)

    def load_llava(self, lora=None, lora_key=None, dtype: Any = None):
        """(LlavaModel, params): the SFT policy; `lora` (a LoRAConfig) adds fresh adapters."""
        from fisao_jax.models import hf_io
        kw = {} if dtype is None else {"dtype": dtype}
        return hf_io.from_hf(self.llava_dir, lora=lora, lora_key=lora_key, **kw)

    def encode_prompts(self, tokenizer, prompts: Sequence[str], llava_cfg) -> tuple[np.ndarray, np.ndarray]:
        """Instructions -> left-padded (input_ids, attention_mask) int32 [n, prompt_len], as in SFT."""
        from fisao_jax.world.sft import encode_prompt_batch
        return encode_prompt_batch(tokenizer, llava_cfg, prompts, self.system, self.prompt_len)

    def pixel_values(self, images: np.ndarray) -> np.ndarray:
        """uint8 scenes [n,S,S,3] -> float32 [n,3,S,S], the world's one normalisation."""
        return wc.pixel_values(images, wc.image_config(self.world.image_size))


# ----------------------------------------------------------------------------- keys

def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def stage_settings(cfg: wc.WorldBuildConfig) -> dict:
    """{stage: the settings of `cfg` that stage depends on}.

    The tokenizer and CLIP never see the biased captions, so `world.hallucination_rate` is
    left out of theirs."""
    d = wc.to_dict(cfg)
    world_visual = {k: v for k, v in d["world"].items() if k != "hallucination_rate"}
    return {
        "tokenizer": {"world": world_visual, "tokenizer": d["tokenizer"], "system": d["sft"]["system"],
                      "seed": cfg.seed},
        "clip": {"world": world_visual, "clip": d["clip"], "seed": cfg.seed},
        "llava": {"world": d["world"], "sft": d["sft"], "seed": cfg.seed},
    }


def stage_key(stage: str, settings: dict, upstream: dict) -> str:
    """Cache key of a stage: its settings, the code version and the *contents* of the stages it
    was trained from (`upstream`: {stage: content digest}), so a rebuilt upstream stage whose
    files differ can never be paired with a downstream stage trained on the old one."""
    return _digest({"stage": stage, "version": FORMAT_VERSION, "settings": settings, "upstream": upstream})


# Files left out of a stage's content digest: the SentencePiece model records the temporary
# path it was trained in (its vocabulary is also in tokenizer.json, which is digested).
_UNDIGESTED = ("tokenizer.model",)


def content_digest(meta: dict) -> str:
    """Digest of a stage's files (from its stage.json), minus `_UNDIGESTED` files."""
    return _digest({k: v for k, v in meta["files"].items() if k not in _UNDIGESTED})


# ----------------------------------------------------------------------------- stage folders

def _file_hashes(folder: pathlib.Path) -> dict:
    """{relative path: sha256} of every file under `folder` except its own stage.json."""
    out = {}
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).as_posix()
        if f.is_file() and rel != STAGE_FILE:
            out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def check_stage(folder: pathlib.Path, key: str) -> dict:
    """The stage.json of a complete, unaltered stage folder with this key; raises WorldCacheError."""
    path = folder / STAGE_FILE
    if not path.is_file():
        raise WorldCacheError(f"{folder}: no {STAGE_FILE} (incomplete stage folder)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorldCacheError(f"{path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("key") != key:
        raise WorldCacheError(f"{path}: key {meta.get('key') if isinstance(meta, dict) else None!r} "
                              f"does not match the folder's key {key!r}")
    recorded = meta.get("files")
    if not isinstance(recorded, dict) or not recorded:
        raise WorldCacheError(f"{path}: no file list")
    actual = _file_hashes(folder)
    missing = sorted(set(recorded) - set(actual))
    extra = sorted(set(actual) - set(recorded))
    changed = sorted(f for f in set(recorded) & set(actual) if recorded[f] != actual[f])
    problems = [f"{what}: {names[:5]}" for what, names in (("missing files", missing), ("unexpected files", extra),
                                                           ("altered files", changed)) if names]
    if problems:
        raise WorldCacheError(f"{folder}: does not match its {STAGE_FILE} ({'; '.join(problems)})")
    return meta


def _write_stage(final: pathlib.Path, key: str, settings: dict, fill: Callable[[pathlib.Path], dict]) -> dict:
    """Build a stage in a temporary sibling with `fill(tmp) -> extra meta`, then rename to `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        extra = fill(tmp)
        meta = {"key": key, "settings": settings, **extra, "files": _file_hashes(tmp)}
        (tmp / STAGE_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            # Another process finished the same stage first: use its copy.
            shutil.rmtree(tmp, ignore_errors=True)
            return check_stage(final, key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _stage(folder: pathlib.Path, key: str, settings: dict, fill: Callable, on_invalid: str,
           log: Callable[[str], None]) -> tuple[dict, bool]:
    """(meta, trained): load a valid cached stage, else build it."""
    if folder.exists():
        try:
            return check_stage(folder, key), False
        except WorldCacheError as e:
            if on_invalid != "rebuild":
                raise WorldCacheError(f"{e}. Delete the folder, or pass on_invalid='rebuild' "
                                      f"(--rebuild) to replace it.") from None
            log(f"world: {e}; rebuilding")
            shutil.rmtree(folder)
    return _write_stage(folder, key, settings, fill), True


# ----------------------------------------------------------------------------- the build

def tokenizer_texts(cfg: wc.WorldBuildConfig, data: dict) -> list[str]:
    """Training text of the tokenizer: hallucination-free captions, CLIP texts, verifier texts, prompts."""
    from fisao_jax.data.prompts import format_prompt
    n = cfg.tokenizer.num_scenes
    words = synthetic.entity_names(cfg.world)
    prompts = [format_prompt(p, system=cfg.sft.system, with_image=False) for p in synthetic.PROMPTS]
    return (list(data["clean_captions"][:n]) + list(data["clip_texts"][:n])
            + [synthetic.clip_object_text(w) for w in words] * 5 + prompts * 20)


def build_world(workdir: str | os.PathLike, cfg: wc.WorldBuildConfig = wc.WorldBuildConfig(),
                on_invalid: str = "error", progress: bool = True,
                log: Optional[Callable[[str], None]] = None) -> WorldArtifacts:
    """Train (or load from `workdir/world/`) the tokenizer, CLIP and SFT LLaVA of `cfg`.

    on_invalid: 'error' (default) raises WorldCacheError on a damaged cache folder;
      'rebuild' deletes and retrains it.
    Returns WorldArtifacts (paths, prompt layout, quality metrics, what was trained)."""
    if on_invalid not in ("error", "rebuild"):
        raise ValueError(f"on_invalid must be 'error' or 'rebuild', got {on_invalid!r}")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    root = pathlib.Path(workdir) / "world"
    settings = stage_settings(cfg)
    keys: dict = {}
    dirs: dict = {}
    cache: dict = {}

    def train_data() -> dict:
        if "train" not in cache:
            n = max(cfg.tokenizer.num_scenes, cfg.clip.num_scenes, cfg.sft.num_scenes)
            cache["train"] = synthetic.make_dataset(cfg.world, n, cfg.seed, wc.PRETRAIN_SPLIT, progress=progress)
        return cache["train"]

    def eval_data() -> dict:
        if "eval" not in cache:
            n = max(cfg.clip.eval_scenes, cfg.sft.eval_scenes)
            cache["eval"] = synthetic.make_dataset(cfg.world, n, cfg.seed, wc.EVAL_SPLIT)
        return cache["eval"]

    def tokenizer():
        import transformers
        return transformers.AutoTokenizer.from_pretrained(str(dirs["tokenizer"]))

    def fill_tokenizer(tmp: pathlib.Path) -> dict:
        from fisao_jax.data.tokenizer import train_tokenizer
        out = tmp / "tokenizer"
        tok = train_tokenizer(tokenizer_texts(cfg, train_data()), out, cfg.tokenizer.vocab_size,
                              extra_special_tokens=("<image>",), pad_token="<pad>")
        for f in out.iterdir():  # the stage folder is the tokenizer folder
            f.rename(tmp / f.name)
        out.rmdir()
        return {"vocab_size": len(tok)}

    def fill_clip(tmp: pathlib.Path) -> dict:
        from fisao_jax.world import pretrain_clip
        tok = tokenizer()
        module, params, hist = pretrain_clip.train_clip(cfg.clip, cfg.world, tok, train_data(), cfg.seed, progress)
        metrics = pretrain_clip.evaluate_presence(module, params, tok, cfg.world,
                                                  _head(eval_data(), cfg.clip.eval_scenes))
        log(f"world: CLIP presence AUC {metrics['auc']:.4f} (partner AUC {metrics['partner_auc']:.4f}) "
            f"on {metrics['num_scenes']} held-out scenes")
        _save_model(tmp, "clip", module.cfg, params)
        return {"metrics": metrics, "history": _summary(hist)}

    def fill_llava(tmp: pathlib.Path) -> dict:
        from fisao_jax.models import hf_io
        from fisao_jax.world import sft
        tok = tokenizer()
        clip_module, clip_params = hf_io.from_hf(dirs["clip"])
        module, params, hist = sft.train_sft(cfg.sft, clip_module, clip_params, tok, train_data(), cfg.seed, progress)
        ev = _head(eval_data(), cfg.sft.eval_scenes)
        start = time.perf_counter()
        captions = sft.generate_captions(module, params, tok, ev["images"], ev["prompts"], cfg.sft.system,
                                         hist["prompt_len"], cfg.sft.max_new_tokens, greedy=True)
        metrics = sft.caption_metrics(captions, ev["gt_objects"], cfg.world)
        prior = sft.caption_metrics(ev["captions"], ev["gt_objects"], cfg.world)
        log(f"world: SFT greedy CHAIRi {metrics['CHAIRi']:.1f} recall {metrics['Recall']:.1f} partner rate "
            f"{metrics['partner_rate']:.2f} (captions: {prior['partner_rate']:.2f}) on {len(captions)} scenes")
        _save_model(tmp, "llava", module.cfg, params)
        return {"metrics": metrics, "prior": prior, "examples": captions[:8], "prompt_len": hist["prompt_len"],
                "eval_seconds": time.perf_counter() - start, "history": _summary(hist)}

    metas, trained, seconds = {}, [], {}
    upstream_of = {"tokenizer": (), "clip": ("tokenizer",), "llava": ("tokenizer", "clip")}
    for stage, fill in (("tokenizer", fill_tokenizer), ("clip", fill_clip), ("llava", fill_llava)):
        start = time.perf_counter()
        upstream = {u: content_digest(metas[u]) for u in upstream_of[stage]}
        keys[stage] = stage_key(stage, settings[stage], upstream)
        dirs[stage] = root / f"{stage}-{keys[stage]}"
        metas[stage], built = _stage(dirs[stage], keys[stage], {**settings[stage], "upstream": upstream}, fill,
                                     on_invalid, log)
        seconds[stage] = time.perf_counter() - start
        if built:
            trained.append(stage)
        log(f"world: {stage} {'trained' if built else 'loaded from cache'} ({seconds[stage]:.1f} s) {dirs[stage]}")
    llava_meta = metas["llava"]
    return WorldArtifacts(
        workdir=pathlib.Path(workdir), tokenizer_dir=dirs["tokenizer"], clip_dir=dirs["clip"],
        llava_dir=dirs["llava"], config=cfg, prompt_len=int(llava_meta["prompt_len"]), system=cfg.sft.system,
        max_new_tokens=cfg.sft.max_new_tokens,
        metrics={"clip": metas["clip"]["metrics"], "llava": llava_meta["metrics"], "prior": llava_meta["prior"]},
        trained=tuple(trained), seconds=seconds, keys=dict(keys))


def _head(data: dict, n: int) -> dict:
    return {k: v[:n] for k, v in data.items()}


def _summary(hist: dict) -> dict:
    """A training history as JSON types (per-step losses as floats)."""
    return {k: ([float(x) for x in v] if isinstance(v, list) else v) for k, v in hist.items()}


def _save_model(folder: pathlib.Path, kind: str, model_cfg: Any, params: Any) -> None:
    """The converted-folder format `models.hf_io.from_hf` reads."""
    import jax
    from fisao_jax.models import config_io
    from fisao_jax.models import hf_io
    hf_io.save_params(folder / hf_io.PARAMS_DIR, jax.device_get(params))
    meta = {"kind": kind, "dtype": "float32", "source": "fisao_jax.world", "config": config_io.to_dict(model_cfg)}
    (folder / hf_io.CONVERTED_CONFIG).write_text(json.dumps(meta, indent=2))
