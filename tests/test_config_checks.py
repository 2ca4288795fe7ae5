"""Config validation and the non-finite step guard."""
import subprocess
import sys

import ml_collections
import pytest

from fisao_jax.config_base import base_config
from fisao_jax.config_checks import ConfigError, validate_config
from fisao_jax.config_base import load_config_file
from fisao_jax.run.log import NonFiniteGuard


def test_base_config_is_valid_and_has_the_paper_values():
    c = base_config()
    validate_config(c)
    assert (c.model.lora_rank, c.model.lora_alpha, c.ppo.lr, c.ppo.ppo_epochs, c.ppo.clip_eps, c.reward.margin) == \
        (128, 256.0, 5e-7, 4, 0.2, 10.0)
    assert (c.ppo.gamma, c.ppo.lam, c.reward.baseline_low_pct, c.reward.baseline_high_pct) == (1.0, 0.95, 1.0, 99.0)


@pytest.mark.parametrize("key,value,match", [
    ("reward.kind", "tokens", "'reward.kind' must be one of"),
    ("ppo.lr", 0.0, "'ppo.lr' must be > 0"),
    ("ppo.ppo_epochs", 2.5, "'ppo.ppo_epochs' must be int"),
    ("rollout.top_p", 1.5, "'rollout.top_p' must be in"),
    ("rollout.decode_chunk", -1, "'rollout.decode_chunk' must be >= 0"),
    ("reward.template", "a photo", "'reward.template' must contain"),
    ("train.batch_size", 6, "must be divisible by 'ppo.num_minibatches'"),
    ("model.lora_rank", 0, "'model.lora_rank' must be > 0"),
    ("model.dtype", "float16", "'model.dtype' must be one of"),
])
def test_bad_values_name_the_key(key, value, match):
    # a config file may build its dict by hand, without ml_collections' type safety
    c = ml_collections.ConfigDict(base_config().to_dict(), type_safe=False)
    c.ppo.num_minibatches = 4
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=match):
        validate_config(c)


def test_missing_key_is_named():
    c = base_config()
    del c.ppo["clip_eps"]
    with pytest.raises(ConfigError, match="'ppo.clip_eps' is missing"):
        validate_config(c)


def test_cli_rejects_unknown_and_mistyped_overrides():
    base = [sys.executable, "-m", "fisao_jax.main", "--config=configs/llava7b.py", "--dry_run"]
    root = __import__("pathlib").Path(__file__).parents[1]
    unknown = subprocess.run(base + ["--config.ppo.learning_rate=1e-5"], capture_output=True, text=True, cwd=root)
    assert unknown.returncode != 0 and "learning_rate" in unknown.stderr
    mistyped = subprocess.run(base + ["--config.ppo.ppo_epochs=many"], capture_output=True, text=True, cwd=root)
    assert mistyped.returncode != 0 and "ppo_epochs" in mistyped.stderr


def test_guard_counts_and_stops_after_n_in_a_row():
    g = NonFiniteGuard(max_in_row=3)
    for finite in (True, False, False, True, False, False):
        g.record(finite, 0)
    assert (g.total, g.streak) == (4, 2)
    with pytest.raises(FloatingPointError, match="3 non-finite updates in a row"):
        g.record(False, 7)


@pytest.mark.parametrize("variant,key,value", [("sentence", "reward.kind", "sentence"), ("kl_only", "reward.kind", "none"),
                                               ("margin5", "reward.margin", 5.0), ("margin20", "reward.margin", 20.0),
                                               ("csr", "method", "csr"), ("vigor", "method", "vigor")])
def test_variants_of_tiny_change_one_field(variant, key, value):
    import pathlib
    path = pathlib.Path(__file__).parents[1] / "configs" / "tiny.py"
    base, c = load_config_file(path), load_config_file(path, variant)
    validate_config(c)
    get = lambda cfg: cfg[key.split(".")[0]][key.split(".")[1]] if "." in key else cfg[key]  # noqa: E731
    assert get(c) == value != get(base)
    flat = lambda d: {k: v for k, v in d.items()}  # noqa: E731
    a, b = flat(c.to_dict()), flat(base.to_dict())
    if "." in key:
        a[key.split(".")[0]].pop(key.split(".")[1]), b[key.split(".")[0]].pop(key.split(".")[1])
    else:
        a.pop(key), b.pop(key)
    assert a == b


def test_unknown_variant_is_an_error():
    import pathlib
    with pytest.raises(ValueError, match="unknown variant 'margin7'"):
        load_config_file(pathlib.Path(__file__).parents[1] / "configs" / "tiny.py", "margin7")


def test_method_must_be_registered():
    c = base_config()
    c.method = "rlhf"
    with pytest.raises(ConfigError, match="'method' must be one of \\('fisao', 'csr', 'vigor'\\)"):
        validate_config(c)


def test_fisao_refuses_lora_dropout():
    from fisao_jax.methods import fisao

    c = base_config()
    c.model.lora_dropout = 0.1
    validate_config(c)  # valid for the methods that can use it (CSR's DPO, ViGoR's SFT)
    with pytest.raises(ConfigError, match="'model.lora_dropout' must be 0 for FiSAO"):
        fisao.validate(c)
