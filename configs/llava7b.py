"""FiSAO on LLaVA-1.5-7B with the paper's hyperparameters (Table 7).

Convert the checkpoints once (see README), then:

    python -m fisao_jax.main --config=configs/llava7b.py --workdir=runs/llava7b \
        --config.data.instruct_json=/data/llava_instruct_150k.json --config.data.coco_root=/data/coco

Shapes and memory without weights:

    python -m fisao_jax.main --config=configs/llava7b.py --dry_run
"""
from fisao_jax.config_base import base_config


def get_config():
    c = base_config()
    c.task = "coco"
    c.model.policy = "checkpoints/llava-1.5-7b"          # tools/convert_hf.py output (or the HF folder)
    c.model.clip = "checkpoints/clip-vit-large-patch14-336"
    c.model.dtype = "bfloat16"
    c.mesh = {"data": 1, "fsdp": -1, "tensor": 1}        # FSDP over all devices
    c.rollout.max_new_tokens = 256
    c.train.batch_size = 64                              # 16-row minibatches split over 8 chips
    c.ppo.num_minibatches = 4
    c.eval.max_new_tokens = 512
    return c
