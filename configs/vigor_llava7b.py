"""ViGoR (automatic variant) on LLaVA-1.5-7B with the paper's values (Yan et al., 2024, Sec. 4.2).

    python -m fisao_jax.main --config=configs/vigor_llava7b.py --workdir=runs/vigor_llava7b \
        --config.data.instruct_json=/data/llava_instruct_150k.json --config.data.coco_root=/data/coco

Paper: 5 samples per image, the best by fewest rejected nouns (positives break ties),
refined by dropping sentences with rejected nouns, then 2 epochs of SFT with batch 32.
The paper verifies nouns with Grounding DINO on ADE20K images; here the policy's own CLIP
verifies them on the LLaVA-Instruct / COCO prompts the other methods use. The paper's
learning rate did not survive text extraction: 2e-4, LLaVA-1.5's LoRA fine-tuning rate.
"""
import pathlib

import ml_collections

from fisao_jax.config_base import load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("llava7b.py"))
    c.method = "vigor"
    c.rollout.max_new_tokens = 512
    c.vigor = ml_collections.ConfigDict()
    c.vigor.num_samples = 5
    c.vigor.num_prompts = 0          # all of data.num_prompts
    c.vigor.prompt_batch_size = 4    # x 5 samples rows per rollout
    c.vigor.threshold = "midpoint"
    c.vigor.threshold_value = 0.0
    c.vigor.penalty = "count"

    c.sft = ml_collections.ConfigDict()
    c.sft.lr = 2e-4
    c.sft.epochs = 2
    c.sft.batch_size = 32
    c.sft.num_minibatches = 1
    c.sft.weight_decay = 0.0
    c.sft.max_grad_norm = 1.0
    return c
