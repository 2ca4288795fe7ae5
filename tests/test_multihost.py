"""Past one host, on one CPU: two processes x 4 devices form one 8-device mesh (JAX's
multi-controller runtime, gloo collectives, a coordinator on 127.0.0.1). They train the toy
config exactly as one process x 8 devices does, each reading half of every batch, with one
set of output files; killing one process mid-run and restarting both resumes to the same end."""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import toy_world

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
ITERATIONS = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    paths = toy_world.make_toy_world(root / "world")
    baseline = root / "baseline.json"
    baseline.write_text(json.dumps({"s_c": 1.0, "s_h": -1.0, "s_min": -4.0, "s_max": 4.0}))
    return paths, baseline, root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(paths, baseline, workdir, extra=()):
    return [sys.executable, "-m", "fisao_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
            f"--config.model.policy={paths['policy']}", f"--config.model.verifier={paths['verifier']}",
            f"--config.model.tokenizer={paths['tokenizer']}", f"--config.reward.baseline_path={baseline}",
            "--config.reward.kind=sentence",  # a learning signal for random tiny models
            "--config.synthetic.num_train_prompts=64", "--config.eval.num_images=8", "--config.eval.batch_size=8",
            "--config.eval.max_new_tokens=4", "--config.rollout.max_new_tokens=12", "--config.train.batch_size=16",
            f"--config.train.num_iterations={ITERATIONS}", "--config.train.checkpoint_every=1",
            "--config.train.keep_checkpoints=20", "--config.ppo.lr=0.003", *extra]


def _env(root, devices):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONUNBUFFERED="1",
                JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(root / f"jax_cache_{devices}"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _start_pair(paths, baseline, root, workdir, port):
    procs = []
    for k in range(2):
        hosts = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={k}",
                 "--distributed_timeout=60"]
        procs.append(subprocess.Popen(_cmd(paths, baseline, workdir, hosts), cwd=ROOT, env=_env(root, 4),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _wait(procs, timeout=900):
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def _metrics(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens/update_per_s"))} for r in rows]


def _adapter(workdir):
    from safetensors.numpy import load_file
    return load_file(workdir / "adapter" / "adapter.safetensors")


def _assert_same_run(a_dir, b_dir):
    a, b = _metrics(a_dir), _metrics(b_dir)
    assert [r["iteration"] for r in b] == list(range(1, ITERATIONS + 1))
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], abs=1e-5, rel=1e-5), k
    la, lb = _adapter(a_dir), _adapter(b_dir)
    assert la.keys() == lb.keys()
    for k in la:
        np.testing.assert_allclose(lb[k], la[k], atol=1e-5)


@pytest.fixture(scope="module")
def runs(world):
    paths, baseline, root = world
    one = root / "one"
    subprocess.run(_cmd(paths, baseline, one), cwd=ROOT, env=_env(root, 8), check=True, capture_output=True)
    two = root / "two"
    outs = _wait(_start_pair(paths, baseline, root, two, _free_port()))
    return one, two, outs


def test_two_processes_train_like_one(runs):
    one, two, outs = runs
    _assert_same_run(one, two)
    assert any(abs(v).max() > 0 for k, v in _adapter(two).items() if k.endswith("lora_b"))  # the adapters moved
    # each process read half of every training batch
    for log in ("log.txt", "log.process1.txt"):
        reads = re.findall(r"this process read (\d+) of (\d+) training prompts", (two / log).read_text())
        assert len(reads) == ITERATIONS and all(r == ("8", "16") for r in reads), (log, reads)
    # one set of outputs: the same files as a one-process run, plus the second process's log
    def files(d):  # TensorBoard names its event file after the time and host
        return {re.sub(r"events\.out\.tfevents\..*", "events", str(p.relative_to(d))) for p in d.rglob("*")
                if p.is_file() and "checkpoints" not in p.parts}
    assert files(two) - {"log.process1.txt"} == files(one)
    assert len((two / "metrics.jsonl").read_text().splitlines()) == ITERATIONS
    printed = [line for line in outs[1][0].splitlines() if line.strip() and not line.startswith("[Gloo]")]
    assert printed == []  # only process 0 prints the summary (gloo's own connection lines aside)
    assert "CHAIRi" in outs[0][0]


def test_killed_process_pair_resumes_to_the_same_end(world, runs, tmp_path):
    paths, baseline, root = world
    _, uninterrupted, _ = runs
    workdir = tmp_path / "killed"
    procs = _start_pair(paths, baseline, root, workdir, _free_port())
    deadline = time.time() + 600
    while not (workdir / "checkpoints" / "2").exists():
        assert all(p.poll() is None for p in procs), "a process ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    try:  # process 0 stops by itself once its peer is gone (a failed collective or heartbeat)
        procs[0].wait(timeout=200)
    except subprocess.TimeoutExpired:
        procs[0].kill()
    for p in procs:
        p.communicate()
    assert not (workdir / "checkpoints" / str(ITERATIONS)).exists(), "killed too late to test resuming"
    outs = _wait(_start_pair(paths, baseline, root, workdir, _free_port()))
    assert "resumed from" in outs[0][0]
    _assert_same_run(uninterrupted, workdir)


def test_unreachable_coordinator_fails_fast_with_a_clear_message(world, tmp_path):
    paths, baseline, root = world
    port = _free_port()  # nothing listens there: process 1 waits for a coordinator that never comes
    cmd = _cmd(paths, baseline, tmp_path / "alone", [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                                     "--process_id=1", "--distributed_timeout=5"])
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(root, 4), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and time.time() - t0 < 90
    assert f"process 1 of 2 could not join the coordinator at 127.0.0.1:{port} within 5 s" in proc.stderr
