"""bf16: PPO starts from the log-probs it optimises. The rollout's KV-cache log-probs differ from
a teacher-forced pass by bf16 rounding, so scoring takes `old_logp` / `old_values` from the
teacher-forced pass the update evaluates: the first minibatch's ratio is 1 and a fresh run's
KL is 0 (on the trainer's own setup, steps and batch layout)."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import toy_world
from fisao_jax import update as update_lib
from fisao_jax.config_base import load_config_file
from fisao_jax.methods import fisao
from fisao_jax.params import merge_params
from fisao_jax.policy import response_logprobs
from fisao_jax.rewards.reward import RewardParams
from fisao_jax.run.setup import build_setup

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    paths = toy_world.make_toy_world(root / "world")
    c = load_config_file(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
    c.model.update(policy=paths["policy"], verifier=paths["verifier"], tokenizer=paths["tokenizer"], dtype="bfloat16")
    c.synthetic.num_train_prompts = 64
    c.rollout.max_new_tokens = 16
    c.train.batch_size = 8
    c.mesh.update(data=-1, devices=2)  # minibatches of 4 rows over 2 devices
    setup = build_setup(c, root / "run")
    state, frozen = fisao.initial_state(setup, c, fisao.make_optimizer_for(c))
    steps = fisao.steps_for(setup, c, state, frozen)
    batch = setup.put_batch(setup.task.train_batch(0, c.train.batch_size)[0])
    rp = RewardParams.create(10.0, 1.0, -1.0, -4.0, 4.0)
    return c, setup, state, frozen, steps, batch, rp


def _score_and_update(config, setup, state, frozen, steps, batch, rp):
    """One iteration's scoring and update as `fisao_jax.methods.fisao.iteration` runs them."""
    params = merge_params(state.trainable, frozen)
    roll = setup.rollout_fn(params, batch, jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(1)
    scored = steps.score(params, setup.vstate, rp, batch, roll.tokens, roll.mask,
                         update_lib.epoch_keys(key, config.ppo.ppo_epochs)[0], None)
    ppo_batch = dict(batch, tokens=roll.tokens, mask=roll.mask, old_logp=scored["old_logp"],
                     old_values=scored["old_values"], advantages=scored["advantages"], returns=scored["returns"])
    _, metrics = steps.update(jax.tree.map(jnp.copy, state), frozen, ppo_batch, key)  # the update donates its state
    return roll, scored, metrics


def test_fresh_run_starts_at_kl_zero_and_ratio_one(run):
    config, setup, state, frozen, steps, batch, rp = run
    assert setup.module.dtype == jnp.bfloat16 and config.ppo.num_minibatches == 2
    _, scored, metrics = _score_and_update(config, setup, state, frozen, steps, batch, rp)
    assert float(scored["metrics"]["objective/kl"]) == 0.0  # LoRA B = 0: policy = reference
    assert float(metrics["policy/approxkl_first_minibatch"]) <= 1e-6
    assert float(metrics["policy/approxkl_avg"]) > 0  # later minibatches see the updated policy


def test_trained_adapters_first_minibatch_ratio_is_one(run):
    config, setup, state, frozen, steps, batch, rp = run
    keys = iter(jax.random.split(jax.random.PRNGKey(5), 10_000))
    trainable = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), state.trainable)
    roll, scored, metrics = _score_and_update(config, setup, state.replace(trainable=trainable), frozen, steps,
                                              batch, rp)
    assert float(scored["metrics"]["objective/kl"]) != 0.0  # the adapters change the policy
    assert float(metrics["policy/approxkl_first_minibatch"]) <= 1e-6
    # the design matters: one pass over all 8 rows (not the update's 4-row minibatches) rounds
    # differently in bf16, and would not start PPO at ratio 1
    params = merge_params(trainable, frozen)
    full = jax.jit(lambda p, b, t, m: response_logprobs(setup.module, p, b, t, m))(params, batch, roll.tokens,
                                                                                   roll.mask)["logprobs"]
    m = np.asarray(roll.mask, bool)
    gap = np.abs(np.asarray(full, np.float64) - np.asarray(scored["old_logp"], np.float64))[m]
    assert gap.max() > 1e-4, gap.max()
