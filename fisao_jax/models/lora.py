"""LoRA linear layers and LoRA parameter utilities.

A `LoRADense` holds the frozen base `kernel` [in, out] (and `bias`) plus, when rank > 0,
`lora_a` [in, r] and `lora_b` [r, out] with `lora_b` initialised to zero, so a fresh adapter
leaves the model unchanged. `use_lora=False` at call time skips the adapter: this is the
reference policy, computed from the same weights without a second copy.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

LORA_LEAVES = ("lora_a", "lora_b")


class LoRADense(nn.Module):
    """y = x @ kernel + bias + (alpha / r) * dropout(x) @ lora_a @ lora_b.  x: [..., in]."""

    features: int
    use_bias: bool = False
    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, use_lora: bool = True, deterministic: bool = True) -> jax.Array:
        d_in = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (d_in, self.features), self.param_dtype)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        if self.rank > 0:
            # kaiming-uniform(a=sqrt(5)) on A as in PEFT; B = 0.
            a = self.param("lora_a", nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                           (d_in, self.rank), self.param_dtype)
            b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features), self.param_dtype)
            if use_lora:
                h = nn.Dropout(self.dropout)(x, deterministic=deterministic) if self.dropout > 0 else x
                h = jnp.dot(jnp.dot(h.astype(self.dtype), a.astype(self.dtype)), b.astype(self.dtype))
                y = y + (self.alpha / self.rank) * h
        return y


def _is_lora_owner(node: Any) -> bool:
    return isinstance(node, dict) and "kernel" in node and "lora_a" in node and "lora_b" in node


def merge_lora(params: Any, alpha: float, rank: int) -> Any:
    """Fold every adapter into its base kernel: kernel + (alpha/rank) * A @ B; drops the LoRA leaves.

    The result is the parameter tree of the same model built with `LoRAConfig(rank=0)`.
    """
    scale = alpha / rank

    def visit(node):
        if not isinstance(node, dict):
            return node
        if _is_lora_owner(node):
            merged = {k: v for k, v in node.items() if k not in LORA_LEAVES}
            delta = jnp.dot(node["lora_a"].astype(jnp.float32), node["lora_b"].astype(jnp.float32))
            merged["kernel"] = (node["kernel"].astype(jnp.float32) + scale * delta).astype(node["kernel"].dtype)
            return merged
        return {k: visit(v) for k, v in node.items()}

    return visit(params)


def strip_lora(params: Any) -> Any:
    """The parameter tree without any LoRA leaves (the base model)."""
    if not isinstance(params, dict):
        return params
    return {k: strip_lora(v) for k, v in params.items() if k not in LORA_LEAVES}


def lora_leaves(params: Any) -> dict:
    """Flat {path: array} of the LoRA leaves only (for saving adapters)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in flat
            if str(getattr(path[-1], "key", path[-1])) in LORA_LEAVES}


def init_lora(params: Any, rank: int, key: jax.Array, dtype: Any = None) -> Any:
    """Add fresh adapters (A random, B zero) to every LoRA-capable kernel in `params`.

    `params` is a base tree (e.g. from a converted checkpoint); the LoRA-capable kernels are
    those of the language model's linear layers, i.e. every dict holding a 2-D `kernel` under
    a path containing 'language_model/layers_'.
    """
    counter = [0]

    def visit(node, path):
        if not isinstance(node, dict):
            return node
        out = {k: visit(v, path + (k,)) for k, v in node.items()}
        kernel = node.get("kernel")
        if (kernel is not None and kernel.ndim == 2 and "language_model" in path
                and any(p.startswith("layers_") for p in path) and "lora_a" not in node):
            d_in, d_out = kernel.shape
            counter[0] += 1
            k = jax.random.fold_in(key, counter[0])
            bound = (1.0 / d_in) ** 0.5
            dt = dtype or kernel.dtype
            out["lora_a"] = jax.random.uniform(k, (d_in, rank), jnp.float32, -bound, bound).astype(dt)
            out["lora_b"] = jnp.zeros((rank, d_out), dt)
        return out

    return visit(params, ())
