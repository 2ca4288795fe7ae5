"""The start and finish every method's run shares.

`start_run` validates the config, refuses to overwrite unrelated work, writes config.json,
builds the setup, calibrates the reward baseline (baseline.json) and evaluates the starting
model (eval_before.json). `finish_run` evaluates the trained model (eval_after_<n>.json),
plots the reward shift, and writes and prints the summary (summary.json, one schema for every
method: `method`, `settings`, `seed`, `iterations`, `baseline`, `before`, `after`,
`relative_change_percent`, `wall_time_s`, method extras, examples).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from typing import Any, Optional, Sequence

import jax

from fisao_jax import atomic, hosts
from fisao_jax.checkpoint import Checkpointer
from fisao_jax.config_checks import validate_config
from fisao_jax.evaluate import chair_metrics, generate, mention_labels, mention_rewards
from fisao_jax.rewards.baseline import BaselineScores, plot_reward_shift, plot_score_histograms
from fisao_jax.run.setup import Setup, build_setup

SUMMARY_KEYS = ("CHAIRs", "CHAIRi", "Recall", "Len", "mean_mention_reward")


@dataclasses.dataclass
class MethodRun:
    """What a method's trainer gets from `start_run`."""

    method: str
    config: Any
    workdir: pathlib.Path
    setup: Setup
    baseline: BaselineScores
    before: dict          # eval_before.json
    ckpt: Checkpointer    # workdir/checkpoints
    latest: Optional[int]  # newest checkpoint step, None for a fresh run
    started: float        # time.time() at the start

    @property
    def reward_params(self):
        return self.baseline.reward_params(self.config.reward.margin)

    def say(self, message: str) -> None:
        """A line on the console (process 0 only)."""
        if hosts.is_primary():
            print(message, flush=True)


def cached_json(path: pathlib.Path, compute):
    """The JSON at `path` if it exists (a resumed run), else `compute()` (run by every process:
    it may hold collectives) written there by process 0."""
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    if hosts.is_primary():
        atomic.write_json(path, value, indent=1)
    hosts.wait(f"wrote {path.name}")
    return value


def check_fresh_or_resumable(workdir: pathlib.Path, latest: Optional[int]) -> None:
    """Refuse a workdir that holds training metrics but no checkpoint to resume from."""
    metrics = workdir / "metrics.jsonl"
    if latest is None and metrics.exists() and metrics.read_text().strip():
        raise RuntimeError(
            f"{workdir} holds training metrics but no readable checkpoint under {workdir / 'checkpoints'}: "
            f"refusing to start over existing work. Use a new --workdir, or delete {metrics}.")


def generate_on(setup: Setup, params, batches, key, desc: str):
    """Greedy responses (config.eval.max_new_tokens) for a list of image batches, with mentions."""
    return generate(setup.greedy_fn, params, setup.verifier, setup.vstate, setup.task.entity_vocab,
                    setup.task.tokenizer, batches, key, setup.put_batch, progress=True, desc=desc)


def calibrate(setup: Setup, config, workdir: pathlib.Path) -> BaselineScores:
    """SPEC step 5: baseline scores from the policy's responses on the calibration set
    (cached in workdir/baseline.json; config.reward.baseline_path overrides)."""
    if config.reward.baseline_path:
        return BaselineScores.load(config.reward.baseline_path)
    path = workdir / "baseline.json"
    if path.exists():
        return BaselineScores.load(path)
    gen = generate_on(setup, setup.params, setup.task.calibration_batches(config.calibration.batch_size),
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
    if hosts.is_primary():
        plot_score_histograms(scores, labels, workdir / "baseline_scores.png", baseline=baseline)
        baseline.save(path)
    hosts.wait("wrote baseline.json")
    return baseline


def evaluate(setup: Setup, params, config, baseline: BaselineScores, key) -> dict:
    """CHAIR + mention reward statistics on the held-out set."""
    gen = generate_on(setup, params, setup.task.eval_batches(config.eval.batch_size), key, "evaluation")
    out = chair_metrics(gen, setup.task.chair_vocab)
    rewards = mention_rewards(gen, baseline.reward_params(config.reward.margin))
    out["mention_rewards"] = rewards.tolist()
    out["mean_mention_reward"] = float(rewards.mean()) if rewards.size else 0.0
    out["captions"] = [{"image_id": _jsonable(i), "caption": t} for i, t in zip(gen.image_ids, gen.texts)]
    out["examples"] = [{"image_id": c["image_id"], "text": c["caption"]} for c in out["captions"][:8]]
    return out


def start_run(config, workdir, method: str, report=logging.info) -> MethodRun:
    """See the module docstring."""
    started = time.time()
    validate_config(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.train.keep_checkpoints)
    latest = ckpt.latest_step()
    check_fresh_or_resumable(workdir, latest)
    if hosts.is_primary():
        atomic.write_text(workdir / "config.json", config.to_json_best_effort(indent=2, sort_keys=True))
    setup = build_setup(config, workdir, report=report)
    baseline = calibrate(setup, config, workdir)
    before = cached_json(workdir / "eval_before.json",
                         lambda: evaluate(setup, setup.params, config, baseline, jax.random.PRNGKey(config.seed + 3)))
    return MethodRun(method, config, workdir, setup, baseline, before, ckpt, latest, started)


def finish_run(run: MethodRun, params, iterations: int, settings: Sequence[str], extra: Optional[dict] = None) -> dict:
    """Evaluate `params` (eval_after_<iterations>.json), write summary.json and reward_shift.png,
    print the before/after table; returns the summary. `settings`: the config sections that
    define the method (e.g. ('reward', 'ppo')), recorded in the summary."""
    config = run.config
    after = cached_json(run.workdir / f"eval_after_{iterations}.json",
                        lambda: evaluate(run.setup, params, config, run.baseline, jax.random.PRNGKey(config.seed + 3)))
    if run.before["mention_rewards"] and after["mention_rewards"] and hosts.is_primary():
        plot_reward_shift(run.before["mention_rewards"], after["mention_rewards"], run.workdir / "reward_shift.png")
    rel = lambda a, b: 100.0 * (b - a) / a if a else 0.0  # noqa: E731
    summary = {
        "method": run.method, "seed": config.seed, "iterations": iterations,
        "settings": {name: config[name].to_dict() for name in settings},
        "baseline": run.baseline.to_dict(),
        "before": {k: run.before[k] for k in SUMMARY_KEYS}, "after": {k: after[k] for k in SUMMARY_KEYS},
        "relative_change_percent": {k: rel(run.before[k], after[k]) for k in ("CHAIRs", "CHAIRi")},
        "wall_time_s": time.time() - run.started,
        **(extra or {}),
        "examples_before": run.before["examples"][:4], "examples_after": after["examples"][:4],
    }
    if hosts.is_primary():
        atomic.write_json(run.workdir / "summary.json", summary, indent=2)
        print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    print(f"\n{summary['method'].upper()} summary (seed={summary['seed']}, {summary['iterations']} iterations, "
          f"{summary['wall_time_s']:.0f} s)")
    print(f"{'metric':<22}{'before':>10}{'after':>10}")
    for k in SUMMARY_KEYS:
        print(f"{k:<22}{summary['before'][k]:>10.2f}{summary['after'][k]:>10.2f}")


def _jsonable(x):
    x = x.item() if hasattr(x, "item") else x
    return x if isinstance(x, (int, float, str)) else str(x)
