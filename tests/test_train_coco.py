"""The real-data path end to end on fixture files: LLaVA-Instruct prompts, COCO calibration and
CHAIR evaluation images, one FiSAO iteration with tiny random models."""
import json

import numpy as np
import PIL.Image
import pytest

import toy_world
from fisao_jax.config_base import base_config

pytestmark = pytest.mark.slow


def _coco(root, split, ids, cats):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = [{"id": i, "file_name": f"COCO_{split}_{i:012d}.jpg", "height": 48, "width": 80} for i in ids]
    for im in images:
        PIL.Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(root / split / im["file_name"])
    categories = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 61, "name": "cake"}]
    anns = [{"id": k, "image_id": i, "category_id": cats[k % len(cats)]} for k, i in enumerate(ids)]
    caps = [{"id": k, "image_id": i, "caption": "A dog next to a cake."} for k, i in enumerate(ids)]
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": categories}))
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": caps}))
    return images


def test_one_fisao_iteration_on_llava_instruct_and_coco(tmp_path):
    paths = toy_world.make_toy_world(tmp_path / "world")
    coco = tmp_path / "coco"
    train = _coco(coco, "train2014", list(range(1, 9)), [18, 61])
    _coco(coco, "val2014", list(range(101, 105)), [1, 18])
    instruct = [{"id": str(k), "image": im["file_name"],
                 "conversations": [{"from": "human", "value": "<image>\nWhat is on the table?"},
                                   {"from": "gpt", "value": "A cake."}]} for k, im in enumerate(train)]
    instruct.append({"id": "missing", "image": "nope.jpg",
                     "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "x"}]})
    (tmp_path / "instruct.json").write_text(json.dumps(instruct))
    (tmp_path / "baseline.json").write_text(json.dumps({"s_c": 1.0, "s_h": -1.0, "s_min": -4.0, "s_max": 4.0}))

    c = base_config()
    c.task = "coco"
    c.model.update(policy=paths["policy"], verifier=paths["verifier"], tokenizer=paths["tokenizer"],
                   verifier_tokenizer=paths["tokenizer"], dtype="float32",
                   lora_rank=4, lora_alpha=8.0)
    c.data.update(instruct_json=str(tmp_path / "instruct.json"), coco_root=str(coco), num_prompts=100,
                  max_prompt_len=224, calibration_images=4)  # CHAIR synonyms: the packaged table
    c.reward.baseline_path = str(tmp_path / "baseline.json")
    # Random tiny models rarely spell an entity word; the sentence-level reward always gives one
    # reward per response, so the update has a signal (the token-level path runs in other tests).
    c.reward.kind = "sentence"
    c.rollout.max_new_tokens = 6
    c.train.update(batch_size=4, num_iterations=1, checkpoint_every=1)
    c.eval.update(num_images=4, batch_size=4, max_new_tokens=6)
    c.ppo.lr = 1e-3
    c.mesh.update(data=-1, devices=2)  # minibatches of 2 rows over 2 of the 8 test devices

    from fisao_jax.tasks import CocoTask
    task = CocoTask(c, tmp_path / "run")
    assert task.num_train_prompts == 8  # the entry with a missing image was skipped
    batch, nxt = task.train_batch(0, 4)
    size = task.image_config.crop[0]
    assert batch["pixel_values"].shape == (4, 3, size, size) and nxt == 4
    assert (batch["input_ids"] == task.image_token_id).sum(axis=1).tolist() == [task.num_image_tokens] * 4
    assert task.num_image_tokens == 9  # 3 x 3 patches
    ev = task.eval_batches(4)
    # CHAIR ground truth = instance categories (person / dog alternating) + caption mentions (dog, cake)
    assert [sorted(g) for g in ev[0]["gt_objects"]] == [["cake", "dog", "person"], ["cake", "dog"],
                                                        ["cake", "dog", "person"], ["cake", "dog"]]

    from fisao_jax.methods.fisao import train
    summary = train(c, tmp_path / "run")
    assert summary["iterations"] == 1
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["nonfinite/skipped"] == 0.0 and np.isfinite(row["loss/policy_avg"])
    from fisao_jax.lora_adapter import is_adapter, load_adapter
    adapter = load_adapter(tmp_path / "run" / "adapter")
    assert is_adapter(tmp_path / "run" / "adapter") and adapter.lora.rank == 4
    assert any(np.abs(v).max() > 0 for p, v in adapter.tensors.items() if p[-1] == "lora_b")  # trained
