"""Sibling alignment methods on FiSAO's machinery, and the run frame they share.

  csr.py    CSR: sentence-level beam search with the calibrated reward, DPO, 3 iterations
  vigor.py  ViGoR (automatic): n samples, noun-level verifier scores, selection, refinement, SFT
  dpo.py    DPO loss and the one-jit minibatch update on LoRA
  sft.py    masked-LM SFT loss and update on LoRA

`config.method` picks the trainer ('fisao' default, 'csr', 'vigor'); every method shares
FiSAO's task, models, verifier, calibration (baseline.json), evaluation (CHAIR before and
after on the held-out scenes) and the layout of the workdir (config.json, eval_*.json,
metrics.jsonl, checkpoints/, summary.json).
"""
from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Callable, Optional

import numpy as np

from fisao_jax import atomic

METHODS = ("fisao", "csr", "vigor")


def trainer_for(method: str) -> Callable[..., dict]:
    """The `train(config, workdir) -> summary` function of `method` (config key 'method')."""
    from fisao_jax.config_checks import ConfigError

    if method == "fisao":
        from fisao_jax.train import train
        return train
    if method == "csr":
        from fisao_jax.methods.csr import train
        return train
    if method == "vigor":
        from fisao_jax.methods.vigor import train
        return train
    raise ConfigError(f"config key 'method' must be one of {METHODS}, got {method!r}")


def check_section(config, section: str, positive_ints: tuple = (), positive: tuple = (), non_negative: tuple = (),
                  choices: Optional[dict] = None) -> None:
    """Raise ConfigError naming `section.key` when a key is missing, of the wrong type or out of range."""
    from fisao_jax.config_checks import ConfigError

    if section not in config:
        raise ConfigError(f"config section '{section}' is missing (method {config.get('method')!r} needs it)")
    node = config[section]

    def get(key):
        if key not in node:
            raise ConfigError(f"config key '{section}.{key}' is missing")
        return node[key]

    for key in positive_ints:
        v = get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"config key '{section}.{key}' must be an int >= 1, got {v!r}")
    for key in positive:
        v = get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ConfigError(f"config key '{section}.{key}' must be a number > 0, got {v!r}")
    for key in non_negative:
        v = get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"config key '{section}.{key}' must be a number >= 0, got {v!r}")
    for key, allowed in (choices or {}).items():
        if get(key) not in allowed:
            raise ConfigError(f"config key '{section}.{key}' must be one of {tuple(allowed)}, got {get(key)!r}")


@dataclasses.dataclass
class MethodRun:
    """What a method's trainer (FiSAO's included) gets from `start_run`."""

    method: str
    workdir: pathlib.Path
    setup: Any            # fisao_jax.train.Setup
    baseline: Any         # BaselineScores
    before: dict          # eval_before.json
    ckpt: Any             # Checkpointer of workdir/checkpoints
    latest: Optional[int]
    started: float        # time.time() at the start


def start_run(config, workdir, method: str) -> MethodRun:
    """Validate, refuse to overwrite unrelated work, write config.json, build the setup,
    calibrate (baseline.json) and evaluate the starting model (eval_before.json)."""
    import jax

    from fisao_jax.checkpoint import Checkpointer
    from fisao_jax.config_checks import validate_config
    from fisao_jax.train import cached_json, check_fresh_or_resumable, build_setup, calibrate, evaluate

    started = time.time()
    validate_config(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.train.keep_checkpoints)
    latest = ckpt.latest_step()
    check_fresh_or_resumable(workdir, latest)
    atomic.write_text(workdir / "config.json", config.to_json_best_effort(indent=2, sort_keys=True))
    setup = build_setup(config, workdir)
    baseline = calibrate(setup, config, workdir)
    before = cached_json(workdir / "eval_before.json",
                         lambda: evaluate(setup, setup.params, config, baseline, jax.random.PRNGKey(config.seed + 3)))
    return MethodRun(method, workdir, setup, baseline, before, ckpt, latest, started)


def finish_run(run: MethodRun, config, params, iterations: int, extra: Optional[dict] = None) -> dict:
    """Evaluate `params` (eval_after_<iterations>.json), write summary.json and reward_shift.png,
    print the before/after table; returns the summary."""
    import jax

    from fisao_jax.rewards.baseline import plot_reward_shift
    from fisao_jax.train import cached_json, evaluate

    after = cached_json(run.workdir / f"eval_after_{iterations}.json",
                        lambda: evaluate(run.setup, params, config, run.baseline, jax.random.PRNGKey(config.seed + 3)))
    if run.before["mention_rewards"] and after["mention_rewards"]:
        plot_reward_shift(run.before["mention_rewards"], after["mention_rewards"], run.workdir / "reward_shift.png")
    keys = ("CHAIRs", "CHAIRi", "Recall", "Len", "mean_mention_reward")
    rel = lambda a, b: 100.0 * (b - a) / a if a else 0.0  # noqa: E731
    summary = {
        "method": run.method, "seed": config.seed, "iterations": iterations,
        "settings": config[run.method].to_dict() if run.method in config else {},
        "baseline": run.baseline.to_dict(),
        "before": {k: run.before[k] for k in keys}, "after": {k: after[k] for k in keys},
        "relative_change_percent": {k: rel(run.before[k], after[k]) for k in ("CHAIRs", "CHAIRi")},
        "wall_time_s": time.time() - run.started,
        **(extra or {}),
        "examples_before": run.before["examples"][:4], "examples_after": after["examples"][:4],
    }
    atomic.write_json(run.workdir / "summary.json", summary, indent=2)
    print(f"\n{run.method.upper()} summary (seed={config.seed}, {iterations} iterations, "
          f"{summary['wall_time_s']:.0f} s)")
    print(f"{'metric':<22}{'before':>10}{'after':>10}")
    for k in keys:
        print(f"{k:<22}{summary['before'][k]:>10.2f}{summary['after'][k]:>10.2f}")
    return summary


def prompt_batches(task, num_prompts: int, batch_size: int) -> list[tuple[dict, int]]:
    """The first `num_prompts` training prompts (the task's seeded order) as `(batch, n)`:
    full `batch_size`-row batches (static shapes), of which the first `n` rows are used (the
    last batch is filled up with the following prompts, whose results are dropped)."""
    out, position = [], 0
    while position < num_prompts:
        batch, position_next = task.train_batch(position, batch_size)
        out.append((batch, min(batch_size, num_prompts - position)))
        position = position_next
    return out


def pad_to_multiple(arrays: dict, multiple: int) -> dict:
    """Rows repeated from row 0 up to a multiple of `multiple`, with `weight` 1 on real rows
    and 0 on the copies (static shapes for the jitted updates)."""
    n = len(next(iter(arrays.values())))
    if n == 0:
        raise ValueError("pad_to_multiple: no rows")
    size = -(-n // multiple) * multiple
    out = {k: np.concatenate([v, np.repeat(v[:1], size - n, axis=0)]) if size > n else v for k, v in arrays.items()}
    weight = np.zeros(size, np.float32)
    weight[:n] = 1.0
    out["weight"] = weight
    return out


def train_epochs(update: Callable, state, data: dict, chunk: int, epochs: int, rng: np.random.Generator):
    """`epochs` shuffled passes over `data` (NumPy arrays with a 'weight' column, rows a
    multiple of `chunk`), one jitted `update(state, batch)` per `chunk` rows; an update that
    reports non-finite values is skipped (state kept).

    Returns (state, metrics averaged over updates weighted by their real rows, skipped count)."""
    import jax
    import jax.numpy as jnp

    sums, weight, skipped = {}, 0.0, 0
    for _ in range(epochs):
        perm = rng.permutation(len(data["weight"]))
        for s in range(0, len(perm), chunk):
            idx = perm[s:s + chunk]
            new, metrics = update(state, {k: jnp.asarray(v[idx]) for k, v in data.items()})
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not metrics.pop("finite"):
                skipped += 1
                continue
            state = new
            w = float(data["weight"][idx].sum())
            weight += w
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + w * v
    return state, {k: v / max(weight, 1e-12) for k, v in sums.items()}, skipped


