"""Every `config.ppo` and `config.reward` field reaches the computation it configures.

The steps are built as the FiSAO trainer builds them, from a `config_base.base_config()`:
`methods.fisao.make_steps` (scoring step and PPO update, with `make_optimizer` inside) on a
`run.setup.Setup` whose score settings come from `run.setup.score_settings(config)`, the
train state from `methods.fisao.initial_state`, the reward parameters from
`MethodRun.reward_params` and the baseline from `run.frame.calibrate`. Changing one field
must change the result it belongs to: the scoring outputs, the trainable parameters after
one PPO update, or the baseline scores. A field dropped anywhere on the way from the config
would leave the result as it was, and the test fails.

The policy is a tiny LLaVA (non-zero LoRA, so that the KL term is not zero), the verifier
a tiny random CLIP with a random entity text table, the batch 4 fixed responses that mention
entities (every mention gets a non-zero reward under the chosen baseline).
"""
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fisao_jax.config_base import base_config
from fisao_jax.data.tokenizer import train_tokenizer
from fisao_jax.methods import fisao
from fisao_jax.models import configs as C
from fisao_jax.models import hf_io
from fisao_jax.models.llava import LlavaModel
from fisao_jax.params import split_params
from fisao_jax.placement import single_device_layout
from fisao_jax.rewards import verifier as verifier_lib
from fisao_jax.rewards.baseline import BaselineScores
from fisao_jax.rewards.entities_build import vocab_from_names
from fisao_jax.rewards.spans import build_span_table
from fisao_jax.run import frame
from fisao_jax.run.setup import Setup, score_settings

TEXTS = ["a dog and a hot dog.", "a kite and two cups on a table.", "a cat sat with a fork."] * 20
RESPONSES = ["a dog and a kite.", "two cups and a fork.", "a hot dog", "a cat."]
N = 8

# (section, field, changed value). The base values are base_config()'s, except a larger
# learning rate (below) so that one update moves the policy far enough for the clipping
# ranges to bind.
PPO_FIELDS = [("ppo", "clip_eps", 1e-3), ("ppo", "clip_eps_value", 1e-3), ("ppo", "vf_coef", 10.0),
              ("ppo", "ent_coef", 0.5), ("ppo", "lr", 3e-2), ("ppo", "max_grad_norm", 1e-4),
              ("ppo", "weight_decay", 0.5), ("ppo", "ppo_epochs", 1), ("ppo", "num_minibatches", 1)]
SCORE_FIELDS = [("ppo", "gamma", 0.5), ("ppo", "lam", 0.3), ("ppo", "whiten_advantages", False),
                ("reward", "kind", "none"), ("reward", "kind", "sentence"), ("reward", "kl_coef", 0.5),
                ("reward", "margin", 3.0), ("rollout", "temperature", 0.7)]
BASELINE_FIELDS = [("reward", "baseline_low_pct", 5.0), ("reward", "baseline_high_pct", 90.0)]


def make_config(section=None, field=None, value=None):
    config = base_config()
    config.ppo.lr = 1e-2
    config.train.batch_size = len(RESPONSES)
    if section is not None:
        assert field in config[section], f"config.{section} has no field {field}"
        assert config[section][field] != value
        config[section][field] = value
    return config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reach")
    tok = train_tokenizer(TEXTS, root / "tok", vocab_size=320)
    vocab = vocab_from_names(["dog", "hot dog", "kite", "cup", "fork", "cat"])
    cfg = C.LlavaConfig(
        vision=C.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=28, patch_size=14),
        text=C.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64),
        lora=C.LoRAConfig(rank=4, alpha=8.0), image_token_id=len(tok))
    model = LlavaModel(cfg)
    params = hf_io.init_params(cfg, jax.random.PRNGKey(0))
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 100))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.3 * jax.random.normal(next(keys), x.shape)
        if str(getattr(p[-1], "key", p[-1])) == "lora_b" or str(getattr(p[0], "key", p[0])) == "value_head" else x,
        params)
    clip_cfg = C.CLIPConfig(
        vision=C.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=28, patch_size=14),
        text=C.CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, max_position_embeddings=16, eos_token_id=tok.eos_token_id),
        projection_dim=8)
    clip_module = hf_io.build_module(clip_cfg)
    clip_params = hf_io.init_params(clip_cfg, jax.random.PRNGKey(2))
    rng = np.random.RandomState(0)
    table = rng.randn(len(vocab), 8)
    table /= np.linalg.norm(table, axis=-1, keepdims=True)
    vstate = verifier_lib.VerifierState(clip_params, jnp.asarray(table, jnp.float32), build_span_table(tok, vocab))
    verifier = verifier_lib.Verifier(clip_module, tok, eos_token_id=tok.eos_token_id)

    b = len(RESPONSES)
    img = [cfg.image_token_id] * cfg.num_image_tokens
    t = len(img) + 3
    ids, pmask = np.full((b, t), tok.pad_token_id, np.int32), np.zeros((b, t), np.int32)
    for i in range(b):
        row = [tok.bos_token_id] + img + list(rng.randint(3, 300, 1 + i % 2))
        ids[i, t - len(row):], pmask[i, t - len(row):] = row, 1
    tokens, mask = np.full((b, N), tok.pad_token_id, np.int32), np.zeros((b, N), np.int32)
    for i, text in enumerate(RESPONSES):
        r = tok(text, add_special_tokens=False)["input_ids"][:N - 1] + [tok.eos_token_id]
        tokens[i, :len(r)], mask[i, :len(r)] = r, 1
    batch = {"input_ids": ids, "attention_mask": pmask, "pixel_values": rng.randn(b, 3, 28, 28).astype(np.float32)}
    layout = single_device_layout()
    return types.SimpleNamespace(model=model, params=params, verifier=verifier, vstate=vstate, layout=layout,
                                 batch=batch, tokens=tokens, mask=mask,
                                 sentence_scores=np.array([12.0, -7.0, 3.0, -20.0], np.float32),
                                 # every mention scores >= s_c or <= s_h: a non-zero reward
                                 baseline=BaselineScores(s_c=0.0, s_h=0.0, s_min=-60.0, s_max=60.0))


def setup_for(world, config) -> Setup:
    """The run's Setup with what the steps read (no task, no compiled rollouts). The params are
    a copy: the update donates the train state, whose trainable leaves are the setup's own
    arrays)."""
    layout = world.layout
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), world.params)
    return Setup(task=None, module=world.model, params=layout.put_replicated(params),
                 param_shardings=layout.replicated, layout=layout, verifier=world.verifier,
                 vstate=layout.put_replicated(world.vstate), rollout_fn=None, greedy_fn=None,
                 score_settings=score_settings(config))


def make_steps(setup, config):
    """`fisao.make_steps` as the trainer calls it, everything on the one-device layout."""
    r = setup.layout.replicated
    return fisao.make_steps(setup.module, setup.verifier, setup.score_settings, setup.layout, config, r, r, r, r)


def build(world, config):
    """(setup, steps) as the trainer builds them for `config`."""
    setup = setup_for(world, config)
    return setup, make_steps(setup, config)


def run_scoring(world, config, built=None) -> dict:
    setup, steps = built or build(world, config)
    run = frame.MethodRun(method="fisao", config=config, workdir=None, setup=setup, baseline=world.baseline,
                          before=None, ckpt=None, latest=None, started=0.0)
    dev = setup.put_batch(world.batch)
    put = lambda x: jax.device_put(x, setup.layout.batch)  # noqa: E731
    sentence = put(world.sentence_scores) if config.reward.kind == "sentence" else None
    out = steps.score(setup.params, setup.vstate, run.reward_params, dev, put(world.tokens), put(world.mask),
                      jax.random.PRNGKey(0), sentence)
    return jax.device_get(out)


def run_update(world, config, scored, steps=None) -> dict:
    """The trainable parameters after one PPO update of a fresh state on the scored batch
    (a fresh setup each time: the update donates the state, made of the setup's arrays)."""
    setup = setup_for(world, config)
    steps = steps or make_steps(setup, config)
    state, frozen = fisao.initial_state(setup, config, steps.optimizer)
    dev = setup.put_batch(world.batch)
    put = lambda x: jax.device_put(jnp.asarray(x), setup.layout.batch)  # noqa: E731
    ppo_batch = dict(dev, tokens=put(world.tokens), mask=put(world.mask),
                     **{k: put(scored[k]) for k in ("old_logp", "old_values", "advantages", "returns")})
    new_state, metrics = steps.update(state, frozen, ppo_batch, jax.random.PRNGKey(3))
    assert bool(metrics["finite"])
    return jax.device_get(new_state.trainable)


@pytest.fixture(scope="module")
def base_steps(world):
    return build(world, make_config())


@pytest.fixture(scope="module")
def base_scoring(world, base_steps):
    return run_scoring(world, make_config(), base_steps)


@pytest.fixture(scope="module")
def base_update(world, base_steps, base_scoring):
    return run_update(world, make_config(), base_scoring, base_steps[1])


def max_difference(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_the_base_scoring_is_deterministic_and_non_trivial(world, base_steps, base_scoring):
    """A rerun gives identical outputs, so any difference below comes from the changed field;
    and the base batch exercises what the fields act on."""
    assert max_difference(run_scoring(world, make_config(), base_steps), base_scoring) == 0.0
    spans = base_scoring["entity_ids"] >= 0
    assert spans.sum() >= 5 and (base_scoring["task_rewards"][spans] != 0).all()
    assert np.abs(base_scoring["old_logp"] - base_scoring["ref_logp"]).max() > 1e-2  # a KL penalty


@pytest.mark.slow
def test_the_base_update_is_deterministic(world, base_steps, base_scoring, base_update):
    assert max_difference(run_update(world, make_config(), base_scoring, base_steps[1]), base_update) == 0.0
    assert max_difference(base_update, split_params(world.params)[0]) > 1e-3  # the update moved


@pytest.mark.parametrize("section, field, value", SCORE_FIELDS, ids=lambda x: str(x))
def test_field_changes_the_scoring_outputs(world, base_scoring, section, field, value):
    changed = run_scoring(world, make_config(section, field, value))
    diff = max_difference({k: changed[k] for k in ("rewards", "advantages", "returns")},
                          {k: base_scoring[k] for k in ("rewards", "advantages", "returns")})
    # measured: 0.13 (temperature) to 18 (reward kind)
    assert diff > 1e-4, (section, field, diff)


# one compilation of the update per field (~5-10 s each on 2 cores)
@pytest.mark.slow
@pytest.mark.parametrize("section, field, value", PPO_FIELDS, ids=lambda x: str(x))
def test_field_changes_the_ppo_update(world, base_scoring, base_update, section, field, value):
    changed = run_update(world, make_config(section, field, value), base_scoring)
    diff = max_difference(changed, base_update)
    # measured: 0.005 (clip_eps_value) to 0.19 (lr) in the largest parameter change
    assert diff > 1e-4, (section, field, diff)


@pytest.mark.parametrize("section, field, value", BASELINE_FIELDS, ids=lambda x: str(x))
def test_field_changes_the_baseline(monkeypatch, tmp_path, section, field, value):
    """`run.frame.calibrate` on fixed calibration mentions (the generation is replaced)."""
    rng = np.random.RandomState(0)
    scores = list(rng.normal(10.0, 8.0, 300))
    labels = [bool(x) for x in rng.rand(300) < 0.3]
    monkeypatch.setattr(frame, "generate_on", lambda *a, **k: types.SimpleNamespace(texts=[""] * 100))
    monkeypatch.setattr(frame, "mention_labels", lambda gen, vocab: (scores, labels))
    setup = types.SimpleNamespace(task=types.SimpleNamespace(calibration_batches=lambda n: [], chair_vocab=None),
                                  params=None)

    def calibrated(config, name):
        workdir = pathlib.Path(tmp_path / name)
        workdir.mkdir()
        return frame.calibrate(setup, config, workdir)

    base, changed = calibrated(make_config(), "base"), calibrated(make_config(section, field, value), "changed")
    assert (base.low_pct, base.high_pct) == (1.0, 99.0)
    key = "s_min" if field == "baseline_low_pct" else "s_max"
    assert getattr(changed, key) != getattr(base, key)
    assert (changed.s_c, changed.s_h) == (base.s_c, base.s_h)
