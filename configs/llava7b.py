"""FiSAO on LLaVA-1.5-7B with the paper's hyperparameters (Table 7).

Convert the checkpoints once (see README), then:

    python -m fisao_jax.main --config=configs/llava7b.py --workdir=runs/llava7b \
        --config.data.instruct_json=/data/llava_instruct_150k.json --config.data.coco_root=/data/coco

Shapes and memory without weights:

    python -m fisao_jax.main --config=configs/llava7b.py --dry_run

Variants (`--config=configs/llava7b.py:<variant>`), same models, data and evaluation:

    csr     CSR with its paper's values (Zhou et al., NeurIPS 2024, Sec. 4.1 and App. A.1, and the
            authors' released scripts where the paper gives none): ~13k LLaVA-Instruct prompts,
            3 iterations on the same prompts, 5 candidates per beam and step, sentences of at
            most 74 tokens, reward weights 0.9 / 0.1, DPO on LoRA r 128 alpha 256, lr 1e-7,
            1 epoch per iteration. Not given anywhere: DPO beta (0.1, the DPO default) and the
            beam bookkeeping (2 top + 2 bottom beams; the released code keeps 1 top + 2 bottom).
    vigor   ViGoR (automatic) with its paper's values (Yan et al., 2024, Sec. 4.2): 5 samples per
            image, the best by fewest rejected nouns, refined by dropping sentences with
            rejected nouns, 2 epochs of SFT with batch 32. The paper verifies nouns with
            Grounding DINO on ADE20K images; here the policy's own CLIP verifies them on the
            prompts the other methods use.
"""
from fisao_jax.config_base import base_config

VARIANTS = ("", "csr", "vigor")


def get_config(variant: str = ""):
    if variant not in VARIANTS:
        raise ValueError(f"configs/llava7b.py: unknown variant {variant!r}; choose one of {VARIANTS[1:]} or none")
    c = base_config()
    c.task = "coco"
    c.model.policy = "checkpoints/llava-1.5-7b"          # tools/convert_hf.py output (or the HF folder)
    c.model.verifier = "checkpoints/clip-vit-large-patch14-336"
    c.model.dtype = "bfloat16"
    c.mesh.update(data=1, fsdp=-1, tensor=1)             # FSDP over all devices
    c.rollout.max_new_tokens = 256
    c.train.batch_size = 64                              # 16-row minibatches split over 8 chips
    c.ppo.num_minibatches = 4
    c.eval.max_new_tokens = 512
    if variant == "csr":
        c.method = "csr"
        c.data.num_prompts = 13000
        c.rollout.max_new_tokens = 512
    elif variant == "vigor":
        c.method = "vigor"
        c.rollout.max_new_tokens = 512
    return c
