"""Tasks: where prompts, images, ground truth, tokenizers and checkpoints come from.

A task gives the trainer:
  policy_dir, clip_dir            model folders (Hugging Face or converted)
  tokenizer, clip_tokenizer       transformers tokenizers
  entity_vocab, chair_vocab       verifier vocabulary; CHAIR vocabulary for labels / metrics
  eos_token_id, pad_token_id
  num_train_prompts
  train_batch(position, batch_size) -> (batch, next_position)
  calibration_batches(batch_size), eval_batches(batch_size) -> lists of batches with
      'image_ids' and 'gt_objects'
Batches hold numpy 'input_ids' [B,T], 'attention_mask' [B,T], 'pixel_values' [B,3,H,W].

`SyntheticTask`: the generated world (default, CPU). `CocoTask`: LLaVA-Instruct prompts +
COCO calibration / CHAIR evaluation images for real checkpoints.
"""
from __future__ import annotations

import pathlib
from typing import Any

import numpy as np


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


def _pad_rows(batch: dict, size: int) -> dict:
    """Repeat the last row so every batch has `size` rows (static shapes); lists are not padded."""
    n = len(batch["image_ids"])
    if n == size:
        return batch
    out = dict(batch)
    for k in ("input_ids", "attention_mask", "pixel_values"):
        out[k] = np.concatenate([batch[k], np.repeat(batch[k][-1:], size - n, axis=0)])
    return out


class CocoTask:
    """LLaVA-Instruct-150k prompts, COCO calibration (train) and CHAIR evaluation (val) images."""

    def __init__(self, config, workdir: pathlib.Path):
        from fisao_jax.data import coco, image, llava_instruct
        from fisao_jax.eval import chair
        from fisao_jax.models.configs import llava_from_hf
        from fisao_jax.models.hf_io import read_hf_config, CONVERTED_CONFIG
        from fisao_jax.rewards.entities import load_entity_vocab

        m, d = config.model, config.data
        self.policy_dir, self.clip_dir = m.policy, m.clip
        self.tokenizer = _load_tokenizer(m.tokenizer or m.policy, "config key 'model.tokenizer' (policy tokenizer)")
        self.clip_tokenizer = _load_tokenizer(m.clip_tokenizer or m.clip, "config key 'model.clip_tokenizer'")
        folder = pathlib.Path(m.policy)
        if (folder / CONVERTED_CONFIG).exists():
            import json
            from fisao_jax.models.configs import from_dict
            cfg = from_dict(json.loads((folder / CONVERTED_CONFIG).read_text())["config"])
        else:
            cfg = read_hf_config(folder)[1]
        self.image_token_id, self.num_image_tokens = cfg.image_token_id, cfg.num_image_tokens
        self.max_prompt_len = d.max_prompt_len
        self.eos_token_id = self.tokenizer.eos_token_id
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.image_config = image.ImageConfig(pad_to_square=d.pad_to_square)
        self.entity_vocab = load_entity_vocab(config.reward.entity_vocab or None)
        self.chair_vocab = chair.coco_vocab(d.chair_synonyms or None)
        self.records, report = llava_instruct.load_llava_instruct(d.instruct_json, d.coco_root, limit=d.num_prompts,
                                                                  on_error=d.on_error)
        print(report.summary())
        gt = d.gt_objects or None
        self.calib, _ = coco.calibration_set(d.coco_root, d.calibration_images, config.seed, split=d.calibration_split,
                                             ground_truth=gt)
        self.eval_set, _ = coco.evaluation_set(d.coco_root, config.eval.num_images, config.seed, split=d.eval_split,
                                               ground_truth=gt)
        self.eval_prompt = config.eval.prompt
        self.seed = config.seed
        self._llava_instruct = llava_instruct

    @property
    def num_train_prompts(self) -> int:
        return len(self.records)

    def train_batch(self, position: int, batch_size: int) -> tuple[dict, int]:
        records, nxt = self._llava_instruct.batch_at(self.records, position, batch_size, seed=self.seed)
        batch = self._llava_instruct.encode_batch(records, self.tokenizer, self.image_token_id, self.num_image_tokens,
                                                  self.max_prompt_len, self.image_config)
        return batch, nxt

    def _image_batches(self, records, batch_size: int) -> list[dict]:
        from fisao_jax.data.llava_instruct import PromptRecord

        out = []
        for chunk in _chunks(list(records), batch_size):
            prompts = [PromptRecord(id=str(r.image_id), prompt=self.eval_prompt, image_path=r.image_path) for r in chunk]
            b = self._llava_instruct.encode_batch(prompts, self.tokenizer, self.image_token_id, self.num_image_tokens,
                                                  self.max_prompt_len, self.image_config)
            b.update(image_ids=[r.image_id for r in chunk], gt_objects=[set(r.objects) for r in chunk])
            out.append(_pad_rows(b, batch_size))
        return out

    def calibration_batches(self, batch_size: int) -> list[dict]:
        return self._image_batches(self.calib, batch_size)

    def eval_batches(self, batch_size: int) -> list[dict]:
        return self._image_batches(self.eval_set, batch_size)


class SyntheticTask:
    """The generated world: pretrained (or cached) CLIP, tokenizer and SFT LLaVA; scenes with
    exact ground truth for training prompts, calibration and held-out evaluation."""

    def __init__(self, config, workdir: pathlib.Path):
        raise NotImplementedError
