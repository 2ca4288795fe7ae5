"""What a run builds once: task data, the policy (LoRA + value head) and its verifier on the
mesh, the entity tables and the compiled rollouts."""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fisao_jax import hosts, sharding as sharding_lib
from fisao_jax.config_checks import ConfigError
from fisao_jax.models import hf_io
from fisao_jax.models.configs import LoRAConfig
from fisao_jax.models.vlm import VisionLanguageModel
from fisao_jax.placement import Layout
from fisao_jax.rewards import verifier as verifier_lib
from fisao_jax.rewards.spans import build_span_table
from fisao_jax.rollout import SamplingConfig, make_rollout
from fisao_jax.scoring import ScoreSettings
from fisao_jax.tasks import build_task


@dataclasses.dataclass
class Setup:
    """Everything built once per run (models, params, tables, compiled functions)."""

    task: Any
    module: VisionLanguageModel
    params: Any                   # policy params (frozen + LoRA + value head) on the mesh
    param_shardings: Any
    layout: Layout
    verifier: verifier_lib.Verifier
    vstate: verifier_lib.VerifierState
    rollout_fn: Callable          # sampling with config.rollout
    greedy_fn: Callable           # greedy decoding with config.eval.max_new_tokens
    score_settings: ScoreSettings

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """The batch entries the policy reads: prompt ids, mask and its image inputs."""
        return ("input_ids", "attention_mask") + tuple(self.module.image_input_keys)

    def put_batch(self, batch: dict, extra: tuple[str, ...] = ()) -> dict:
        """The policy's batch entries (and `extra` ones) on the mesh, rows over the batch axes."""
        return self.layout.put_batch(batch, self.batch_keys + tuple(extra))


def sampling_configs(config: ml_collections.ConfigDict, task) -> tuple[SamplingConfig, SamplingConfig]:
    """(training rollout, greedy evaluation) decoding settings."""
    r = config.rollout
    common = dict(eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id, decode_chunk=r.decode_chunk)
    return (SamplingConfig(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                           **common),
            SamplingConfig(max_new_tokens=config.eval.max_new_tokens, greedy=True, **common))


def score_settings(config: ml_collections.ConfigDict) -> ScoreSettings:
    return ScoreSettings(kind=config.reward.kind, kl_coef=config.reward.kl_coef, gamma=config.ppo.gamma,
                         lam=config.ppo.lam, whiten_advantages=config.ppo.whiten_advantages,
                         temperature=config.rollout.temperature, num_minibatches=config.ppo.num_minibatches)


def check_verifier_encoder(module, params, verifier_module, verifier_params, own: bool, tolerance: float) -> str:
    """Compare the verifier's vision weights with the policy's (SPEC: the verifier is the
    policy's own encoder). Returns a one-line report; ConfigError when `own` and they differ
    by more than `tolerance` (largest |difference| / largest |weight| of a tensor)."""
    a = hf_io.flatten(params[module.vision_param_key])
    b = hf_io.flatten(verifier_params[getattr(verifier_module, "vision_param_key", "vision_model")])
    common = [k for k in a if k in b and a[k].shape == b[k].shape]
    if not common:
        report = "verifier: shares no vision tensor with the policy"
        worst = float("inf")
    else:
        def rel(k):
            x, y = np.asarray(a[k], np.float32), np.asarray(b[k], np.float32)
            return float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-12))
        diffs = {k: rel(k) for k in common}
        key = max(diffs, key=diffs.get)
        worst = diffs[key]
        report = (f"verifier: vision encoder vs the policy's over {len(common)} of {len(a)} tensors: largest relative "
                  f"difference {worst:.2e} ({'/'.join(key)})")
    if own and not worst <= tolerance:
        raise ConfigError(f"{report}; the config says the verifier is the policy's own encoder "
                          f"(reward.verifier_is_policy_encoder=True, tolerance {tolerance}). Point model.verifier at "
                          f"the checkpoint the policy's vision tower came from, or set "
                          f"reward.verifier_is_policy_encoder=False for a separate verifier.")
    return report


def build_setup(config: ml_collections.ConfigDict, workdir: pathlib.Path, report=logging.info) -> Setup:
    """Task data, policy and verifier on the mesh, entity tables, compiled rollouts."""
    task = build_task(config, workdir)
    dtype = jnp.dtype(config.model.dtype)
    lora = LoRAConfig(rank=config.model.lora_rank, alpha=config.model.lora_alpha, dropout=config.model.lora_dropout)
    module, params = hf_io.from_hf(task.policy_dir, dtype=dtype, lora=lora, remat=config.model.remat,
                                   lora_key=jax.random.PRNGKey(config.seed + 1))
    vmodule, vparams = hf_io.from_hf(task.verifier_dir, dtype=dtype)
    report(check_verifier_encoder(module, params, vmodule, vparams, config.reward.verifier_is_policy_encoder,
                                  config.reward.verifier_encoder_tolerance))
    if hosts.describe():
        report(hosts.describe())
    layout = Layout(sharding_lib.make_mesh(dict(config.mesh)))
    param_shardings = layout.params(params, sharding_lib.rules_for(module.cfg))
    params = layout.place(params, param_shardings)
    vparams = layout.place(vparams, layout.params(vparams, sharding_lib.rules_for(vmodule.cfg)))

    vocab = task.entity_vocab
    verifier = verifier_lib.Verifier(vmodule, task.verifier_tokenizer, config.reward.template, task.eos_token_id)
    table = verifier.entity_table(vparams, vocab.surface_forms,  # cached by process 0, computed by each
                                  cache_dir=workdir / "cache" if hosts.is_primary() else None,
                                  checkpoint_id=verifier_lib.checkpoint_id(task.verifier_dir))
    vstate = verifier_lib.VerifierState(vparams, layout.put_replicated(table),
                                        layout.put_replicated(build_span_table(task.tokenizer, vocab)))
    sample, greedy = sampling_configs(config, task)
    return Setup(task, module, params, param_shardings, layout, verifier, vstate,
                 make_rollout(module, sample, layout, param_shardings),
                 make_rollout(module, greedy, layout, param_shardings), score_settings(config))
