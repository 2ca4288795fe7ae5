"""Fields shared by every experiment config, with the paper's values (FiSAO, Table 7).

Experiment files in configs/ start from `base_config()` and override what differs.
"""
from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = ""
    c.task = "coco"  # 'synthetic' | 'coco'

    c.model = ml_collections.ConfigDict()
    c.model.policy = ""           # LLaVA folder: Hugging Face or tools/convert_hf.py output
    c.model.clip = ""             # CLIP folder (the verifier; same vision tower as the policy)
    c.model.tokenizer = ""        # default: the policy folder
    c.model.clip_tokenizer = ""   # default: the CLIP folder
    c.model.dtype = "bfloat16"
    c.model.lora_rank = 128       # paper: r 128, alpha 256, all linear layers of the LM
    c.model.lora_alpha = 256.0
    c.model.lora_dropout = 0.0    # PPO compares the same function before/after an update
    c.model.remat = True          # recompute decoder layers in the PPO backward pass

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    c.rollout = ml_collections.ConfigDict()
    c.rollout.max_new_tokens = 256
    c.rollout.temperature = 1.0
    c.rollout.top_k = 0
    c.rollout.top_p = 1.0
    c.rollout.decode_chunk = 128  # decode steps per loop over a cache grown between loops (0 = one loop)

    c.reward = ml_collections.ConfigDict()
    c.reward.kind = "token"       # 'token' (FiSAO) | 'sentence' | 'none' (KL only)
    c.reward.margin = 10.0        # lambda, paper: 10 (Table 5 sweeps 5 / 10 / 20)
    c.reward.kl_coef = 0.05       # beta of the per-token KL penalty
    c.reward.template = "a photo of a {}."
    c.reward.entity_vocab = ""    # '' = the packaged COCO + LVIS vocabulary
    c.reward.baseline_path = ""   # '' = estimate on the calibration set (SPEC step 5)
    c.reward.baseline_low_pct = 1.0
    c.reward.baseline_high_pct = 99.0

    c.calibration = ml_collections.ConfigDict()
    c.calibration.batch_size = 8

    c.ppo = ml_collections.ConfigDict()
    c.ppo.lr = 5e-7               # paper, LLaVA-1.5-7B
    c.ppo.weight_decay = 0.0
    c.ppo.max_grad_norm = 1.0
    c.ppo.ppo_epochs = 4          # paper: 4 PPO epochs per rollout batch
    c.ppo.num_minibatches = 2
    c.ppo.clip_eps = 0.2          # paper: xi = 0.2
    c.ppo.clip_eps_value = 0.2
    c.ppo.vf_coef = 0.1
    c.ppo.ent_coef = 0.0
    c.ppo.gamma = 1.0
    c.ppo.lam = 0.95
    c.ppo.whiten_advantages = True

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 8        # rollout batch (prompts per PPO iteration)
    c.train.num_iterations = 0    # 0 = one epoch over the prompts (paper: 1 epoch over 8k)
    c.train.checkpoint_every = 50
    c.train.keep_checkpoints = 3
    c.train.eval_every = 0        # 0 = evaluate before and after training only
    c.train.max_nonfinite_in_row = 5

    c.eval = ml_collections.ConfigDict()
    c.eval.num_images = 500       # CHAIR on 500 COCO val images
    c.eval.batch_size = 8
    c.eval.max_new_tokens = 512
    c.eval.prompt = "Please describe this image in detail."

    c.data = ml_collections.ConfigDict()
    c.data.instruct_json = ""     # llava_instruct_150k.json
    c.data.coco_root = ""         # folder with train2014/ val2014/ annotations/
    c.data.num_prompts = 8000     # paper: the first 8k conversations
    c.data.max_prompt_len = 640   # 576 image tokens + system prompt + question
    c.data.pad_to_square = True   # LLaVA-1.5 training preprocessing
    c.data.on_error = "skip"      # missing / unreadable images: 'skip' (counted) or 'raise'
    c.data.calibration_images = 5000
    c.data.calibration_split = "train2014"
    c.data.eval_split = "val2014"
    c.data.gt_objects = ""        # '' = CHAIR rules on the split's annotations, else {image_id: objects} .json(.gz)
    c.data.chair_synonyms = ""    # '' = the packaged reference table (fisao_jax/resources/chair/synonyms.txt)
    return c


def load_config_file(path) -> ml_collections.ConfigDict:
    """`get_config()` of a config file given by path (for configs that extend another one)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
