"""The training job compiled for a TPU topology without a TPU: per-device FLOPs and memory.

With libtpu installed (`pip install "jax[tpu]==<jax version>"`) and `JAX_PLATFORMS=cpu`,
`jax.experimental.topologies` describes the devices of a TPU slice and the real TPU compiler
compiles for them. `compile_job(config, target)` builds the job abstractly (no weights: every
argument is a `jax.ShapeDtypeStruct` with the sharding a run gives it) and compiles the three
programs of a FiSAO iteration with the trainer's own builders:

  rollout   prefill + KV-cache decode loops (`fisao_jax.rollout.make_rollout`)
  scoring   teacher-forced policy and reference passes, spans, verifier, rewards, GAE
  update    ppo_epochs x minibatches of PPO (`fisao_jax.methods.fisao.make_steps`)

For each it reports the compiler's per-device FLOPs and bytes, and the same for an *ideal*:
the phase's work compiled batch-sharded with no loop (a while/scan body counts once in the
cost analysis, so the rollout's ideal is the prefill plus one decode step per loop, the
update's is `value_and_grad` of one minibatch's loss). FLOP efficiency = ideal / compiled.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp

from fisao_jax import ppo, sharding as sharding_lib
from fisao_jax.dry_run import model_config
from fisao_jax.methods import fisao
from fisao_jax.models import configs as C
from fisao_jax.models.hf_io import abstract_params, build_module
from fisao_jax.params import merge_params, split_params
from fisao_jax.placement import Layout
from fisao_jax.policy import image_features, response_logprobs
from fisao_jax.rewards.entities import load_entity_vocab
from fisao_jax.rewards.reward import RewardParams
from fisao_jax.rewards.spans import SpanTable
from fisao_jax.rewards.verifier import Verifier, VerifierState
from fisao_jax.rollout import decode, make_rollout
from fisao_jax.run.setup import sampling_configs, score_settings
from fisao_jax.scoring import make_policy_fn
from fisao_jax.sharding import kv_cache_sharding


@dataclasses.dataclass(frozen=True)
class Target:
    """A TPU slice: its topology and, per device (a core of v2/v3, a chip otherwise), HBM and bf16 peak."""

    name: str
    topology: str
    chips_per_host: tuple[int, int, int]
    hbm_gib: float
    peak_tflops: float
    hosts: int = 1


TARGETS = {t.name: t for t in (
    Target("v2-8", "v2:2x2", (2, 2, 1), 8.0, 22.5),
    Target("v3-8", "v3:2x2", (2, 2, 1), 16.0, 61.5),
    Target("v4-8", "v4:2x2x1", (2, 2, 1), 32.0, 275.0),
    Target("v5p-8", "v5p:2x2x1", (2, 2, 1), 95.0, 459.0),
    Target("v5e-8", "v5e:2x4", (2, 4, 1), 16.0, 197.0),
    Target("v6e-8", "v6e:2x4", (2, 4, 1), 32.0, 918.0),
    Target("v5e-16", "v5e:4x4", (2, 2, 1), 16.0, 197.0, hosts=4),
    Target("v5e-1", "v5e:1x1", (1, 1, 1), 16.0, 197.0),
    Target("v6e-1", "v6e:1x1", (1, 1, 1), 32.0, 918.0),
)}
USABLE_HBM = 0.98  # of a device's HBM left for programs (the runtime keeps a little)


def target_devices(target: Target) -> list:
    """The TPU devices of `target` (abstract: for compiling only). Needs libtpu."""
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu's lock
    topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology, chip_config_name="default",
                                        chips_per_host_bounds=target.chips_per_host, num_slices=1,
                                        wrap=(False, False, False))
    return list(topo.devices)


def libtpu_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("libtpu") is not None


@dataclasses.dataclass
class Phase:
    """Per-device numbers of one compiled program and of its ideal (bytes, FLOPs, seconds)."""

    name: str
    flops_per_device: float
    ideal_flops_per_device: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    ideal_temp_bytes: int
    compile_seconds: float
    hbm_bytes: int
    decode_step_flops: float = 0.0  # rollout: one decode step of the ideal (the loops run many)

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs not written in place of an argument + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def efficiency(self) -> float:
        return self.ideal_flops_per_device / self.flops_per_device if self.flops_per_device else float("nan")

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= USABLE_HBM * self.hbm_bytes

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes, "efficiency": self.efficiency,
                "fits": self.fits}


def _sds(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _measure(lowered) -> tuple[float, Any, float]:
    t0 = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan"))), compiled.memory_analysis(), seconds


@dataclasses.dataclass
class Job:
    """Everything abstract a compile needs: models, layout, abstract arguments with shardings."""

    config: Any
    module: Any
    verifier: Verifier
    layout: Layout
    params: Any          # merged policy params (ShapeDtypeStructs with shardings)
    vstate: Any
    state: Any           # FisaoState
    frozen: Any
    prompt_len: int


def build_job(config, devices: list, layers: Optional[int] = None, vision_layers: Optional[int] = None) -> Job:
    """The job of `config` on `devices` with abstract arguments (the policy's decoder cut to
    `layers` layers, its vision tower to `vision_layers`, when given: same widths, shorter
    compiles)."""
    cfg = model_config(config)
    if layers:
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=int(layers)))
    if vision_layers:
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, num_hidden_layers=int(vision_layers)))
    dtype = jnp.dtype(config.model.dtype)
    module = build_module(cfg, dtype=dtype, param_dtype=dtype, remat=config.model.remat)
    # frozen weights in the model dtype, adapters (and the value head) in float32, as from_hf loads them
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.ShapeDtypeStruct(x.shape, jnp.float32 if str(p[-1].key).startswith("lora_") else x.dtype),
        abstract_params(cfg, dtype))
    mesh_axes = {k: v for k, v in dict(config.mesh).items() if k != "devices"}
    layout = Layout(sharding_lib.make_mesh(mesh_axes, devices=devices))
    params = _sds(params, layout.params(params, sharding_lib.rules_for(cfg)))

    clip_cfg = C.clip_vit_large_patch14_336()
    clip_cfg = dataclasses.replace(clip_cfg, vision=cfg.vision)  # the verifier's tower is the policy's
    vmodule = build_module(clip_cfg, dtype=dtype, param_dtype=dtype)
    vparams = abstract_params(clip_cfg, dtype)
    vparams = _sds(vparams, layout.params(vparams, sharding_lib.CLIP_RULES))
    num_forms, vocab = len(load_entity_vocab().surface_forms), cfg.text.vocab_size
    u32, i32 = jnp.uint32, jnp.int32
    spans = SpanTable(*(jax.ShapeDtypeStruct(shape, dt, sharding=layout.replicated) for shape, dt in (
        ((vocab, 2), u32), ((vocab, 2), u32), ((vocab,), i32), ((vocab, 2), u32), ((vocab,), i32),
        ((vocab,), bool), ((vocab,), bool), ((vocab,), bool), ((vocab,), bool), ((vocab,), bool),
        ((num_forms, 2), u32), ((num_forms,), i32), ((num_forms,), i32))), max_entity_tokens=8)
    table = jax.ShapeDtypeStruct((num_forms, clip_cfg.projection_dim), jnp.float32, sharding=layout.replicated)
    vstate = VerifierState(vparams, table, spans)
    verifier = Verifier(vmodule, tokenizer=None, template=config.reward.template, eos_token_id=cfg.text.eos_token_id)

    trainable, frozen = split_params(params)
    optimizer = fisao.make_optimizer_for(config)
    opt = jax.eval_shape(optimizer.init, trainable)
    opt = _sds(opt, layout.opt_state(optimizer, opt, jax.tree.map(lambda x: x.sharding, trainable)))
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=layout.replicated)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=layout.replicated)
    state = fisao.FisaoState(trainable=trainable, opt_state=opt, step=scalar, iteration=scalar, data_position=scalar,
                             rng=key, nonfinite_total=scalar, nonfinite_streak=scalar)
    return Job(config, module, verifier, layout, params, vstate, state, frozen, config.data.max_prompt_len)


def _batch(job: Job, rows: int, new: Optional[int] = None) -> dict:
    cfg, b = job.module.cfg, job.layout.batch
    v = cfg.vision
    out = {"input_ids": jax.ShapeDtypeStruct((rows, job.prompt_len), jnp.int32, sharding=b),
           "attention_mask": jax.ShapeDtypeStruct((rows, job.prompt_len), jnp.int32, sharding=b),
           "pixel_values": jax.ShapeDtypeStruct((rows, v.num_channels, v.image_size, v.image_size), jnp.float32,
                                                sharding=b)}
    if new:
        f32 = lambda: jax.ShapeDtypeStruct((rows, new), jnp.float32, sharding=b)  # noqa: E731
        out.update(tokens=jax.ShapeDtypeStruct((rows, new), jnp.int32, sharding=b),
                   mask=jax.ShapeDtypeStruct((rows, new), jnp.int32, sharding=b),
                   old_logp=f32(), old_values=f32(), advantages=f32(), returns=f32())
    return out


def _phase(name, job, hbm, lowered, ideal_lowered, extra_ideal=()) -> Phase:
    flops, mem, seconds = _measure(lowered)
    ideal_flops, ideal_mem, _ = _measure(ideal_lowered)
    ideal_temp = ideal_mem.temp_size_in_bytes
    for lw, times in extra_ideal:
        f, m, _ = _measure(lw)
        ideal_flops += times * f
        ideal_temp = max(ideal_temp, m.temp_size_in_bytes)
    return Phase(name, flops, ideal_flops, mem.argument_size_in_bytes, mem.output_size_in_bytes,
                 mem.alias_size_in_bytes, mem.temp_size_in_bytes, ideal_temp, seconds, hbm)


def compile_rollout(job: Job, hbm: int) -> Phase:
    config, module, layout = job.config, job.module, job.layout
    b = config.train.batch_size
    sample, _ = sampling_configs(config, _Task(module.cfg))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=layout.replicated)
    shardings = jax.tree.map(lambda x: x.sharding, job.params)
    roll = make_rollout(module, sample, layout, shardings)
    batch = _batch(job, b)
    n, t = sample.max_new_tokens, job.prompt_len
    loops = len(range(0, n, sample.decode_chunk)) if sample.decode_chunk else 1
    cache = kv_cache_sharding(layout.mesh, module.cfg.text.num_key_value_heads)

    def prefill(params, batch):  # the whole cache, as the last decode loop has it
        feats = image_features(module, params, batch)
        return decode(module, sample, params, batch["input_ids"], batch["attention_mask"], feats,
                      jax.random.PRNGKey(0), max_tokens=1, cache_sharding=cache)

    def step(params, token, pos, cache_k, cache_v, key_mask):
        kv = {"k": cache_k, "v": cache_v, "index": jnp.zeros((), jnp.int32) + t}
        out = module.apply({"params": params}, token[:, None], None, jnp.ones((b, 1), jnp.int32), pos[:, None], kv,
                           key_mask, method=module.forward)
        return out["logits"][:, -1].argmax(-1), out["cache"]

    text = module.cfg.text
    kv_shape = (b, text.num_key_value_heads, t + n, text.dims_per_head)
    kv_sds = tuple(jax.ShapeDtypeStruct(kv_shape, module.dtype, sharding=cache) for _ in range(text.num_hidden_layers))
    row = lambda dt, *s: jax.ShapeDtypeStruct((b, *s), dt, sharding=layout.batch)  # noqa: E731
    ideal_prefill = layout.jit(prefill, in_shardings=(shardings, layout.batch)).lower(job.params, batch)
    ideal_step = layout.jit(step).lower(job.params, row(jnp.int32), row(jnp.int32), kv_sds, kv_sds,
                                        row(jnp.int32, t + n))
    phase = _phase("rollout", job, hbm, roll.jitted.lower(job.params, batch, key), ideal_prefill,
                   [(ideal_step, loops)])
    phase.decode_step_flops = _measure(ideal_step)[0]
    return phase


def compile_scoring(job: Job, hbm: int) -> Phase:
    config, module, layout = job.config, job.module, job.layout
    b, n, m = config.train.batch_size, config.rollout.max_new_tokens, config.ppo.num_minibatches
    settings = score_settings(config)
    steps = _steps(job, settings)
    row = lambda dt, rows=b: jax.ShapeDtypeStruct((rows, n), dt, sharding=layout.batch)  # noqa: E731
    r = jax.ShapeDtypeStruct((), jnp.float32, sharding=layout.replicated)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=layout.replicated)
    sentence = jax.ShapeDtypeStruct((b,), jnp.float32, sharding=layout.batch)
    lowered = steps.score.lower(job.params, job.vstate, RewardParams(r, r, r, r, r), _batch(job, b), row(jnp.int32),
                                row(jnp.int32), key, sentence)
    policy_fn = make_policy_fn(module, settings.temperature)

    def ideal(params, vstate, mb, pixels):  # the passes over one minibatch (the loop body), the verifier over all
        pol = policy_fn(params, mb)
        ref = response_logprobs(module, params, mb, mb["tokens"], mb["mask"], use_lora=False)
        return pol["logp"], pol["values"], ref["logprobs"], job.verifier.image_embeddings(vstate.params, pixels)

    mb = dict(_batch(job, b // m), tokens=row(jnp.int32, b // m), mask=row(jnp.int32, b // m))
    ideal_lowered = layout.jit(ideal, out_shardings=layout.batch).lower(job.params, job.vstate, mb,
                                                                        _batch(job, b)["pixel_values"])
    return _phase("scoring", job, hbm, lowered, ideal_lowered)


def _steps(job: Job, settings) -> "fisao.Steps":
    return fisao.make_steps(job.module, job.verifier, settings, job.layout, job.config, _shardings(job.params),
                            _shardings(job.vstate), _shardings(job.state), _shardings(job.frozen))


def compile_update(job: Job, hbm: int) -> Phase:
    config, module, layout = job.config, job.module, job.layout
    p = config.ppo
    b, n = config.train.batch_size, config.rollout.max_new_tokens
    settings = score_settings(config)
    steps = _steps(job, settings)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=layout.replicated)
    lowered = steps.update.lower(job.state, job.frozen, _batch(job, b, n), key)

    loss_fn = ppo.ppo_loss_fn(make_policy_fn(module, settings.temperature), clip_eps=p.clip_eps,
                              clip_eps_value=p.clip_eps_value, vf_coef=p.vf_coef, ent_coef=p.ent_coef)
    grad = jax.value_and_grad(lambda tr, fz, mb: loss_fn(merge_params(tr, fz), mb), has_aux=True)
    trainable_shardings = _shardings(job.state.trainable)
    ideal_lowered = layout.jit(grad, out_shardings=((layout.replicated, layout.replicated), trainable_shardings)).lower(
        job.state.trainable, job.frozen, _batch(job, b // p.num_minibatches, n))
    return _phase("update", job, hbm, lowered, ideal_lowered)


def _shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


class _Task:
    """What `sampling_configs` reads from a task: the special token ids."""

    def __init__(self, cfg):
        self.eos_token_id, self.pad_token_id = cfg.text.eos_token_id, cfg.text.pad_token_id or 0


PHASES = ("rollout", "scoring", "update")


def compile_job(config, target: Target, layers: Optional[int] = None, vision_layers: Optional[int] = None,
                phases=PHASES, devices: Optional[list] = None, progress=None) -> list[Phase]:
    """Compile the job's phases for `target` (see the module docstring); `progress(name)` is
    called before each phase."""
    job = build_job(config, devices or target_devices(target), layers, vision_layers)
    hbm = int(target.hbm_gib * 2**30)
    fns = {"rollout": compile_rollout, "scoring": compile_scoring, "update": compile_update}
    out = []
    for name in phases:
        if name not in fns:
            raise ValueError(f"unknown phase {name!r}; phases are {PHASES}")
        if progress is not None:
            progress(name)
        out.append(fns[name](job, hbm))
    return out


def step_seconds_lower_bound(phases: list[Phase], target: Target, config) -> float:
    """Seconds per iteration at the chip's bf16 peak, from the ideal FLOPs: rollout (prefill +
    every decode step), scoring, ppo_epochs x minibatches of the update."""
    by = {p.name: p for p in phases}
    total = 0.0
    if "rollout" in by:  # the prefill + one step per loop, plus the other decode steps
        r = by["rollout"]
        loops = -(-config.rollout.max_new_tokens // config.rollout.decode_chunk) if config.rollout.decode_chunk else 1
        total += r.ideal_flops_per_device + (config.rollout.max_new_tokens - 1 - loops) * r.decode_step_flops
    if "scoring" in by:
        total += by["scoring"].ideal_flops_per_device
    if "update" in by:
        total += by["update"].ideal_flops_per_device * config.ppo.ppo_epochs * config.ppo.num_minibatches
    return total / (target.peak_tflops * 1e12)
