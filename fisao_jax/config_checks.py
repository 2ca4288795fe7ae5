"""Validation of experiment configs: every error names the key at fault."""
from __future__ import annotations

import ml_collections

from fisao_jax.methods import METHODS

REQUIRED = {
    "seed": int,
    "method": str,
    "task": str,
    "model.dtype": str, "model.lora_rank": int, "model.lora_alpha": (int, float), "model.lora_dropout": (int, float), "model.remat": bool,
    "rollout.max_new_tokens": int, "rollout.temperature": (int, float), "rollout.top_k": int,
    "rollout.top_p": (int, float), "rollout.decode_chunk": int,
    "reward.kind": str, "reward.margin": (int, float), "reward.kl_coef": (int, float), "reward.template": str,
    "reward.baseline_low_pct": (int, float), "reward.baseline_high_pct": (int, float),
    "reward.verifier_is_policy_encoder": bool, "reward.verifier_encoder_tolerance": (int, float),
    "ppo.lr": (int, float), "ppo.ppo_epochs": int, "ppo.num_minibatches": int, "ppo.clip_eps": (int, float),
    "ppo.clip_eps_value": (int, float), "ppo.gamma": (int, float), "ppo.lam": (int, float),
    "train.batch_size": int, "train.num_iterations": int, "train.checkpoint_every": int,
    "train.max_nonfinite_in_row": int,
    "eval.batch_size": int, "eval.max_new_tokens": int,
}

CHOICES = {
    "method": tuple(METHODS),
    "task": ("synthetic", "coco"),
    "model.dtype": ("float32", "bfloat16"),
    "reward.kind": ("token", "sentence", "none"),
}


class ConfigError(ValueError):
    """A config value is missing, of the wrong type, or out of range."""


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            raise ConfigError(f"config key '{dotted}' is missing")
        node = node[part]
    return node


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the first bad key (types, choices, ranges, divisibility)."""
    for key, types in REQUIRED.items():
        value = _get(config, key)
        if (isinstance(value, bool) and types is not bool) or not isinstance(value, types):
            names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
            raise ConfigError(f"config key '{key}' must be {names}, got {value!r} ({type(value).__name__})")
    for key, choices in CHOICES.items():
        if _get(config, key) not in choices:
            raise ConfigError(f"config key '{key}' must be one of {choices}, got {_get(config, key)!r}")
    positive = ("rollout.max_new_tokens", "rollout.temperature", "ppo.lr", "ppo.ppo_epochs", "ppo.num_minibatches",
                "train.batch_size", "train.checkpoint_every", "train.max_nonfinite_in_row", "eval.batch_size",
                "eval.max_new_tokens")
    for key in positive:
        if not _get(config, key) > 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {_get(config, key)!r}")
    for key in ("reward.margin", "reward.kl_coef", "model.lora_rank", "train.num_iterations", "rollout.decode_chunk"):
        if _get(config, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {_get(config, key)!r}")
    if not 0 <= config.model.lora_dropout < 1:
        raise ConfigError(f"config key 'model.lora_dropout' must be in [0, 1), got {config.model.lora_dropout!r}")
    if not 0 < config.rollout.top_p <= 1:
        raise ConfigError(f"config key 'rollout.top_p' must be in (0, 1], got {config.rollout.top_p!r}")
    if not 0 <= config.reward.baseline_low_pct < config.reward.baseline_high_pct <= 100:
        raise ConfigError("config keys 'reward.baseline_low_pct' < 'reward.baseline_high_pct' must lie in [0, 100]")
    if "{}" not in config.reward.template:
        raise ConfigError(f"config key 'reward.template' must contain '{{}}', got {config.reward.template!r}")
    if config.train.batch_size % config.ppo.num_minibatches:
        raise ConfigError(f"config key 'train.batch_size' ({config.train.batch_size}) must be divisible by "
                          f"'ppo.num_minibatches' ({config.ppo.num_minibatches})")
    if config.model.lora_rank == 0:
        raise ConfigError("config key 'model.lora_rank' must be > 0: FiSAO trains LoRA adapters only")


def check_section(config, section: str, positive_ints: tuple = (), positive: tuple = (), non_negative: tuple = (),
                  choices: dict | None = None) -> None:
    """Raise ConfigError naming `section.key` when a key is missing, of the wrong type or out of range."""
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
