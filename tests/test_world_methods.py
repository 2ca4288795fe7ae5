"""End to end on the default synthetic world: reduced FiSAO, CSR and ViGoR runs, each with a
fixed seed, lower CHAIR_i on held-out scenes.

The world is the one `configs/tiny.py` builds (same sizes and seeds), pretrained once per
test session (~3 min on 2 cores; set FISAO_TEST_WORLD_CACHE to a folder to keep it between
sessions). The reference is ground truth: CHAIR counts object words against the exact
object set of every generated scene, before and after training the same SFT model.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from fisao_jax.config_base import load_config_file

pytestmark = pytest.mark.slow

# FiSAO and ViGoR as configured; CSR on half of its prompts. Evaluation and calibration on
# 128 scenes (REDUCED) instead of 256.
FISAO_ITERATIONS = 64
CSR_ITERATIONS, CSR_PROMPTS = 3, 128
VIGOR_PROMPTS = 1024


ROOT = pathlib.Path(__file__).resolve().parents[1]
REDUCED = {"synthetic.num_calibration": 128, "eval.num_images": 128}


def _config(variant: str, world_cache: str):
    c = load_config_file(ROOT / "configs" / "tiny.py", variant)
    c.world_cache = world_cache
    for dotted, value in REDUCED.items():
        section, key = dotted.split(".")
        c[section][key] = value
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
    from fisao_jax.run.frame import calibrate
    from fisao_jax.run.setup import build_setup

    config = _config("", world_cache)
    setup = build_setup(config, workdir)
    calibrate(setup, config, workdir)
    return str(workdir / "baseline.json")


def test_default_world_quality_is_what_the_readme_claims(world_cache):
    """README: the default world's CLIP separates present from absent objects with AUC 0.9955,
    and the SFT LLaVA names the co-occurring partner in 56% of the held-out scenes where the
    anchor is present and the partner is not. The build records both in its stages'
    stage.json (CLIP: presence AUC over 500 held-out scenes; LLaVA: greedy captions of 300).

    Margins: the build is seeded, but float rounding differs between machines and runs (XLA
    CPU kernels, thread counts), and training amplifies it. Two builds of this world on one
    2-core machine gave AUC 0.9953 and 0.9955 and partner rates 0.587 and 0.533 (44 and 40 of
    75 cases), the README's build 0.9955 and 0.56. The AUC sits near its ceiling: 0.99 allows
    for that drift and still fails a CLIP that is merely good. One partner case is 1.3 points:
    0.56 +- 0.08 allows six cases either way around the README's value (both builds above are
    inside it with room) and still fails a model that lost the language prior the method has
    to remove (the biased training captions name the partner in 41% of the cases)."""
    from fisao_jax.world import build as world_build
    from fisao_jax.world import configs as world_configs

    arts = world_build.build_world(world_cache, world_configs.default_build_config(), progress=False,
                                   log=lambda m: None)
    assert arts.trained == ()  # the fixture built it: these are the recorded metrics
    clip = json.loads((arts.clip_dir / world_build.STAGE_FILE).read_text())["metrics"]
    llava = json.loads((arts.llava_dir / world_build.STAGE_FILE).read_text())["metrics"]
    assert clip["num_scenes"] == 500 and llava["num_captions"] == 300
    assert clip["auc"] >= 0.99, clip
    assert llava["partner_cases"] >= 50, llava
    assert abs(llava["partner_rate"] - 0.56) <= 0.08, llava


def _run(variant, world_cache, baseline, workdir, **overrides):
    """`python -m fisao_jax.main` on one CPU device (the test process fakes 8, which would
    shard these small batches 8 ways on 2 cores); returns summary.json."""
    flags = {"world_cache": world_cache, "reward.baseline_path": baseline, **REDUCED,
             **{k.replace("__", "."): v for k, v in overrides.items()}}
    config = "configs/tiny.py" + (f":{variant}" if variant else "")
    cmd = [sys.executable, "-m", "fisao_jax.main", f"--config={config}", f"--workdir={workdir}"]
    cmd += [f"--config.{k}={v}" for k, v in flags.items()]
    env = dict(os.environ, XLA_FLAGS="", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((workdir / "summary.json").read_text())


def _assert_lowered(before, after, at_most):
    assert after["CHAIRi"] <= at_most * before["CHAIRi"], (before, after)
    assert before["CHAIRi"] > 5.0, before  # the SFT model does hallucinate (the world's language prior)


def test_reduced_fisao_run_lowers_chair_i(world_cache, baseline, tmp_path):
    s = _run("", world_cache, baseline, tmp_path, train__num_iterations=FISAO_ITERATIONS)
    _assert_lowered(s["before"], s["after"], 0.8)
    assert s["after"]["mean_mention_reward"] > s["before"]["mean_mention_reward"]  # paper Fig. 4: rewards shift up
    assert (tmp_path / "reward_shift.png").stat().st_size > 0


def test_reduced_csr_run_lowers_chair_i(world_cache, baseline, tmp_path):
    # The mean sentence score (the authors' released code): with the paper's sum CSR's answers
    # grow to the token budget on this world and CHAIR_i varies more by seed (benchmarks/RESULTS.md).
    s = _run("csr", world_cache, baseline, tmp_path, csr__iterations=CSR_ITERATIONS,
             csr__num_prompts=CSR_PROMPTS, csr__response_score="mean")
    _assert_lowered(s["before"], s["after"], 0.9)
    assert s["method"] == "csr" and s["iterations"] == CSR_ITERATIONS
    for i in range(1, CSR_ITERATIONS + 1):
        pairs = [json.loads(l) for l in (tmp_path / f"pairs_{i}.jsonl").read_text().splitlines()]
        assert len(pairs) >= CSR_PROMPTS // 2 and all(p["chosen_score"] > p["rejected_score"] for p in pairs)


def test_reduced_vigor_run_lowers_chair_i(world_cache, baseline, tmp_path):
    s = _run("vigor", world_cache, baseline, tmp_path, vigor__num_prompts=VIGOR_PROMPTS)
    _assert_lowered(s["before"], s["after"], 0.9)
    records = [json.loads(l) for l in (tmp_path / "vigor_samples.jsonl").read_text().splitlines()]
    assert len(records) == VIGOR_PROMPTS
    assert all(r["penalty"] == min(r["sample_penalties"]) for r in records)
