"""KL-only ablation (paper Table 4: PPO without the fine-grained reward).

    python -m fisao_jax.main --config=configs/tiny_kl_only.py --workdir=runs/tiny_kl_only

Everything else as configs/tiny.py (the same cached world, calibration and evaluation scenes).
"""
import pathlib

from fisao_jax.config_base import load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("tiny.py"))
    c.reward.kind = "none"
    return c
