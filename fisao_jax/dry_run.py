"""`--dry_run`: build the configured model abstractly (no weights), trace the rollout and the
PPO update with `jax.eval_shape` at full shapes, and print per-device memory for the mesh."""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp

from fisao_jax import ppo
from fisao_jax.models import configs as C
from fisao_jax.models import config_io
from fisao_jax.models.hf_io import CONVERTED_CONFIG, abstract_params, build_module, read_hf_config
from fisao_jax.params import split_params
from fisao_jax.rollout import SamplingConfig, make_rollout
from fisao_jax.scoring import make_policy_fn
from fisao_jax.sharding import partition_specs, rules_for
from fisao_jax.train_state import TrainState
from fisao_jax.update import make_optimizer


def model_config(config) -> C.LlavaConfig:
    """The policy's config from its folder, or LLaVA-1.5-7B's when the folder is not there yet."""
    lora = C.LoRAConfig(config.model.lora_rank, config.model.lora_alpha, config.model.lora_dropout)
    folder = pathlib.Path(config.model.policy) if config.model.policy else None
    if folder is not None and (folder / CONVERTED_CONFIG).exists():
        cfg = config_io.from_dict(json.loads((folder / CONVERTED_CONFIG).read_text())["config"])
    elif folder is not None and (folder / "config.json").exists():
        cfg = read_hf_config(folder)[1]
    else:
        print(f"(no checkpoint at {config.model.policy!r}: using the LLaVA-1.5-7B shapes)")
        cfg = C.llava_1_5_7b()
    return dataclasses.replace(cfg, lora=lora)


def mesh_shape(config, num_devices: int) -> dict[str, int]:
    axes = {k: int(v) for k, v in dict(config.mesh).items() if k != "devices"}
    num_devices = int(dict(config.mesh).get("devices", 0) or num_devices)
    known = math.prod(v for v in axes.values() if v != -1)
    return {k: (num_devices // known if v == -1 else v) for k, v in axes.items()}


def _bytes_per_device(tree, specs, mesh: dict[str, int]) -> int:
    total = 0
    for leaf, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
        shards = math.prod(mesh.get(a, 1) for a in spec if a is not None)
        total += math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize // max(shards, 1)
    return total


def dry_run(config, num_devices: int | None = None) -> dict:
    """Trace everything at full size; returns and prints the shapes and the memory table."""
    cfg = model_config(config)
    dtype = jnp.dtype(config.model.dtype)
    module = build_module(cfg, dtype=dtype, param_dtype=dtype, remat=config.model.remat)
    params = abstract_params(cfg, dtype)
    b, t, n = config.train.batch_size, config.data.max_prompt_len, config.rollout.max_new_tokens
    v = cfg.vision
    sds = jax.ShapeDtypeStruct
    ids, mask = sds((b, t), jnp.int32), sds((b, t), jnp.int32)
    pixels = sds((b, 3, v.image_size, v.image_size), jnp.float32)
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    roll_fn = make_rollout(module, SamplingConfig(max_new_tokens=n, eos_token_id=cfg.text.eos_token_id))
    prompts = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    roll = jax.eval_shape(roll_fn.jitted, params, prompts, key)

    p = config.ppo
    optimizer = make_optimizer(p.lr, weight_decay=p.weight_decay, max_grad_norm=p.max_grad_norm)
    trainable_shapes, frozen_shapes = split_params(params)
    state = jax.eval_shape(lambda tr: TrainState(tr, optimizer.init(tr), jnp.zeros((), jnp.int32)), trainable_shapes)
    update = ppo.make_ppo_update(make_policy_fn(module), optimizer, ppo_epochs=p.ppo_epochs,
                                 num_minibatches=p.num_minibatches, clip_eps=p.clip_eps,
                                 clip_eps_value=p.clip_eps_value, vf_coef=p.vf_coef, ent_coef=p.ent_coef)
    per_tok = sds((b, n), jnp.float32)
    batch = {**prompts, "tokens": roll.tokens, "mask": roll.mask, "old_logp": per_tok, "old_values": per_tok,
             "advantages": per_tok, "returns": per_tok}
    new_state, metrics = jax.eval_shape(update, state, frozen_shapes, batch, key)

    devices = num_devices or jax.device_count()
    mesh = mesh_shape(config, devices)
    specs = partition_specs(params, rules_for(cfg))
    trainable, frozen = split_params(params)
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
    weights = _bytes_per_device(params, specs, mesh)
    lora_bytes = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(trainable))
    opt_bytes = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(new_state.opt_state))
    batch_shards = mesh.get("data", 1) * mesh.get("fsdp", 1)
    kv = 2 * cfg.text.num_hidden_layers * b * (t + n) * cfg.text.num_key_value_heads * cfg.text.dims_per_head
    kv_bytes = kv * dtype.itemsize // max(batch_shards, 1) // max(mesh.get("tensor", 1), 1)
    rows = {"mesh": mesh, "devices": devices,
            "params_total": count(params), "params_trainable": count(trainable),
            "rollout_tokens": list(roll.tokens.shape), "update_metrics": sorted(metrics),
            "GiB_per_device": {"weights (sharded)": weights / 2**30,
                               "trainable (replicated upper bound)": lora_bytes / 2**30,
                               "optimizer (replicated upper bound)": opt_bytes / 2**30,
                               "kv cache": kv_bytes / 2**30}}
    rows["GiB_per_device"]["total (before activations)"] = sum(rows["GiB_per_device"].values())
    print(f"model: {count(params) / 1e9:.3f}B parameters, {count(trainable) / 1e6:.1f}M trainable "
          f"(LoRA r={cfg.lora.rank} + value head)")
    print(f"rollout: tokens {tuple(roll.tokens.shape)}, logprobs {tuple(roll.logprobs.shape)}; "
          f"update traced with {len(metrics)} metrics")
    print(f"mesh {mesh} over {devices} device(s); per-device memory:")
    for k, val in rows["GiB_per_device"].items():
        print(f"  {k:<36}{val:8.2f} GiB")
    return rows
