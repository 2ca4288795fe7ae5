"""Sentence-level reward ablation (paper Table 4): one CLIP score of the whole response at its last token.

    python -m fisao_jax.main --config=configs/tiny_sentence.py --workdir=runs/tiny_sentence

Everything else as configs/tiny.py (the same cached world, calibration and evaluation scenes).
"""
import pathlib

from fisao_jax.config_base import load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("tiny.py"))
    c.reward.kind = "sentence"
    return c
