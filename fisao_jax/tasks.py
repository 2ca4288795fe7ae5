"""Tasks: where prompts, images, ground truth, tokenizers and checkpoints come from.

A task gives the trainer:
  policy_dir, verifier_dir        model folders (Hugging Face or converted)
  tokenizer, verifier_tokenizer   transformers tokenizers
  entity_vocab, chair_vocab       verifier vocabulary; CHAIR vocabulary for labels / metrics
  eos_token_id, pad_token_id
  num_train_prompts
  train_batch(position, batch_size) -> (batch, next_position)
  calibration_batches(batch_size), eval_batches(batch_size) -> lists of batches with
      'image_ids' and 'gt_objects'
Batches hold numpy 'input_ids' [B,T], 'attention_mask' [B,T], 'pixel_values' [B,3,H,W]. With
several processes (`fisao_jax.hosts`) each reads and preprocesses only its block of every
batch's rows: the arrays hold B / P rows, the lists ('image_ids', 'gt_objects') all of them.

`SyntheticTask`: the generated world (default, CPU). `CocoTask`: LLaVA-Instruct prompts +
COCO calibration / CHAIR evaluation images for real checkpoints.
"""
from __future__ import annotations

import logging
import pathlib

import numpy as np

from fisao_jax import hosts


def build_task(config, workdir: pathlib.Path):
    """The task named by `config.task`."""
    if config.task == "synthetic":
        return SyntheticTask(config, workdir)
    if config.task == "coco":
        return CocoTask(config, workdir)
    raise ValueError(f"config key 'task': unknown task {config.task!r} (expected 'synthetic' or 'coco')")


def _load_tokenizer(path: str, what: str):
    import transformers

    if not path or not pathlib.Path(path).is_dir():
        raise FileNotFoundError(f"{what} folder {path!r} does not exist")
    return transformers.AutoTokenizer.from_pretrained(str(path))


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _local_rows(items: list, size: int) -> list:
    """This process's block of `items` padded to `size` by repeating the last one (static
    shapes; the copies' results are dropped by the caller)."""
    padded = list(items) + [items[-1]] * (size - len(items))
    return padded[hosts.rows(size)]


class CocoTask:
    """LLaVA-Instruct-150k prompts, COCO calibration (train) and CHAIR evaluation (val) images."""

    def __init__(self, config, workdir: pathlib.Path):
        from fisao_jax.data import coco, llava_instruct
        from fisao_jax.data.image_config import ImageConfig
        from fisao_jax.eval import chair
        from fisao_jax.models.hf_io import read_hf_config, CONVERTED_CONFIG
        from fisao_jax.rewards.entities import load_entity_vocab

        m, d = config.model, config.data
        self.policy_dir, self.verifier_dir = m.policy, m.verifier
        self.tokenizer = _load_tokenizer(m.tokenizer or m.policy, "config key 'model.tokenizer' (policy tokenizer)")
        self.verifier_tokenizer = _load_tokenizer(m.verifier_tokenizer or m.verifier,
                                                  "config key 'model.verifier_tokenizer' (or 'model.verifier')")
        folder = pathlib.Path(m.policy)
        if (folder / CONVERTED_CONFIG).exists():
            import json
            from fisao_jax.models.config_io import from_dict
            cfg = from_dict(json.loads((folder / CONVERTED_CONFIG).read_text())["config"])
        else:
            cfg = read_hf_config(folder)[1]
        self.image_token_id, self.num_image_tokens = cfg.image_token_id, cfg.num_image_tokens
        self.max_prompt_len = d.max_prompt_len
        self.eos_token_id = self.tokenizer.eos_token_id
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        size = cfg.vision.image_size  # the processor's size follows the vision tower
        self.image_config = ImageConfig(size=size, crop=(size, size), pad_to_square=d.pad_to_square)
        self.entity_vocab = load_entity_vocab(config.reward.entity_vocab or None)
        self.chair_vocab = chair.coco_vocab(d.chair_synonyms or None)
        self.records, report = llava_instruct.load_llava_instruct(d.instruct_json, d.coco_root, limit=d.num_prompts,
                                                                  on_error=d.on_error)
        print(report.summary())
        gt = d.gt_objects or None
        self.calib, _ = coco.calibration_set(d.coco_root, d.calibration_images, config.seed, split=d.calibration_split,
                                             ground_truth=gt, vocab=self.chair_vocab)
        self.eval_set, _ = coco.evaluation_set(d.coco_root, config.eval.num_images, config.seed, split=d.eval_split,
                                               ground_truth=gt, vocab=self.chair_vocab)
        self.eval_prompt = config.eval.prompt
        self.seed = config.seed
        self._llava_instruct = llava_instruct

    @property
    def num_train_prompts(self) -> int:
        return len(self.records)

    def train_batch(self, position: int, batch_size: int) -> tuple[dict, int]:
        records, nxt = self._llava_instruct.batch_at(self.records, position, batch_size, seed=self.seed)
        batch = self._llava_instruct.encode_batch(records[hosts.rows(batch_size)], self.tokenizer, self.image_token_id,
                                                  self.num_image_tokens, self.max_prompt_len, self.image_config)
        return batch, nxt

    def _image_batches(self, records, batch_size: int) -> list[dict]:
        from fisao_jax.data.llava_instruct import PromptRecord

        out = []
        for chunk in _chunks(list(records), batch_size):
            prompts = [PromptRecord(id=str(r.image_id), prompt=self.eval_prompt, image_path=r.image_path)
                       for r in _local_rows(chunk, batch_size)]
            b = self._llava_instruct.encode_batch(prompts, self.tokenizer, self.image_token_id, self.num_image_tokens,
                                                  self.max_prompt_len, self.image_config)
            b.update(image_ids=[r.image_id for r in chunk], gt_objects=[set(r.objects) for r in chunk])
            out.append(b)
        return out

    def calibration_batches(self, batch_size: int) -> list[dict]:
        return self._image_batches(self.calib, batch_size)

    def eval_batches(self, batch_size: int) -> list[dict]:
        return self._image_batches(self.eval_set, batch_size)


def world_cache_dir(config, workdir: pathlib.Path) -> pathlib.Path:
    """Where pretrained worlds are cached: config.world_cache, $FISAO_CACHE/world or ~/.cache/fisao_jax/world.

    The cache is keyed by the build settings, so runs with different seeds or reward
    settings share one pretraining."""
    import os

    if config.world_cache:
        return pathlib.Path(config.world_cache)
    root = os.environ.get("FISAO_CACHE")
    return pathlib.Path(root) / "world" if root else pathlib.Path.home() / ".cache" / "fisao_jax" / "world"


class SyntheticTask:
    """The generated world: pretrained (or cached) CLIP, tokenizer and SFT LLaVA; scenes with
    exact ground truth for training prompts, calibration and held-out evaluation.

    Scene sets use the fixed `config.world_data_seed`, so every run seed sees the same
    calibration and evaluation images."""

    def __init__(self, config, workdir: pathlib.Path):
        from fisao_jax.data import synthetic
        from fisao_jax.data.prompts import encode_prompts, format_prompt
        from fisao_jax.eval.chair import vocab_from_synonym_lines
        from fisao_jax.models.config_io import from_dict
        from fisao_jax.rewards.entities_build import vocab_from_names
        from fisao_jax.world import configs as world_configs

        import json

        build_cfg = world_configs.build_config_from_dict(config.world.to_dict())
        m = config.model
        if m.policy:  # models given explicitly (e.g. a world pretrained elsewhere)
            self.policy_dir, self.verifier_dir, tokenizer_dir = m.policy, m.verifier, m.tokenizer or m.policy
        else:
            from fisao_jax.world import build as world_build

            # the world's build messages (quality metrics, cache folders) go to the run's log file;
            # with several processes, process 0 builds (or loads) it, then the others load it
            if not hosts.is_primary():
                hosts.wait("world built")
            art = world_build.build_world(world_cache_dir(config, workdir), build_cfg, log=logging.info)
            if hosts.is_primary():
                hosts.wait("world built")
            self.policy_dir, self.verifier_dir, tokenizer_dir = str(art.llava_dir), str(art.clip_dir), str(art.tokenizer_dir)
        self.tokenizer = _load_tokenizer(tokenizer_dir, "world tokenizer")
        self.verifier_tokenizer = self.tokenizer
        llava_cfg = from_dict(json.loads((pathlib.Path(self.policy_dir) / "fisao_config.json").read_text())["config"])
        self.image_token_id, self.num_image_tokens = llava_cfg.image_token_id, llava_cfg.num_image_tokens
        self.eos_token_id = self.tokenizer.eos_token_id
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        world = build_cfg.world
        self.entity_vocab = vocab_from_names(synthetic.class_names(world))
        self.chair_vocab = vocab_from_synonym_lines(synthetic.chair_synonym_lines(world))
        system = build_cfg.sft.system
        self._format = lambda prompts: [format_prompt(p, system=system) for p in prompts]  # noqa: E731
        self._encode = encode_prompts
        all_prompts = self._format(list(synthetic.PROMPTS) + [synthetic.prompt_text()])
        ids, _ = encode_prompts(self.tokenizer, all_prompts, self.image_token_id, self.num_image_tokens, None)
        self.max_prompt_len = ids.shape[1]
        seed = config.world_data_seed
        s = config.synthetic
        self.train_set = synthetic.make_dataset(world, s.num_train_prompts, seed, split="fisao-train")
        self.calib_set = synthetic.make_dataset(world, s.num_calibration, seed, split="fisao-calibration")
        self.eval_set = synthetic.make_dataset(world, config.eval.num_images, seed, split="fisao-eval")
        self._pixels = world_configs.pixel_values
        self.seed = config.seed

    @property
    def num_train_prompts(self) -> int:
        return len(self.train_set["images"])

    def _batch(self, data: dict, local: np.ndarray, prompts: list[str], index: np.ndarray) -> dict:
        """Arrays of the `local` scenes (this process's rows), lists of all of `index`."""
        ids, mask = self._encode(self.tokenizer, self._format(prompts), self.image_token_id, self.num_image_tokens,
                                 self.max_prompt_len)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": self._pixels(data["images"][local]),
                "image_ids": [int(i) for i in index], "gt_objects": [set(data["gt_objects"][i]) for i in index]}

    def train_batch(self, position: int, batch_size: int) -> tuple[dict, int]:
        from fisao_jax.data.llava_instruct import batch_indices

        index = batch_indices(self.num_train_prompts, position, batch_size, seed=self.seed)
        local = index[hosts.rows(batch_size)]
        prompts = [self.train_set["prompts"][i] for i in local]
        return self._batch(self.train_set, local, prompts, index), position + batch_size

    def _fixed(self, data: dict, batch_size: int) -> list[dict]:
        from fisao_jax.data.synthetic import prompt_text

        n = len(data["images"])
        out = []
        for s in range(0, n, batch_size):
            index = np.arange(s, min(s + batch_size, n))
            local = np.asarray(_local_rows(list(index), batch_size))
            out.append(self._batch(data, local, [prompt_text()] * len(local), index))
        return out

    def calibration_batches(self, batch_size: int) -> list[dict]:
        return self._fixed(self.calib_set, batch_size)

    def eval_batches(self, batch_size: int) -> list[dict]:
        return self._fixed(self.eval_set, batch_size)
