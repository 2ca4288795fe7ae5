"""KL-only ablation (paper Table 4: PPO without the fine-grained reward).

    python -m fisao_jax.main --config=configs/tiny_kl_only.py --workdir=runs/tiny_kl_only

Everything else as configs/tiny.py (the same cached world, calibration and evaluation scenes).
"""
import importlib.util
import pathlib


def get_config():
    spec = importlib.util.spec_from_file_location("tiny", pathlib.Path(__file__).with_name("tiny.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    c = tiny.get_config()
    c.reward.kind = "none"
    return c
