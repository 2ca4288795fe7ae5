"""Per-device memory plan for FiSAO training of LLaVA on a device mesh.

Parameter rows are exact: shapes come from `jax.eval_shape` of the model (nothing allocated)
and each array's per-device share from the PartitionSpecs of `fisao_jax.sharding` on a mesh
given as axis sizes: per-device shape = ceil(dim / product of the mesh axes on that dim).
The other rows are estimates from the formulas below. Notation (all per device):
  L layers, D hidden, I MLP width, H / KVH query / key-value heads, Dh head dim, V vocab,
  r LoRA rank, t = mesh 'tensor' size, dp = 'data' x 'fsdp' size, e = bytes of --dtype,
  T prompt tokens (image tokens included), N new tokens, S = T + N,
  b_r = batch / dp (rollout rows), b = batch / (minibatches x dp) (PPO minibatch rows).

  weights          frozen base parameters, sharded, in --dtype
  trainable        LoRA leaves + value head, sharded, in --trainable_dtype (fp32: a 5e-7
                   update vanishes in a bf16 weight)
  gradients        = trainable (live during the update only)
  AdamW moments    2 x trainable elements x bytes(trainable_dtype)
  verifier         CLIP visual projection (Dv x P, --dtype) + entity text table (E x P, fp32)
  FSDP gather      2 x the largest block (one decoder layer, lm_head, embeddings, one vision
                   layer) all-gathered over 'fsdp' (still split over 'tensor'): current + prefetched
  KV cache         2 x L x b_r x S x KVH/t x Dh x e   (heads split only when t divides KVH)
  prefill work     rollout transients: b_r*T*(V/t)*4 (fp32 logits of every prompt position)
                   + b_r*(H/t)*T*S*8 (one layer's fp32 scores and probabilities)
                   + b_r*T*(3D + 3I/t)*e (one layer's projections)
  activations      what the backward pass of one minibatch keeps, over the S tokens. Per decoder
                   layer, the residuals JAX saves without rematerialisation (counted from
                   jax's saved_residuals of our forward; for float32 without remat, XLA:CPU's
                   compiled temp size is 0-15% below this estimate):
                   A = b*S*[D*(6e + 8) + e*((3H + 2*KVH)*Dh + 6*I)/t + 7*r*e] + b*(H/t)*S^2*(9 + e)
                   (two fp32 RMSNorm inputs and ~6 hidden-size tensors; rotated q, k, v, the
                   attention output and a reshaped q; gate, up, sigmoid, silu, product and
                   their kin; the 7 LoRA x@A products; per score two fp32 copies, one in
                   --dtype and the boolean mask). One layer's backward transients:
                   W = b*(H/t)*S^2*8 + b*S*(4*D + 3*I/t)*4.
                   remat='none':  L*A + 2*b*S*D*e
                   remat='layer' (jax.checkpoint per decoder layer, which then saves only its
                   input and the K/V it returns): L*b*S*(D + 2*KVH*Dh/t)*e + A + W + 2*b*S*D*e
                   (not checked against a compiler here: XLA:CPU does not rematerialise)
  logits           3 x b x S_l x V/t x 4 (fp32 logits, log-softmax, their gradient);
                   S_l = S when the LM head runs over every position ('full'), N for 'response'

Phases do not overlap (the KV cache dies with the rollout), so
  persistent = weights + trainable + AdamW moments + verifier
  rollout    = persistent + FSDP gather + KV cache + prefill work
  update     = persistent + FSDP gather + gradients + activations + logits
  peak       = max(rollout, update); it fits when peak <= HBM x (1 - reserve).
Not counted: XLA scratch and fragmentation (the reserve, default 10%), the rollout buffers
(tokens/log-probs/values, a few MB), images, and the forward-only passes for old/reference
log-probs (smaller than the update).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from fisao_jax.models import configs as C
from fisao_jax.models.hf_io import abstract_params
from fisao_jax.sharding import AXES, LLAVA_RULES, partition_specs

GiB = 2**30
_LORA = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One device kind: HBM per JAX device, and the device count of the named slice (0 = any)."""

    name: str
    hbm_bytes: int
    devices: int = 0


# HBM per JAX device. TPU v2/v3 expose each core as a device; v4/v5p chips are one device
# (megacore) each. GPUs: the memory CUDA reports (A100 80GB: 81920 MiB, H100 SXM: 81559 MiB).
ACCELERATORS: dict[str, Accelerator] = {
    "v2-8": Accelerator("TPU v2-8", 8 * GiB, 8),
    "v3-8": Accelerator("TPU v3-8", 16 * GiB, 8),
    "v4-8": Accelerator("TPU v4-8", 32 * GiB, 4),
    "v5e-8": Accelerator("TPU v5e-8", 16 * GiB, 8),
    "v5p-8": Accelerator("TPU v5p-8", 95 * GiB, 4),
    "v6e-8": Accelerator("TPU v6e-8", 32 * GiB, 8),
    "a100-40g": Accelerator("A100 40GB", 40 * GiB),
    "a100-80g": Accelerator("A100 80GB", 80 * GiB),
    "h100-80g": Accelerator("H100 80GB", 81559 * 2**20),
}
_ALIASES = {"v2": "v2-8", "v3": "v3-8", "v4": "v4-8", "v5e": "v5e-8", "v5p": "v5p-8", "v6e": "v6e-8",
            "a100": "a100-80g", "h100": "h100-80g"}


def accelerator(name: str) -> Accelerator:
    """An `Accelerator` by name ('v5e-8', 'v5e', 'a100-80g', 'h100', ...)."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in ACCELERATORS:
        raise ValueError(f"unknown device {name!r}; known: {sorted(ACCELERATORS)} (aliases {sorted(_ALIASES)})")
    return ACCELERATORS[key]


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one PPO iteration processes. `batch` is the global rollout batch."""

    batch: int
    prompt_len: int
    new_tokens: int
    minibatches: int = 1
    dtype: str = "bfloat16"            # frozen weights, activations, KV cache
    trainable_dtype: str = "float32"   # LoRA + value head, their gradients and AdamW moments
    remat: str = "layer"               # 'layer' | 'none'
    logits: str = "full"               # 'full' | 'response'
    num_entities: int = 5700           # verifier text-embedding table rows
    clip_projection_dim: int = 768     # CLIP ViT-L/14-336


class MeshShape:
    """Axis sizes standing in for a `jax.sharding.Mesh` (no devices needed): `.shape[name]`."""

    def __init__(self, axes: Mapping[str, int]):
        bad = {k: v for k, v in axes.items() if int(v) < 1}
        if bad:
            raise ValueError(f"mesh axis sizes must be >= 1, got {bad}")
        self.shape = {k: int(v) for k, v in axes.items()}

    @property
    def size(self) -> int:
        return math.prod(self.shape.values())

    def __repr__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.shape.items())


def parse_mesh(text: str) -> MeshShape:
    """'data=1,fsdp=8,tensor=1' -> MeshShape. Unknown axis names are an error."""
    axes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\w+)\s*=\s*(\d+)", part)
        if not m:
            raise ValueError(f"bad mesh entry {part!r} in {text!r} (expected name=size, e.g. fsdp=8)")
        if m.group(1) not in AXES:
            raise ValueError(f"unknown mesh axis {m.group(1)!r} in {text!r} (axes: {', '.join(AXES)})")
        axes[m.group(1)] = int(m.group(2))
    if not axes:
        raise ValueError(f"empty mesh {text!r}")
    return MeshShape(axes)


def _axis_size(mesh: MeshShape, axis) -> int:
    if axis is None:
        return 1
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape.get(n, 1) for n in names)


def local_shape(shape: Sequence[int], spec: P, mesh: MeshShape) -> tuple[int, ...]:
    """Per-device shape of an array of `shape` sharded by `spec` (missing trailing dims replicated)."""
    axes = tuple(spec) + (None,) * (len(shape) - len(spec))
    return tuple(-(-int(d) // _axis_size(mesh, a)) for d, a in zip(shape, axes))


def _bytes(dtype: str) -> int:
    return np.dtype(jax.numpy.dtype(dtype)).itemsize


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _block(names: tuple[str, ...]) -> tuple[str, ...]:
    """The unit FSDP gathers at once: a decoder/vision layer, else the top module's first child."""
    for i, n in enumerate(names):
        if n.startswith("layers_"):
            return names[: i + 1]
    return names[:2]


@dataclasses.dataclass(frozen=True)
class ParamBytes:
    """Per-device parameter memory."""

    weights: int             # frozen base, in the weight dtype
    trainable: int           # LoRA + value head, in the trainable dtype
    trainable_elements: int  # per device
    lora_elements_total: int  # global LoRA parameter count
    base_elements_total: int  # global frozen parameter count
    gather_block: int        # largest block all-gathered over fsdp, bytes


def param_bytes(cfg: C.LlavaConfig, mesh: MeshShape, dtype: str = "bfloat16", trainable_dtype: str = "float32",
                rules: Sequence = LLAVA_RULES) -> ParamBytes:
    """Per-device bytes of the frozen and trainable parameters of `cfg` (with its LoRA) on `mesh`."""
    shapes = abstract_params(cfg)
    specs = partition_specs(shapes, rules, mesh)
    leaves = jax.tree_util.tree_leaves_with_path(shapes)
    spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
    wb, tb = _bytes(dtype), _bytes(trainable_dtype)
    no_fsdp = MeshShape({k: v for k, v in mesh.shape.items() if k != "fsdp"})
    weights = trainable = trainable_el = lora_total = base_total = 0
    blocks: dict[tuple, int] = {}
    for (path, sds), spec in zip(leaves, spec_leaves):
        names = _path_names(path)
        n_local = math.prod(local_shape(sds.shape, spec, mesh))
        if names[-1] in _LORA or names[0] == "value_head":
            trainable += n_local * tb
            trainable_el += n_local
            lora_total += math.prod(sds.shape) if names[-1] in _LORA else 0
        else:
            weights += n_local * wb
            base_total += math.prod(sds.shape)
            blk = _block(names)
            blocks[blk] = blocks.get(blk, 0) + math.prod(local_shape(sds.shape, spec, no_fsdp)) * wb
    gather = max(blocks.values()) if mesh.shape.get("fsdp", 1) > 1 and blocks else 0
    return ParamBytes(weights, trainable, trainable_el, lora_total, base_total, gather)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes by row, phase totals, and the workload that produced them."""

    rows: dict               # name -> bytes (ordered as printed)
    rollout: int
    update: int
    peak: int
    rollout_rows_per_device: int
    minibatch_rows_per_device: int
    params: ParamBytes
    mesh: MeshShape
    workload: Workload


def _div(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) must be divisible by {d}")
    return n // d


def layer_activation_bytes(text: C.LlamaConfig, lora_rank: int, rows: int, seq: int, t: int, e: int) -> float:
    """A: bytes one decoder layer saves for its backward pass (see the module docstring)."""
    D, I, H, KVH, Dh = (text.hidden_size, text.intermediate_size, text.num_attention_heads,
                        text.num_key_value_heads, text.dims_per_head)
    per_token = D * (6 * e + 8) + e * ((3 * H + 2 * KVH) * Dh + 6 * I) / t + 7 * lora_rank * e
    return rows * seq * per_token + rows * (H / t) * seq * seq * (9 + e)


def layer_backward_bytes(text: C.LlamaConfig, rows: int, seq: int, t: int) -> float:
    """W: transient fp32 cotangents while one decoder layer runs its backward pass."""
    D, I, H = text.hidden_size, text.intermediate_size, text.num_attention_heads
    return rows * (H / t) * seq * seq * 8 + rows * seq * (4 * D + 3 * I / t) * 4


def plan(cfg: C.LlavaConfig, mesh: MeshShape, work: Workload, rules: Sequence = LLAVA_RULES,
         params: Optional[ParamBytes] = None) -> Plan:
    """The memory plan of `work` for `cfg` on `mesh` (see the module docstring for every formula).

    `params`: a precomputed `param_bytes(cfg, mesh, work.dtype, work.trainable_dtype, rules)`."""
    if work.remat not in ("layer", "none"):
        raise ValueError(f"remat must be 'layer' or 'none', got {work.remat!r}")
    if work.logits not in ("full", "response"):
        raise ValueError(f"logits must be 'full' or 'response', got {work.logits!r}")
    for name in ("batch", "prompt_len", "new_tokens", "minibatches"):
        if getattr(work, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(work, name)}")
    if work.prompt_len < cfg.num_image_tokens:
        raise ValueError(f"prompt_len {work.prompt_len} is shorter than the {cfg.num_image_tokens} image tokens")
    dp = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    t = mesh.shape.get("tensor", 1)
    b_r = _div(work.batch, dp, "batch over the data x fsdp devices")
    b = _div(_div(work.batch, work.minibatches, "batch over minibatches"), dp,
             "minibatch over the data x fsdp devices")
    text = cfg.text
    e = _bytes(work.dtype)
    T, N = work.prompt_len, work.new_tokens
    S = T + N
    L, D, I, H, V = (text.num_hidden_layers, text.hidden_size, text.intermediate_size,
                     text.num_attention_heads, text.vocab_size)
    kvh_local = text.num_key_value_heads // t if text.num_key_value_heads % t == 0 else text.num_key_value_heads

    pb = params or param_bytes(cfg, mesh, work.dtype, work.trainable_dtype, rules)
    tb = _bytes(work.trainable_dtype)
    moments = 2 * pb.trainable_elements * tb
    verifier = cfg.vision.hidden_size * work.clip_projection_dim * e + work.num_entities * work.clip_projection_dim * 4
    gather = 2 * pb.gather_block
    kv = 2 * L * b_r * S * kvh_local * text.dims_per_head * e
    rollout_work = b_r * T * (V / t) * 4 + b_r * (H / t) * T * S * 8 + b_r * T * (3 * D + 3 * I / t) * e
    A = layer_activation_bytes(text, cfg.lora.rank, b, S, t, e)
    if work.remat == "layer":
        kv_heads = text.num_key_value_heads * text.dims_per_head / t
        acts = L * b * S * (D + 2 * kv_heads) * e + A + layer_backward_bytes(text, b, S, t) + 2 * b * S * D * e
    else:
        acts = L * A + 2 * b * S * D * e
    s_logits = S if work.logits == "full" else N
    logits = 3 * b * s_logits * (V / t) * 4

    rows = {
        "weights (frozen)": pb.weights,
        "LoRA + value head": pb.trainable,
        "gradients": pb.trainable,
        "AdamW moments": moments,
        "verifier": verifier,
        "FSDP gather": gather,
        "KV cache (rollout)": kv,
        "prefill work (rollout)": rollout_work,
        "activations (update)": acts,
        "logits (update)": logits,
    }
    rows = {k: int(math.ceil(v)) for k, v in rows.items()}
    persistent = rows["weights (frozen)"] + rows["LoRA + value head"] + rows["AdamW moments"] + rows["verifier"]
    rollout = persistent + rows["FSDP gather"] + rows["KV cache (rollout)"] + rows["prefill work (rollout)"]
    update = (persistent + rows["FSDP gather"] + rows["gradients"] + rows["activations (update)"]
              + rows["logits (update)"])
    return Plan(rows, rollout, update, max(rollout, update), b_r, b, pb, mesh, work)


def usable_bytes(acc: Accelerator, reserve: float = 0.1) -> int:
    """HBM left after keeping `reserve` (a fraction) for XLA scratch and fragmentation."""
    if not 0 <= reserve < 1:
        raise ValueError(f"reserve must be in [0, 1), got {reserve}")
    return int(acc.hbm_bytes * (1 - reserve))


def check_mesh_fits_device(mesh: MeshShape, acc: Accelerator) -> None:
    """A TPU slice has a fixed device count: the mesh must use exactly that many."""
    if acc.devices and mesh.size != acc.devices:
        raise ValueError(f"{acc.name} has {acc.devices} devices but mesh {mesh} has {mesh.size}")


def fits(p: Plan, acc: Accelerator, reserve: float = 0.1) -> bool:
    """True when the plan's peak fits the device's usable HBM."""
    return p.peak <= usable_bytes(acc, reserve)


def _max_rows(fits_rows, limit: int) -> int:
    """Largest n in [0, limit] with fits_rows(n) (monotone: more rows never use less memory)."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits_rows(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def best_batch(cfg: C.LlavaConfig, mesh: MeshShape, work: Workload, acc: Accelerator,
               reserve: float = 0.1, limit: int = 1024) -> Optional[Workload]:
    """`work` with the largest rollout batch and PPO minibatch that fit `acc`; None if one row does not.

    The rollout phase depends only on rollout rows per device r and the update only on
    minibatch rows per device m, so each is maximised on its own (binary search, <= limit),
    then r is rounded down to a multiple of m: batch = r x data x fsdp, minibatches = r / m."""
    dp = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    usable = usable_bytes(acc, reserve)
    pb = param_bytes(cfg, mesh, work.dtype, work.trainable_dtype)

    def phase_fits(rows: int, phase: str) -> bool:
        if rows == 0:
            return True
        p = plan(cfg, mesh, dataclasses.replace(work, batch=rows * dp, minibatches=1), params=pb)
        return getattr(p, phase) <= usable

    r = _max_rows(lambda n: phase_fits(n, "rollout"), limit)
    m = _max_rows(lambda n: phase_fits(n, "update"), limit)
    if r == 0 or m == 0:
        return None
    m = min(m, r)
    r -= r % m
    return dataclasses.replace(work, batch=r * dp, minibatches=r // m)


def format_table(p: Plan, acc: Optional[Accelerator] = None, reserve: float = 0.1) -> str:
    """A text table of the plan, per device, in GiB."""
    w = p.workload
    lines = [f"mesh {p.mesh} ({p.mesh.size} devices); batch {w.batch} (rollout {p.rollout_rows_per_device} rows "
             f"per device), {w.minibatches} minibatch(es) ({p.minibatch_rows_per_device} rows per device); "
             f"prompt {w.prompt_len} + {w.new_tokens} new tokens"]
    lines.append(f"weights {w.dtype}, trainable {w.trainable_dtype}, remat={w.remat}, logits over {w.logits}; "
                 f"params {p.params.base_elements_total / 1e9:.3f}B frozen + "
                 f"{p.params.lora_elements_total / 1e6:.1f}M LoRA")
    width = max(len(k) for k in p.rows) + 2
    lines.append(f"{'per device':<{width}}{'GiB':>9}")
    for k, v in p.rows.items():
        lines.append(f"{k:<{width}}{v / GiB:>9.3f}")
    lines.append(f"{'total (rollout)':<{width}}{p.rollout / GiB:>9.3f}")
    lines.append(f"{'total (update)':<{width}}{p.update / GiB:>9.3f}")
    lines.append(f"{'peak':<{width}}{p.peak / GiB:>9.3f}")
    if acc is not None:
        usable = usable_bytes(acc, reserve)
        verdict = "fits" if p.peak <= usable else "does NOT fit"
        lines.append(f"{acc.name}: {acc.hbm_bytes / GiB:.1f} GiB per device, {usable / GiB:.1f} GiB usable "
                     f"(reserve {reserve:.0%}) -> {verdict} ({p.peak / usable:.0%} of usable)")
    return "\n".join(lines)
