"""FiSAO training loop: prompts -> rollout -> reference log-probs, spans, verifier scores,
rewards, GAE -> PPO update on LoRA + value head; calibration, evaluation, checkpoints.

Everything a run writes goes to `workdir`:
  config.json, baseline.json (+ baseline_scores.png), eval_before.json, eval_after.json,
  metrics.jsonl, tb/ (TensorBoard), checkpoints/<iteration>/, summary.json,
  reward_shift.png (paper Figure 4), cache/ (entity text table), adapter/ (the trained LoRA +
  value head, for tools/export_hf.py).
A run resumes from the newest checkpoint in `workdir` automatically.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fisao_jax.models import hf_io
from fisao_jax import atomic, ppo
from fisao_jax import sharding as sharding_lib
from fisao_jax.evaluate import chair_metrics, generate, mention_labels, mention_rewards
from fisao_jax.params import merge_params
from fisao_jax.rewards import verifier
from fisao_jax.rewards.baseline import BaselineScores, plot_reward_shift, plot_score_histograms
from fisao_jax.rewards.spans import build_span_table
from fisao_jax.rollout import SamplingConfig, make_rollout
from fisao_jax.scoring import RewardSettings, make_policy_fn, make_score_fn


class NonFiniteGuard:
    """Counts skipped (non-finite) steps; raises after `max_in_row` consecutive ones."""

    def __init__(self, max_in_row: int, total: int = 0, streak: int = 0):
        self.max_in_row, self.total, self.streak = max_in_row, total, streak

    def record(self, finite: bool, iteration: int) -> None:
        if finite:
            self.streak = 0
            return
        self.total += 1
        self.streak += 1
        if self.streak >= self.max_in_row:
            raise FloatingPointError(
                f"{self.streak} non-finite PPO steps in a row (last at iteration {iteration}); stopping. "
                f"Lower ppo.lr, check the reward baseline (baseline.json) or raise train.max_nonfinite_in_row.")


def _host(tree: Any) -> dict:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


class MetricsLog:
    """metrics.jsonl + TensorBoard. On resume, lines after the restored iteration are dropped,
    so a resumed run's file equals an uninterrupted run's."""

    def __init__(self, workdir: pathlib.Path, resume_iteration: int, tensorboard: bool = True):
        self.path = workdir / "metrics.jsonl"
        if self.path.exists():
            kept = [l for l in self.path.read_text().splitlines()
                    if l.strip() and json.loads(l).get("iteration", 0) <= resume_iteration]
            self.path.write_text("".join(l + "\n" for l in kept))
        self.writer = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self.writer = SummaryWriter(str(workdir / "tb"))
            except ImportError:
                pass

    def write(self, iteration: int, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"iteration": iteration, **metrics}, sort_keys=True) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, iteration)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclasses.dataclass
class Setup:
    """Everything built once per run (models, params, tables, jitted functions)."""

    task: Any
    module: Any
    params: Any
    clip_module: Any
    clip_params: Any
    mesh: Any
    text_table: jax.Array
    span_table: Any
    rollout_fn: Any
    greedy_fn: Any
    settings: RewardSettings


def build_setup(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Setup:
    """Task data, policy (LoRA + value head) and verifier on the mesh, jitted step functions."""
    from fisao_jax.models.configs import LoRAConfig
    from fisao_jax.tasks import build_task

    task = build_task(config, workdir)
    dtype = jnp.dtype(config.model.dtype)
    lora = LoRAConfig(rank=config.model.lora_rank, alpha=config.model.lora_alpha, dropout=config.model.lora_dropout)
    module, params = hf_io.from_hf(task.policy_dir, dtype=dtype, lora=lora,
                                       lora_key=jax.random.PRNGKey(config.seed + 1))
    module = module.clone(remat=config.model.remat)
    clip_module, clip_params = hf_io.from_hf(task.clip_dir, dtype=dtype)
    mesh = sharding_lib.make_mesh(dict(config.mesh))
    params = sharding_lib.shard_params(params, mesh)
    clip_params = sharding_lib.shard_params(clip_params, mesh, sharding_lib.CLIP_RULES)

    vocab = task.entity_vocab
    text_table = verifier.entity_text_table(
        clip_module, clip_params, task.clip_tokenizer, vocab.surface_forms, config.reward.template,
        cache_dir=workdir / "cache", checkpoint_id=verifier.checkpoint_id(task.clip_dir))
    span_table = build_span_table(task.tokenizer, vocab)
    r = config.rollout
    sampling = SamplingConfig(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k,
                              top_p=r.top_p, eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id,
                              decode_chunk=r.decode_chunk)
    greedy = SamplingConfig(max_new_tokens=config.eval.max_new_tokens, greedy=True,
                            eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id,
                            decode_chunk=r.decode_chunk)
    settings = RewardSettings(kind=config.reward.kind, margin=config.reward.margin, kl_coef=config.reward.kl_coef,
                              gamma=config.ppo.gamma, lam=config.ppo.lam,
                              whiten_advantages=config.ppo.whiten_advantages, temperature=r.temperature)
    return Setup(task, module, params, clip_module, clip_params, mesh, text_table, span_table,
                 make_rollout(module, sampling, mesh), make_rollout(module, greedy, mesh), settings)


def _generate(setup: Setup, params, batches, key, desc):
    return generate(setup.greedy_fn, params, setup.clip_module, setup.clip_params, setup.text_table,
                    setup.span_table, setup.task.entity_vocab, setup.task.tokenizer, batches, key,
                    progress=True, desc=desc)


def calibrate(setup: Setup, config, workdir: pathlib.Path) -> BaselineScores:
    """SPEC step 5: baseline scores from the policy's responses on the calibration set
    (cached in workdir/baseline.json; config.reward.baseline_path overrides)."""
    if config.reward.baseline_path:
        return BaselineScores.load(config.reward.baseline_path)
    path = workdir / "baseline.json"
    if path.exists():
        return BaselineScores.load(path)
    gen = _generate(setup, setup.params, setup.task.calibration_batches(config.calibration.batch_size),
                    jax.random.PRNGKey(config.seed + 2), "calibration")
    scores, labels = mention_labels(gen, setup.task.chair_vocab)
    try:
        baseline = BaselineScores.from_mentions(scores, labels, config.reward.baseline_low_pct,
                                                config.reward.baseline_high_pct)
    except ValueError as e:
        raise ValueError(
            f"baseline scores cannot be estimated from {len(gen.texts)} calibration responses "
            f"({len(scores)} object mentions, {sum(labels)} hallucinated): {e}. Use more calibration images, "
            f"more new tokens, or give reward.baseline_path.") from e
    plot_score_histograms(scores, labels, workdir / "baseline_scores.png", baseline=baseline)
    baseline.save(path)
    return baseline


def evaluate(setup: Setup, params, config, baseline: BaselineScores, key) -> dict:
    """CHAIR + mention reward statistics on the held-out set."""
    gen = _generate(setup, params, setup.task.eval_batches(config.eval.batch_size), key, "evaluation")
    out = chair_metrics(gen, setup.task.chair_vocab)
    rewards = mention_rewards(gen, baseline, config.reward.margin)
    out["mention_rewards"] = rewards.tolist()
    out["mean_mention_reward"] = float(rewards.mean()) if rewards.size else 0.0
    out["captions"] = [{"image_id": _jsonable(i), "caption": t} for i, t in zip(gen.image_ids, gen.texts)]
    out["examples"] = [{"image_id": c["image_id"], "text": c["caption"]} for c in out["captions"][:8]]
    return out


def _jsonable(x):
    return x.item() if hasattr(x, "item") else x


def cached_json(path: pathlib.Path, compute):
    """The JSON at `path` if it exists (a resumed run), else `compute()` written there."""
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    atomic.write_json(path, value, indent=1)
    return value


def check_fresh_or_resumable(workdir: pathlib.Path, latest: Optional[int]) -> None:
    """Refuse a workdir that holds training metrics but no checkpoint to resume from."""
    if latest is None and (workdir / "metrics.jsonl").exists() and (workdir / "metrics.jsonl").read_text().strip():
        raise RuntimeError(
            f"{workdir} holds training metrics but no readable checkpoint under {workdir / 'checkpoints'}: "
            f"refusing to start over existing work. Use a new --workdir, or delete {workdir / 'metrics.jsonl'}.")


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Run (or resume) FiSAO in `workdir`; returns the summary also written to summary.json."""
    from fisao_jax.methods import start_run

    run = start_run(config, workdir, "fisao")
    workdir, ckpt, latest, setup, baseline, before = run.workdir, run.ckpt, run.latest, run.setup, run.baseline, run.before

    p = config.ppo
    optimizer = ppo.make_optimizer(p.lr, weight_decay=p.weight_decay, max_grad_norm=p.max_grad_norm)
    update = ppo.make_ppo_update(make_policy_fn(setup.module, setup.settings.temperature), optimizer,
                                 ppo_epochs=p.ppo_epochs, num_minibatches=p.num_minibatches, clip_eps=p.clip_eps,
                                 clip_eps_value=p.clip_eps_value, vf_coef=p.vf_coef, ent_coef=p.ent_coef)
    score = make_score_fn(setup.module, setup.clip_module, setup.settings)
    pstate = replicate_unsharded(ppo.init_ppo_state(setup.params, optimizer), setup.mesh)
    state = {"trainable": pstate.trainable, "opt_state": pstate.opt_state, "step": pstate.step,
             "iteration": jnp.zeros((), jnp.int32), "data_position": jnp.zeros((), jnp.int32),
             "rng": jax.random.PRNGKey(config.seed), "nonfinite_total": jnp.zeros((), jnp.int32),
             "nonfinite_streak": jnp.zeros((), jnp.int32)}
    if latest is not None:
        state = ckpt.restore(latest, state)
        print(f"resumed from {ckpt.directory / str(latest)} (iteration {int(state['iteration'])})")
    frozen = pstate.frozen
    start = int(state["iteration"])
    num_iterations = config.train.num_iterations or -(-setup.task.num_train_prompts // config.train.batch_size)
    guard = NonFiniteGuard(config.train.max_nonfinite_in_row, int(state["nonfinite_total"]),
                           int(state["nonfinite_streak"]))
    log = MetricsLog(workdir, start)
    baseline_kw = baseline.reward_kwargs()  # with kind 'none' only the span statistics use it
    print(f"setup {time.time() - run.started:.1f}s; training iterations {start}..{num_iterations}")

    from tqdm.auto import tqdm
    bar = tqdm(range(start, num_iterations), initial=start, total=num_iterations, desc="FiSAO", unit="it")
    position = int(state["data_position"])
    for it in bar:
        key, k_roll, k_upd = jax.random.split(state["rng"], 3)
        batch, position_next = setup.task.train_batch(position, config.train.batch_size)
        dev_batch = {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "pixel_values")}
        params = merge_params(state["trainable"], frozen)

        t0 = time.time()
        roll = setup.rollout_fn(params, dev_batch["input_ids"], dev_batch["attention_mask"],
                                dev_batch["pixel_values"], k_roll)
        jax.block_until_ready(roll)
        t1 = time.time()
        sentence = None
        if config.reward.kind == "sentence":
            sentence = _sentence_scores(setup, roll, dev_batch)
        scored = score(params, setup.clip_params, setup.text_table, setup.span_table, baseline_kw, dev_batch, roll,
                       sentence)
        jax.block_until_ready(scored)
        t2 = time.time()
        rewards_finite = bool(jnp.all(jnp.isfinite(scored["rewards"])))
        metrics = _host(scored["metrics"])
        finite = False
        if rewards_finite:
            ppo_batch = dict(dev_batch, tokens=roll.tokens, mask=roll.mask, old_logp=roll.logprobs,
                             old_values=roll.values, advantages=scored["advantages"], returns=scored["returns"])
            new_pstate, upd = update(ppo.PPOState(state["trainable"], frozen, state["opt_state"], state["step"]),
                                     ppo_batch, k_upd)
            upd = _host(upd)
            finite = bool(upd.pop("finite"))
            metrics.update(upd)
            if finite:
                state = dict(state, trainable=new_pstate.trainable, opt_state=new_pstate.opt_state,
                             step=new_pstate.step)
        t3 = time.time()
        guard.record(finite, it)
        n_tokens = int(np.asarray(roll.mask).sum())
        metrics.update({"time/rollout": t1 - t0, "time/scoring": t2 - t1, "time/update": t3 - t2,
                        "nonfinite/total": guard.total, "nonfinite/skipped": float(not finite),
                        "tokens/update_per_s": n_tokens * config.ppo.ppo_epochs / max(t3 - t2, 1e-9)})
        state = dict(state, rng=key, iteration=jnp.asarray(it + 1, jnp.int32),
                     data_position=jnp.asarray(position_next, state["data_position"].dtype),
                     nonfinite_total=jnp.asarray(guard.total, jnp.int32),
                     nonfinite_streak=jnp.asarray(guard.streak, jnp.int32))
        position = position_next
        log.write(it + 1, metrics)
        bar.set_postfix({"reward": f"{metrics.get('objective/scores', 0):.2f}",
                         "kl": f"{metrics.get('objective/kl', 0):.3f}",
                         "span+": f"{metrics.get('spans/frac_positive', 0):.2f}",
                         "roll/score/upd s": f"{t1 - t0:.1f}/{t2 - t1:.1f}/{t3 - t2:.1f}"})
        last = it + 1 == num_iterations
        if (it + 1) % config.train.checkpoint_every == 0 or last:
            ckpt.save(it + 1, state)
        if config.train.eval_every and (it + 1) % config.train.eval_every == 0 and not last:
            ev = evaluate(setup, merge_params(state["trainable"], frozen), config, baseline,
                          jax.random.PRNGKey(config.seed + 3))
            log.write(it + 1, {f"eval/{k}": v for k, v in ev.items() if isinstance(v, float)})
    log.close()
    ckpt.close()

    final_params = merge_params(state["trainable"], frozen)
    from fisao_jax.export import save_adapter

    save_adapter(final_params, setup.module.cfg.lora, workdir / "adapter", base=setup.task.policy_dir, overwrite=True)
    after = cached_json(workdir / f"eval_after_{num_iterations}.json",
                        lambda: evaluate(setup, final_params, config, baseline, jax.random.PRNGKey(config.seed + 3)))
    if before["mention_rewards"] and after["mention_rewards"]:
        plot_reward_shift(before["mention_rewards"], after["mention_rewards"], workdir / "reward_shift.png")
    summary = _summary(config, baseline, before, after, num_iterations, guard)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary)
    return summary


def replicate_unsharded(tree: Any, mesh) -> Any:
    """Put leaves that live on one device (optimizer counters, step) on the mesh, replicated.

    The update returns every leaf with a mesh sharding; an initial state with the same
    shardings keeps the second call from compiling the update again."""
    from jax.sharding import NamedSharding, PartitionSpec

    def place(x):
        if isinstance(x, jax.Array) and not isinstance(x.sharding, NamedSharding):
            return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
        return x
    return jax.tree.map(place, tree)


def _sentence_scores(setup: Setup, roll, batch) -> jax.Array:
    """Host step of the sentence-level ablation: decode, CLIP-encode whole responses."""
    toks, mask = np.asarray(roll.tokens), np.asarray(roll.mask)
    texts = [setup.task.tokenizer.decode(t[: int(m.sum())].tolist(), skip_special_tokens=True).strip()
             for t, m in zip(toks, mask)]
    img = verifier.image_embeddings(setup.clip_module, setup.clip_params, batch["pixel_values"])
    return verifier.sentence_scores(setup.clip_module, setup.clip_params, setup.task.clip_tokenizer, img, texts)


def _summary(config, baseline, before, after, iterations, guard) -> dict:
    keys = ("CHAIRs", "CHAIRi", "Recall", "Len", "mean_mention_reward")
    rel = lambda a, b: 100.0 * (b - a) / a if a else 0.0  # noqa: E731
    return {
        "reward_kind": config.reward.kind, "margin": config.reward.margin, "seed": config.seed,
        "iterations": iterations, "nonfinite_skipped": guard.total,
        "baseline": baseline.to_dict(),
        "before": {k: before[k] for k in keys}, "after": {k: after[k] for k in keys},
        "relative_change_percent": {k: rel(before[k], after[k]) for k in ("CHAIRs", "CHAIRi")},
        "examples_before": before["examples"][:4], "examples_after": after["examples"][:4],
    }


def _print_summary(s: dict) -> None:
    print(f"\nFiSAO summary (reward={s['reward_kind']}, margin={s['margin']}, seed={s['seed']}, "
          f"{s['iterations']} iterations)")
    print(f"{'metric':<22}{'before':>10}{'after':>10}")
    for k in ("CHAIRs", "CHAIRi", "Recall", "Len", "mean_mention_reward"):
        print(f"{k:<22}{s['before'][k]:>10.2f}{s['after'][k]:>10.2f}")
