"""End-to-end trainer runs on a tiny random world: kill -9 and resume (on a 2-device mesh)
equals an uninterrupted run; refusing to start over existing work; a corrupt checkpoint is a
clear error."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import toy_world

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("toyworld")
    paths = toy_world.make_toy_world(root / "world")
    baseline = root / "baseline.json"
    baseline.write_text(json.dumps({"s_c": 1.0, "s_h": -1.0, "s_min": -4.0, "s_max": 4.0}))
    return paths, baseline, root


def _cmd(paths, baseline, workdir, iterations):
    return [sys.executable, "-m", "fisao_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
            f"--config.model.policy={paths['policy']}", f"--config.model.verifier={paths['verifier']}",
            f"--config.model.tokenizer={paths['tokenizer']}", f"--config.reward.baseline_path={baseline}",
            "--config.synthetic.num_train_prompts=64", "--config.eval.num_images=8", "--config.eval.batch_size=8",
            "--config.eval.max_new_tokens=4", "--config.rollout.max_new_tokens=24", "--config.train.batch_size=16",
            f"--config.train.num_iterations={iterations}", "--config.train.checkpoint_every=1",
            "--config.train.keep_checkpoints=20", "--config.ppo.lr=0.003",
            # random tiny models rarely spell an entity word: the sentence-level reward gives the
            # update a signal, so that the adapters move
            "--config.reward.kind=sentence"]


def _env(cache, devices: int = 1):
    flags = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", XLA_FLAGS=flags, PYTHONUNBUFFERED="1")


def _metrics(workdir):
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens/update_per_s"))} for r in rows]


def _final_lora(workdir, step):
    from fisao_jax.checkpoint import Checkpointer
    ck = Checkpointer(workdir / "checkpoints")
    import orbax.checkpoint as ocp
    tree = ck._manager.restore(step, args=ocp.args.StandardRestore())
    ck.close()
    return tree["trainable"]


def test_kill_and_resume_equals_uninterrupted_run(world, tmp_path):
    """On a 2-device mesh: the restored state must land on the mesh's layout, as a fresh one."""
    paths, baseline, root = world
    env = _env(root / "jax_cache_2dev", devices=2)
    n = 8
    straight = tmp_path / "straight"
    subprocess.run(_cmd(paths, baseline, straight, n), cwd=ROOT, env=env, check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(paths, baseline, killed, n), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "3").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / str(n)).exists(), "killed too late to test resuming"
    resumed = subprocess.run(_cmd(paths, baseline, killed, n), cwd=ROOT, env=env, check=True, capture_output=True,
                             text=True)
    assert "resumed from" in resumed.stdout

    a, b = _metrics(straight), _metrics(killed)
    assert [r["iteration"] for r in b] == list(range(1, n + 1))
    assert a == b
    la, lb = _final_lora(straight, n), _final_lora(killed, n)
    import jax
    for x, y in zip(jax.tree.leaves(la), jax.tree.leaves(lb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # training moved the adapters (B starts at 0): the comparison is not between two untouched inits
    moved = jax.tree_util.tree_leaves_with_path(la)
    assert any(np.abs(np.asarray(x)).max() > 0 for p, x in moved if str(p[-1].key) == "lora_b")
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["iterations"] == n and "CHAIRi" in summary["after"]


def test_existing_work_without_checkpoint_is_not_overwritten(world, tmp_path):
    paths, baseline, root = world
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"iteration": 1}\n')
    proc = subprocess.run(_cmd(paths, baseline, workdir, 2), cwd=ROOT, env=_env(root / "jax_cache"),
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "refusing to start over existing work" in proc.stderr
    assert (workdir / "metrics.jsonl").read_text() == '{"iteration": 1}\n'


def test_corrupt_checkpoint_is_a_clear_error(world, tmp_path):
    paths, baseline, root = world
    workdir = tmp_path / "run"
    env = _env(root / "jax_cache")
    subprocess.run(_cmd(paths, baseline, workdir, 1), cwd=ROOT, env=env, check=True, capture_output=True)
    for f in (workdir / "checkpoints" / "1").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0" * 7)
    proc = subprocess.run(_cmd(paths, baseline, workdir, 2), cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "cannot be restored" in proc.stderr and str(workdir / "checkpoints" / "1") in proc.stderr
