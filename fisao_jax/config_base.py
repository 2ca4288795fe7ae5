"""Fields shared by every experiment config, with the papers' values: FiSAO (Table 7) for the
run, CSR (Zhou et al. 2024) for `csr` / `dpo`, ViGoR (Yan et al. 2024) for `vigor` / `sft`.

Experiment files in configs/ start from `base_config()` and override what differs; variants
of one file are `get_config(arg)` branches (`--config=configs/tiny.py:margin5`).
"""
from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = ""
    c.method = "fisao"  # 'fisao' | 'csr' | 'vigor' (fisao_jax.methods.METHODS)
    c.task = "coco"  # 'synthetic' | 'coco'

    c.model = ml_collections.ConfigDict()
    c.model.policy = ""           # LLaVA folder: Hugging Face or tools/convert_hf.py output
    c.model.verifier = ""         # CLIP folder (the verifier; same vision tower as the policy)
    c.model.tokenizer = ""        # default: the policy folder
    c.model.verifier_tokenizer = ""  # default: the verifier folder
    c.model.dtype = "bfloat16"
    c.model.lora_rank = 128       # paper: r 128, alpha 256, all linear layers of the LM
    c.model.lora_alpha = 256.0
    c.model.lora_dropout = 0.0    # CSR's DPO and ViGoR's SFT only; must be 0 for FiSAO (PPO's ratio) an update
    c.model.remat = True          # recompute decoder layers in the PPO backward pass

    # Axis sizes (one may be -1: the remaining devices); "devices": N uses only the first N
    # devices (0 = all of them).
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "devices": 0})

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
    # SPEC: the verifier is the policy's own vision encoder. At start-up the verifier's vision
    # weights are compared with the policy's (largest |difference| / largest |weight| per
    # tensor): above the tolerance is an error unless the verifier is declared separate.
    c.reward.verifier_is_policy_encoder = True
    c.reward.verifier_encoder_tolerance = 1e-2  # bf16 rounding of a weight stored in fp16 vs fp32

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

    # CSR (method 'csr'): sentence-level beam search with the calibrated reward, iterative DPO
    c.csr = ml_collections.ConfigDict()
    c.csr.iterations = 3             # paper: 3
    c.csr.num_prompts = 0            # prompts per iteration (the same every iteration); 0 = all
    c.csr.prompt_batch_size = 2      # prompts per beam search call (x 2 beam_keep x candidates rows)
    c.csr.beam_keep = 2              # top-k and bottom-k beams kept after each sentence
    c.csr.num_candidates = 5         # sampled sentences per beam and step
    c.csr.max_sentence_tokens = 74
    c.csr.max_sentences = 16
    c.csr.temperature = 1.0
    c.csr.clip_weight = 0.9          # paper: lambda 0.9
    c.csr.lm_weight = 0.1            # paper: 1 - lambda
    c.csr.response_score = "sum"     # 'sum' (the paper's R(y)) | 'mean' (the authors' released code)
    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 0.1
    c.dpo.lr = 1e-7
    c.dpo.epochs = 1
    c.dpo.batch_size = 8
    c.dpo.num_minibatches = 1        # minibatches per compiled call
    c.dpo.weight_decay = 0.0
    c.dpo.max_grad_norm = 1.0

    # ViGoR (method 'vigor', automatic variant): verifier-guided selection + refinement, then SFT
    c.vigor = ml_collections.ConfigDict()
    c.vigor.num_samples = 5          # paper: 5 samples per image
    c.vigor.num_prompts = 0          # 0 = all training prompts
    c.vigor.prompt_batch_size = 4    # prompts per rollout (x num_samples rows)
    c.vigor.threshold = "midpoint"   # 'midpoint' ((s_c + s_h) / 2) | 's_h' | 's_c' | 'fixed'
    c.vigor.threshold_value = 0.0    # used with threshold 'fixed' (100 * cos)
    c.vigor.penalty = "count"        # 'count' of rejected nouns | 'strength' (summed threshold - s)
    c.sft = ml_collections.ConfigDict()
    c.sft.lr = 2e-4                  # LLaVA-1.5's LoRA rate (ViGoR's did not survive text extraction)
    c.sft.epochs = 2                 # paper: 2
    c.sft.batch_size = 32            # paper: 32
    c.sft.num_minibatches = 1        # minibatches per compiled call
    c.sft.weight_decay = 0.0
    c.sft.max_grad_norm = 1.0
    return c


def load_config_file(path, variant: str | None = None) -> ml_collections.ConfigDict:
    """`get_config()` (or `get_config(variant)`) of a config file given by path."""
    import importlib.util
    import pathlib

    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if variant is None else module.get_config(variant)
