"""Device mesh from config, regex -> PartitionSpec rules for every parameter, and the layout
of batches, activations and the KV cache.

Rules are ordered (first match wins) and matched against the parameter path joined by '/',
e.g. 'language_model/layers_3/self_attn/q_proj/kernel'. A parameter no rule matches is an
error that names it: silently replicating a 7B weight is how a run runs out of memory.

Axes: 'data' (batch only), 'fsdp' (batch and parameter shards), 'tensor' (model parallel).
Batches are sharded on their leading dim over ('data', 'fsdp'). Inside the models,
activations name their logical axes (`nn.with_logical_constraint(x, ('batch', 'length',
'embed'))`); `LOGICAL_RULES` maps those names to mesh axes while a `Layout` traces a jitted
function, and outside one they are no-ops.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fisao_jax.models import configs as C

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical activation axes -> mesh axes (MaxText's convention): the batch over data and fsdp,
# heads and the MLP's hidden units over tensor, everything else whole.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("cache_len", None),
    ("head_dim", None),
)

# kernels are [in, out]; LoRA a [in, r], b [r, out]; conv kernels [kh, kw, in, out].
LLAVA_RULES: tuple[tuple[str, P], ...] = (
    # language model: Megatron-style column/row splits, FSDP on the other dim
    (r"language_model/embed_tokens/embedding$", P("tensor", "fsdp")),
    (r"self_attn/(q_proj|k_proj|v_proj)/kernel$", P("fsdp", "tensor")),
    (r"mlp/(gate_proj|up_proj)/kernel$", P("fsdp", "tensor")),
    (r"self_attn/o_proj/kernel$", P("tensor", "fsdp")),
    (r"mlp/down_proj/kernel$", P("tensor", "fsdp")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|o_proj|down_proj)/lora_a$", P("fsdp", None)),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/lora_b$", P("fsdp", "tensor")),
    (r"(o_proj|down_proj)/lora_b$", P(None, "fsdp")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/bias$", P("tensor")),
    (r"(o_proj|down_proj)/bias$", P()),
    (r"lm_head/kernel$", P("fsdp", "tensor")),
    (r"(layernorm|norm)/scale$", P()),
    (r"value_head/(kernel|bias)$", P()),
    # vision tower + projector: FSDP on the large matrices, everything else replicated
    (r"vision_(tower|model)/.*(q_proj|k_proj|v_proj|fc1)/kernel$", P("fsdp", "tensor")),
    (r"vision_(tower|model)/.*(out_proj|fc2)/kernel$", P("tensor", "fsdp")),
    (r"vision_(tower|model)/.*(fc1|q_proj|k_proj|v_proj)/bias$", P("tensor")),
    (r"vision_(tower|model)/.*/bias$", P()),
    (r"vision_(tower|model)/.*(layer_norm\d|layrnorm|layernorm)/scale$", P()),
    (r"vision_(tower|model)/embeddings/patch_embedding/kernel$", P(None, None, None, "fsdp")),
    (r"vision_(tower|model)/embeddings/(class_embedding|position_embedding/embedding)$", P()),
    (r"multi_modal_projector/linear_1/kernel$", P("fsdp", "tensor")),
    (r"multi_modal_projector/linear_2/kernel$", P("tensor", "fsdp")),
    (r"multi_modal_projector/linear_\d/bias$", P()),
)

CLIP_RULES: tuple[tuple[str, P], ...] = LLAVA_RULES + (
    (r"text_model/embeddings/token_embedding/embedding$", P("tensor", "fsdp")),
    (r"text_model/embeddings/position_embedding/embedding$", P()),
    (r"text_model/.*(q_proj|k_proj|v_proj|fc1)/kernel$", P("fsdp", "tensor")),
    (r"text_model/.*(out_proj|fc2)/kernel$", P("tensor", "fsdp")),
    (r"text_model/.*(fc1|q_proj|k_proj|v_proj)/bias$", P("tensor")),
    (r"text_model/.*/bias$", P()),
    (r"text_model/.*(layer_norm\d|final_layer_norm)/scale$", P()),
    (r"(visual|text)_projection/kernel$", P("fsdp", "tensor")),
    (r"^logit_scale$", P()),
)


def rules_for(model_cfg: Any) -> tuple[tuple[str, P], ...]:
    """The partition rules of a model config (LLaVA, CLIP)."""
    if isinstance(model_cfg, C.LlavaConfig):
        return LLAVA_RULES
    if isinstance(model_cfg, C.CLIPConfig):
        return CLIP_RULES
    raise TypeError(f"no partition rules for {type(model_cfg).__name__}")


def make_mesh(axes: Mapping[str, int], devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A mesh over `devices` (default: all) with named axes, e.g. {'data': -1, 'fsdp': 1, 'tensor': 1}.

    One axis may be -1 (takes the remaining devices). An optional 'devices' entry (0 = all)
    uses only the first that many devices (tests on a few of a host's fake devices). Axes are
    Auto-typed so jit propagates shardings from the inputs."""
    axes = dict(axes)
    devices = list(jax.devices() if devices is None else devices)
    count = int(axes.pop("devices", 0) or 0)
    if count:
        if count > len(devices):
            raise ValueError(f"mesh asks for {count} devices, have {len(devices)}")
        devices = devices[:count]
    names = [a for a in AXES if a in axes] + [a for a in axes if a not in AXES]
    sizes = [int(axes[a]) for a in names]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(axes)}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {dict(axes)}: {len(devices)} devices not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(names, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"have {len(devices)}")
    grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, tuple(names), axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def partition_specs(params: Any, rules: Sequence[tuple[str, P]] = LLAVA_RULES,
                    mesh: Optional[Mesh] = None) -> Any:
    """PartitionSpec tree for `params` (arrays or ShapeDtypeStructs).

    Errors name every unmatched parameter; with a mesh, also every dimension that the mesh
    axes do not divide."""
    compiled = [(re.compile(pat), spec) for pat, spec in rules]
    unmatched, indivisible = [], []

    def spec_for(path, leaf):
        name = path_str(path)
        for pat, spec in compiled:
            if pat.search(name):
                if len(spec) > len(leaf.shape):
                    indivisible.append(f"{name}: spec {spec} has more dims than shape {leaf.shape}")
                    return P()
                if mesh is not None:
                    for dim, axis in zip(leaf.shape, spec):
                        size = _axis_size(mesh, axis)
                        if dim % size:
                            indivisible.append(f"{name}: dim {dim} not divisible by mesh axis {axis} ({size})")
                return spec
        unmatched.append(name)
        return P()

    specs = jax.tree_util.tree_map_with_path(spec_for, params)
    if unmatched:
        raise ValueError("no partition rule matches these parameters:\n  " + "\n  ".join(unmatched))
    if indivisible:
        raise ValueError("partition rules do not fit the mesh:\n  " + "\n  ".join(indivisible))
    return specs


def _axis_size(mesh: Mesh, axis) -> int:
    if axis is None:
        return 1
    names = axis if isinstance(axis, tuple) else (axis,)
    return int(np.prod([mesh.shape[n] for n in names if n in mesh.shape]))


def param_shardings(params: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = LLAVA_RULES) -> Any:
    """NamedSharding tree for `params` on `mesh` (axes the mesh lacks are dropped)."""
    specs = partition_specs(params, rules, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, _restrict(s, mesh)), specs,
                        is_leaf=lambda x: isinstance(x, P))


def _restrict(spec: P, mesh: Mesh) -> P:
    def keep(axis):
        if axis is None:
            return None
        names = tuple(a for a in (axis if isinstance(axis, tuple) else (axis,)) if a in mesh.shape)
        return names[0] if len(names) == 1 else (names or None)
    return P(*(keep(a) for a in spec))


def batch_axes(mesh: Mesh) -> Optional[tuple[str, ...]]:
    """The mesh's batch axes ('data', 'fsdp' where present) or None."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return axes or None


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dim over the data-parallel axes, the rest replicated. Also a valid
    prefix for a whole dict of batch arrays of any ranks (`jax.jit` in_shardings)."""
    return NamedSharding(mesh, P(batch_axes(mesh), *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh) -> int:
    """How many pieces the batch dim is cut into."""
    return int(np.prod([mesh.shape[a] for a in (batch_axes(mesh) or ())]))


def kv_cache_sharding(mesh: Mesh, num_kv_heads: int) -> NamedSharding:
    """KV cache [B, KVH, S, Dh]: batch over the batch axes, heads over tensor when it divides them."""
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and num_kv_heads % tensor == 0 else None
    return NamedSharding(mesh, P(batch_axes(mesh), heads, None, None))


def shard_params(params: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = LLAVA_RULES) -> Any:
    """Place a parameter tree on the mesh per the rules."""
    return jax.device_put(params, param_shardings(params, mesh, rules))
