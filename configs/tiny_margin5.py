"""Reward margin 5 (paper Table 5).

    python -m fisao_jax.main --config=configs/tiny_margin5.py --workdir=runs/tiny_margin5

Everything else as configs/tiny.py (the same cached world, calibration and evaluation scenes).
"""
import pathlib

from fisao_jax.config_base import load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("tiny.py"))
    c.reward.margin = 5.0
    return c
