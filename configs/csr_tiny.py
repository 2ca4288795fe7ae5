"""CSR on the synthetic grounded world, on a CPU: sentence-level beam search with the
calibrated reward, preference pairs, 3 iterations of DPO on LoRA.

    python -m fisao_jax.main --config=configs/csr_tiny.py --workdir=runs/csr_tiny

Same world, calibration and evaluation as configs/tiny.py (FiSAO), so summary.json
compares directly. See fisao_jax/methods/csr.py for the method.
"""
import pathlib

import ml_collections

from fisao_jax.config_base import load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("tiny.py"))
    c.method = "csr"
    c.csr = ml_collections.ConfigDict()
    c.csr.iterations = 3           # paper: 3
    c.csr.num_prompts = 256        # prompts per iteration (the same ones every iteration); 0 = all
    c.csr.prompt_batch_size = 8    # prompts per beam search call
    c.csr.beam_keep = 2            # top-k and bottom-k beams kept after each sentence
    c.csr.num_candidates = 4       # sampled sentences per beam and step
    c.csr.max_sentence_tokens = 24
    c.csr.max_sentences = 6
    c.csr.temperature = 1.0
    c.csr.clip_weight = 0.9        # paper: 0.9 (lambda)
    c.csr.lm_weight = 0.1          # paper: 0.1 (1 - lambda)
    # 'sum' (the paper's R(y)) | 'mean' (the authors' released code). On this world 'sum'
    # prefers the longest responses and training makes them ~4x longer; 'mean' does not.
    c.csr.response_score = "sum"

    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 0.1
    c.dpo.lr = 1e-3               # LoRA r 16 on the small world (the 7B value is 1e-7)
    c.dpo.epochs = 2               # over each iteration's pairs
    c.dpo.batch_size = 16
    c.dpo.num_minibatches = 1      # minibatches per jitted call
    c.dpo.weight_decay = 0.0
    c.dpo.max_grad_norm = 1.0
    return c
