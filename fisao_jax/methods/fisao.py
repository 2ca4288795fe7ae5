"""FiSAO: token-level PPO with the verifier's rewards on every object word.

    python -m fisao_jax.main --config=configs/tiny.py --workdir=runs/tiny

Each iteration: a rollout batch (compiled decode loops), one compiled scoring step (the
teacher-forced policy and reference passes, entity spans, verifier scores, rewards, GAE) and
one compiled PPO update (epochs x minibatches on LoRA + value head). The run frame
(`fisao_jax.run`) calibrates the baseline before and evaluates CHAIR before and after.

Workdir: config.json, log.txt, baseline.json (+ baseline_scores.png), eval_before.json,
eval_after_<n>.json, metrics.jsonl, tb/, checkpoints/<iteration>/, adapter/ (LoRA + value
head for tools/export_hf.py), reward_shift.png (paper Figure 4), summary.json.
A run resumes from the newest checkpoint in its workdir.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fisao_jax import hosts, ppo
from fisao_jax import update as update_lib
from fisao_jax.config_checks import ConfigError
from fisao_jax.lora_adapter import save_adapter
from fisao_jax.params import merge_params, split_params
from fisao_jax.run.frame import MethodRun, evaluate, finish_run, start_run
from fisao_jax.run.log import MetricsLog, NonFiniteGuard
from fisao_jax.run.setup import Setup
from fisao_jax.scoring import make_policy_fn, make_score_fn
from fisao_jax.train_state import TrainState, counter, init_opt_state
from fisao_jax.update import make_optimizer

SETTINGS = ("reward", "ppo", "rollout")
SCORE_OUTPUTS = ("old_logp", "old_values", "ref_logp", "entity_ids", "span_start", "token_scores", "rewards",
                 "task_rewards", "advantages", "returns", "image_emb")


class FisaoState(TrainState):
    """The PPO state plus the loop's counters, saved whole in each checkpoint."""

    iteration: jax.Array        # completed iterations
    data_position: jax.Array    # next training prompt (position in the seeded order)
    rng: jax.Array
    nonfinite_total: jax.Array  # updates skipped by the non-finite guard
    nonfinite_streak: jax.Array


def validate(config) -> None:
    """ConfigError naming the key for settings PPO cannot honour."""
    if config.model.lora_dropout:
        raise ConfigError(f"config key 'model.lora_dropout' must be 0 for FiSAO (got {config.model.lora_dropout}): "
                          f"PPO's ratio compares the same function before and after an update, and dropout would "
                          f"make the policy random")


@dataclasses.dataclass
class Steps:
    """FiSAO's compiled steps for one setup."""

    optimizer: Any
    score: Callable   # (params, vstate, reward_params, batch, tokens, mask, shuffle_key, sentence_scores) -> dict
    update: Callable  # (state, frozen, ppo_batch, key) -> (state, metrics)


def check_batch_shapes(config, batch_shards: int) -> None:
    """ConfigError unless every PPO minibatch splits evenly over the mesh's batch shards."""
    rows = config.train.batch_size // config.ppo.num_minibatches
    if rows % batch_shards:
        raise ConfigError(f"config keys 'train.batch_size' / 'ppo.num_minibatches' = {rows}-row minibatches do not "
                          f"split over the mesh's {batch_shards} batch shards (mesh axes data x fsdp); choose a "
                          f"batch size that is a multiple of {batch_shards * config.ppo.num_minibatches}")


def make_optimizer_for(config):
    p = config.ppo
    return make_optimizer(p.lr, weight_decay=p.weight_decay, max_grad_norm=p.max_grad_norm)


def make_steps(module, verifier, settings, layout, config, param_shardings: Any, vstate_shardings: Any,
               state_shardings: Any, frozen_shardings: Any) -> Steps:
    """The scoring step and the PPO update, compiled with the run's shardings (arrays in hand
    for a run; abstract ones for `fisao_jax.compile_target`)."""
    p = config.ppo
    check_batch_shapes(config, layout.batch_shards)
    optimizer = make_optimizer_for(config)
    policy_fn = make_policy_fn(module, settings.temperature)
    score = make_score_fn(module, verifier, settings, policy_fn)
    update = ppo.make_ppo_update(policy_fn, optimizer,
                                 ppo_epochs=p.ppo_epochs, num_minibatches=p.num_minibatches, clip_eps=p.clip_eps,
                                 clip_eps_value=p.clip_eps_value, vf_coef=p.vf_coef, ent_coef=p.ent_coef)
    b, r = layout.batch, layout.replicated
    score_out = {**{k: b for k in SCORE_OUTPUTS}, "metrics": r}
    return Steps(
        optimizer,
        layout.jit(score, in_shardings=(param_shardings, vstate_shardings, r, b, b, b, r, b), out_shardings=score_out),
        layout.jit(update, in_shardings=(state_shardings, frozen_shardings, b, r), out_shardings=(state_shardings, r),
                   donate_argnums=(0,)))


def steps_for(setup: Setup, config, state, frozen) -> Steps:
    """`make_steps` for a run's setup and state."""
    layout = setup.layout
    return make_steps(setup.module, setup.verifier, setup.score_settings, layout, config, setup.param_shardings,
                      layout.of(setup.vstate), layout.of(state), layout.of(frozen))


def initial_state(setup: Setup, config, optimizer) -> tuple[FisaoState, Any]:
    """(state, frozen) of a fresh run, laid out on the mesh."""
    trainable, frozen = split_params(setup.params)
    trainable = jax.tree.map(jnp.copy, trainable)  # the update donates the state: keep setup.params whole
    state = FisaoState(trainable=trainable, opt_state=init_opt_state(optimizer, trainable, setup.layout),
                       step=counter(), iteration=counter(), data_position=counter(),
                       rng=jax.random.PRNGKey(config.seed), nonfinite_total=counter(), nonfinite_streak=counter())
    return setup.layout.place(state, setup.layout.of(state)), frozen


def sentence_scores(setup: Setup, state_vstate, roll, batch) -> jax.Array:
    """Host step of the sentence-level ablation: decode, encode whole responses with the verifier."""
    toks, mask = hosts.gather((roll.tokens, roll.mask))
    texts = [setup.task.tokenizer.decode(t[: int(m.sum())].tolist(), skip_special_tokens=True).strip()
             for t, m in zip(toks, mask)]
    img = hosts.gather(setup.verifier.image_embeddings_jit(state_vstate.params, batch["pixel_values"]))
    return hosts.from_host(np.asarray(setup.verifier.sentence_scores(state_vstate, img, texts)), setup.layout.batch)


_all_finite = jax.jit(lambda x: jnp.all(jnp.isfinite(x)))  # a replicated scalar: every process can read it
_count = jax.jit(jnp.sum)


def _host(tree: Any) -> dict:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def iteration(run: MethodRun, steps: Steps, state: FisaoState, frozen, guard: NonFiniteGuard) -> tuple[FisaoState, dict]:
    """One FiSAO iteration: rollout, scoring, PPO update (skipped when non-finite)."""
    setup, config = run.setup, run.config
    # read before the update: it donates the state's buffers
    shardings, done = setup.layout.of(state), int(state.iteration)
    key, k_roll, k_upd = jax.random.split(state.rng, 3)
    batch, position_next = setup.task.train_batch(int(state.data_position), config.train.batch_size)
    dev = setup.put_batch(batch)  # this process's rows (all of them with one process)
    params = merge_params(state.trainable, frozen)
    t0 = time.time()
    roll = jax.block_until_ready(setup.rollout_fn(params, dev, k_roll))
    t1 = time.time()
    sentence = sentence_scores(setup, setup.vstate, roll, dev) if config.reward.kind == "sentence" else None
    shuffle_key = update_lib.epoch_keys(k_upd, config.ppo.ppo_epochs)[0]  # the update's first epoch
    scored = jax.block_until_ready(steps.score(params, setup.vstate, run.reward_params, dev, roll.tokens, roll.mask,
                                               shuffle_key, sentence))
    t2 = time.time()
    metrics = _host(scored["metrics"])
    finite = bool(_all_finite(scored["rewards"]))
    new_state = state
    if finite:
        ppo_batch = dict(dev, tokens=roll.tokens, mask=roll.mask, old_logp=scored["old_logp"],
                         old_values=scored["old_values"], advantages=scored["advantages"], returns=scored["returns"])
        new_state, upd = steps.update(state, frozen, ppo_batch, k_upd)
        upd = _host(upd)
        finite = bool(upd.pop("finite"))
        metrics.update(upd)
    t3 = time.time()
    guard.record(finite, done)
    n_tokens = int(_count(roll.mask))
    logging.info("iteration %d: this process read %d of %d training prompts", done + 1, len(batch["input_ids"]),
                 config.train.batch_size)
    metrics.update({"time/rollout": t1 - t0, "time/scoring": t2 - t1, "time/update": t3 - t2,
                    "nonfinite/total": guard.total, "nonfinite/skipped": float(not finite),
                    "tokens/update_per_s": n_tokens * config.ppo.ppo_epochs / max(t3 - t2, 1e-9)})
    new_state = new_state.replace(
        rng=key, iteration=counter(done + 1), data_position=counter(position_next),
        nonfinite_total=counter(guard.total), nonfinite_streak=counter(guard.streak))
    return _place_counters(new_state, shardings), metrics


def _place_counters(state: FisaoState, shardings) -> FisaoState:
    """The state with its host-made counters and key on the mesh (the rest is already there)."""
    names = ("rng", "iteration", "data_position", "nonfinite_total", "nonfinite_streak")
    return state.replace(**{n: hosts.from_host(np.asarray(getattr(state, n)), getattr(shardings, n)) for n in names})


def train(config, workdir) -> dict:
    """Run (or resume) FiSAO in `workdir`; returns the summary also written to summary.json."""
    validate(config)
    run = start_run(config, workdir, "fisao")
    setup = run.setup
    state, frozen = initial_state(setup, config, make_optimizer_for(config))
    steps = steps_for(setup, config, state, frozen)
    if run.latest is not None:
        state = run.ckpt.restore(run.latest, state)
        run.say(f"resumed from {run.ckpt.directory / str(run.latest)} (iteration {int(state.iteration)})")
    start = int(state.iteration)
    num_iterations = config.train.num_iterations or -(-setup.task.num_train_prompts // config.train.batch_size)
    guard = NonFiniteGuard(config.train.max_nonfinite_in_row, int(state.nonfinite_total), int(state.nonfinite_streak))
    log = MetricsLog(run.workdir, start)
    bar = tqdm(range(start, num_iterations), initial=start, total=num_iterations, desc="FiSAO", unit="it",
               disable=not hosts.is_primary())
    for it in bar:
        state, metrics = iteration(run, steps, state, frozen, guard)
        log.write(it + 1, metrics)
        bar.set_postfix({"reward": f"{metrics.get('objective/scores', 0):.2f}",
                         "kl": f"{metrics.get('objective/kl', 0):.3f}",
                         "span+": f"{metrics.get('spans/frac_positive', 0):.2f}",
                         "roll/score/upd s": f"{metrics['time/rollout']:.1f}/{metrics['time/scoring']:.1f}/"
                                             f"{metrics['time/update']:.1f}"})
        last = it + 1 == num_iterations
        if (it + 1) % config.train.checkpoint_every == 0 or last:
            run.ckpt.save(it + 1, state)
        if config.train.eval_every and (it + 1) % config.train.eval_every == 0 and not last:
            ev = evaluate(setup, merge_params(state.trainable, frozen), config, run.baseline,
                          jax.random.PRNGKey(config.seed + 3))
            log.write(it + 1, {f"eval/{k}": v for k, v in ev.items() if isinstance(v, float)})
    log.close()
    run.ckpt.close()
    final = merge_params(state.trainable, frozen)
    adapter = hosts.gather(state.trainable)  # every process takes part in the gather; process 0 writes
    if hosts.is_primary():
        save_adapter(adapter, setup.module.cfg.lora, run.workdir / "adapter", base=setup.task.policy_dir,
                     overwrite=True)
    hosts.wait("adapter")
    return finish_run(run, final, num_iterations, SETTINGS, {"nonfinite_skipped": guard.total})
