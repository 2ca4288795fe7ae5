"""The default job: FiSAO end to end on the synthetic grounded world, on a CPU, in minutes.

    python -m fisao_jax.main --config=configs/tiny.py --workdir=runs/tiny

Pretrains (or loads from the cache) a small CLIP, a tokenizer and an SFT LLaVA whose captions
hallucinate co-occurring objects, estimates the baseline scores, runs FiSAO PPO on LoRA and
reports CHAIR before/after on held-out scenes (summary.json, reward_shift.png).
"""
import ml_collections

from fisao_jax.config_base import base_config
from fisao_jax.world.configs import default_build_config, to_dict


def get_config():
    c = base_config()
    c.task = "synthetic"
    c.world = ml_collections.ConfigDict(to_dict(default_build_config()))
    c.world_cache = ""          # '' = $FISAO_CACHE/world or ~/.cache/fisao_jax/world
    c.world_data_seed = 1234    # calibration / evaluation scenes, the same for every run seed
    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.num_train_prompts = 1024
    c.synthetic.num_calibration = 256

    c.model.dtype = "float32"
    c.model.remat = False
    c.model.lora_rank = 16
    c.model.lora_alpha = 32.0
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}

    c.rollout.max_new_tokens = 48
    c.calibration.batch_size = 64
    c.reward.margin = 10.0
    # The small LoRA policy moves fast: with the paper's beta 0.05 it learns to collect object
    # rewards by listing (and repeating) objects until its captions degenerate. beta 1.0 keeps
    # it near the SFT model; beta, lr and iterations were chosen on 3 seeds (benchmarks/RESULTS.md).
    c.reward.kl_coef = 1.0

    c.ppo.lr = 2e-4
    c.ppo.num_minibatches = 2
    c.train.batch_size = 32
    c.train.num_iterations = 64     # two passes over the 1024 training prompts
    c.train.checkpoint_every = 16
    c.eval.num_images = 256
    c.eval.batch_size = 64
    c.eval.max_new_tokens = 48
    c.eval.prompt = "Describe this image."
    return c
