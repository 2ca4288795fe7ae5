"""Training on a mesh of 8 (fake CPU) devices: the same run as on one device, with every batch
entering the compiled rollout, scoring and update sharded over the batch axes."""
import json
import pathlib

import jax
import numpy as np
import pytest

import toy_world
from fisao_jax import placement
from fisao_jax import sharding as sharding_lib
from fisao_jax.config_base import load_config_file

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]

# positions of the batch arguments of each compiled step, by the traced function's name
BATCH_ARGS = {"run": (1,), "score": (3, 4, 5), "update": (2,)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    paths = toy_world.make_toy_world(root / "world")
    baseline = root / "baseline.json"
    baseline.write_text(json.dumps({"s_c": 1.0, "s_h": -1.0, "s_min": -4.0, "s_max": 4.0}))
    return paths, baseline


def _config(paths, baseline, devices):
    c = load_config_file(ROOT / "configs" / "tiny.py")
    c.model.update(policy=paths["policy"], verifier=paths["verifier"], tokenizer=paths["tokenizer"])
    c.reward.update(baseline_path=str(baseline), kind="sentence")  # a signal for random tiny models
    c.synthetic.update(num_train_prompts=64)
    c.eval.update(num_images=8, batch_size=8, max_new_tokens=4)
    c.rollout.max_new_tokens = 12
    c.train.update(batch_size=16, num_iterations=3, checkpoint_every=3)
    c.ppo.lr = 3e-3
    c.mesh.update(data=-1, devices=devices)
    return c


def _metrics(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens/update_per_s"))} for r in rows]


def test_8_devices_train_like_1_with_batches_sharded(world, tmp_path, monkeypatch):
    from fisao_jax.methods.fisao import train

    paths, baseline = world
    calls = []
    original = placement.MeshJit.__call__

    def recording(self, *args, **kwargs):
        calls.append((getattr(self.jitted, "__name__", "?"), self.layout, args))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(placement.MeshJit, "__call__", recording)
    one = train(_config(paths, baseline, 1), tmp_path / "one")
    calls.clear()
    eight = train(_config(paths, baseline, 8), tmp_path / "eight")

    seen = set()
    for name, layout, args in calls:
        if name not in BATCH_ARGS:
            continue
        assert layout.batch_shards == 8
        for i in BATCH_ARGS[name]:
            for leaf in jax.tree.leaves(args[i]):
                seen.add(name)
                assert leaf.sharding.spec[0] == sharding_lib.batch_axes(layout.mesh), (name, i, leaf.sharding)
                assert not leaf.sharding.is_fully_replicated, (name, i)
    assert seen == set(BATCH_ARGS)  # the rollout, scoring and update were each checked

    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "eight")
    assert [r["iteration"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], abs=1e-5, rel=1e-5), k
    assert b[-1]["objective/kl"] != 0.0  # the policy moved away from the reference: a real comparison
    for k in ("CHAIRs", "CHAIRi", "Recall", "Len"):
        assert eight["after"][k] == pytest.approx(one["after"][k], abs=1e-6)
    la, lb = _adapter(tmp_path / "one"), _adapter(tmp_path / "eight")
    assert la.keys() == lb.keys()
    for k in la:
        np.testing.assert_allclose(lb[k], la[k], atol=1e-5)


def _adapter(run):
    from safetensors.numpy import load_file
    return load_file(run / "adapter" / "adapter.safetensors")
