"""End to end on the default synthetic world: reduced FiSAO, CSR and ViGoR runs, each with a
fixed seed, lower CHAIR_i on held-out scenes.

The world is the one `configs/tiny.py` builds (same sizes and seeds), pretrained once per
test session (~3 min on 2 cores; set FISAO_TEST_WORLD_CACHE to a folder to keep it between
sessions). The reference is ground truth: CHAIR counts object words against the exact
object set of every generated scene, before and after training the same SFT model.
"""
import os
import pathlib

import pytest

from fisao_jax.config_base import load_config_file
from fisao_jax.methods import trainer_for

pytestmark = pytest.mark.slow

def _config(name: str, world_cache: str, **overrides):
    c = load_config_file(pathlib.Path(__file__).resolve().parents[1] / "configs" / name)
    c.world_cache = world_cache
    c.synthetic.num_calibration = 128
    c.eval.num_images = 128
    for dotted, value in overrides.items():
        node = c
        *path, leaf = dotted.split("__")
        for p in path:
            node = node[p]
        node[leaf] = value
    return c


@pytest.fixture(scope="module")
def world_cache(tmp_path_factory):
    """Folder holding the default world's pretrained CLIP, tokenizer and SFT LLaVA."""
    from fisao_jax.world import build as world_build
    from fisao_jax.world import configs as world_configs

    folder = os.environ.get("FISAO_TEST_WORLD_CACHE") or str(tmp_path_factory.mktemp("world_cache"))
    world_build.build_world(folder, world_configs.default_build_config(), progress=False, log=lambda m: None)
    return folder


@pytest.fixture(scope="module")
def baseline(world_cache, tmp_path_factory):
    """Calibration of the SFT model, shared by the three runs (it does not depend on the method)."""
    workdir = tmp_path_factory.mktemp("calibration")
    from fisao_jax import train as train_lib

    config = _config("tiny.py", world_cache)
    setup = train_lib.build_setup(config, workdir)
    train_lib.calibrate(setup, config, workdir)
    return str(workdir / "baseline.json")


def _run(name, world_cache, baseline, tmp_path, **overrides):
    config = _config(name, world_cache, reward__baseline_path=baseline, **overrides)
    summary = trainer_for(config.get("method", "fisao"))(config, tmp_path / "run")
    return summary["before"], summary["after"]


def _assert_lowered(before, after, at_most):
    assert after["CHAIRi"] <= at_most * before["CHAIRi"], (before, after)
    assert before["CHAIRi"] > 5.0, before  # the SFT model does hallucinate (the world's language prior)


def test_reduced_fisao_run_lowers_chair_i(world_cache, baseline, tmp_path):
    before, after = _run("tiny.py", world_cache, baseline, tmp_path, train__num_iterations=24)
    _assert_lowered(before, after, 0.9)


def test_reduced_csr_run_lowers_chair_i(world_cache, baseline, tmp_path):
    before, after = _run("csr_tiny.py", world_cache, baseline, tmp_path, csr__iterations=1, csr__num_prompts=64)
    _assert_lowered(before, after, 0.9)


def test_reduced_vigor_run_lowers_chair_i(world_cache, baseline, tmp_path):
    before, after = _run("vigor_tiny.py", world_cache, baseline, tmp_path, vigor__num_prompts=256)
    _assert_lowered(before, after, 0.9)
