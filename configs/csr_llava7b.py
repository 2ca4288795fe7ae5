"""CSR on LLaVA-1.5-7B with the paper's values (Zhou et al., NeurIPS 2024, Sec. 4.1 and App. A.1,
and the authors' released scripts where the paper gives none).

    python -m fisao_jax.main --config=configs/csr_llava7b.py --workdir=runs/csr_llava7b \
        --config.data.instruct_json=/data/llava_instruct_150k.json --config.data.coco_root=/data/coco

Paper: ~13k LLaVA-Instruct prompts (detailed description + complex reasoning; here the
first `data.num_prompts` conversations), 3 iterations on the same prompts, 5 beams and
5 candidates per step, sentences of at most 74 new tokens, reward weights 0.9 (CLIP) /
0.1 (language), DPO on LoRA r 128 alpha 256, lr 1e-7 (released run_train.sh), 1 epoch per
iteration. Not given anywhere: DPO beta (0.1, the DPO default) and the beam bookkeeping
(here 2 top + 2 bottom beams; the released code keeps 1 top + 2 bottom of 5).
"""
import pathlib

import ml_collections

from fisao_jax.config_base import load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("llava7b.py"))
    c.method = "csr"
    c.data.num_prompts = 13000
    c.rollout.max_new_tokens = 512
    c.csr = ml_collections.ConfigDict()
    c.csr.iterations = 3
    c.csr.num_prompts = 0            # all of data.num_prompts, every iteration
    c.csr.prompt_batch_size = 2      # prompts per beam search call (x 4 beams x 5 candidates rows)
    c.csr.beam_keep = 2
    c.csr.num_candidates = 5
    c.csr.max_sentence_tokens = 74
    c.csr.max_sentences = 16
    c.csr.temperature = 1.0
    c.csr.clip_weight = 0.9
    c.csr.lm_weight = 0.1
    c.csr.response_score = "sum"

    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 0.1
    c.dpo.lr = 1e-7
    c.dpo.epochs = 1
    c.dpo.batch_size = 8
    c.dpo.num_minibatches = 1
    c.dpo.weight_decay = 0.0
    c.dpo.max_grad_norm = 1.0
    return c
