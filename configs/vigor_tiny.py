"""ViGoR (automatic variant) on the synthetic grounded world, on a CPU: n samples per
prompt, noun-level verifier scores, selection, refinement, SFT on LoRA.

    python -m fisao_jax.main --config=configs/vigor_tiny.py --workdir=runs/vigor_tiny

Same world, calibration and evaluation as configs/tiny.py (FiSAO), so summary.json
compares directly. See fisao_jax/methods/vigor.py for the method.
"""
import pathlib

import ml_collections

from fisao_jax.config_base import load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("tiny.py"))
    c.method = "vigor"
    c.vigor = ml_collections.ConfigDict()
    c.vigor.num_samples = 5          # paper: 5 samples per image
    c.vigor.num_prompts = 1024       # 0 = all training prompts
    c.vigor.prompt_batch_size = 16   # prompts per rollout (x num_samples rows)
    c.vigor.threshold = "midpoint"   # 'midpoint' ((s_c + s_h) / 2) | 's_h' | 's_c' | 'fixed'
    c.vigor.threshold_value = 0.0    # used with threshold 'fixed' (100 * cos)
    c.vigor.penalty = "count"        # 'count' of rejected nouns | 'strength' (summed threshold - s)

    c.sft = ml_collections.ConfigDict()
    c.sft.lr = 1e-3                  # LoRA r 16 on the small world
    c.sft.epochs = 2                 # paper: 2
    c.sft.batch_size = 32            # paper: 32
    c.sft.num_minibatches = 1        # minibatches per jitted call
    c.sft.weight_decay = 0.0
    c.sft.max_grad_norm = 1.0
    return c
