"""Shared helpers for the benchmarks: random transformers LLaVA checkpoints of a named size,
left-padded inputs, timing and markdown tables.

Sizes (float32):
  tiny  the sizes of tests/hf_tiny.py (LLaMA hidden 32, 2 layers, GQA 4/2 heads, vocab 100;
        CLIP hidden 32, 3 layers, image 28 / patch 14 -> 4 image tokens), longer context.
  50m   LLaMA hidden 512, 6 layers, 8 heads, intermediate 1376, vocab 32064 (LLaVA's);
        CLIP hidden 256, 4 layers, image 112 / patch 14 -> 64 image tokens; 55.5M parameters.
"""
from __future__ import annotations

import datetime
import os
import pathlib
import platform
import statistics
import time
from typing import Callable, Sequence

import numpy as np

# `nproc` before `configure_threads` pins the process to fewer cores.
CORES_AT_START = len(os.sched_getaffinity(0))

SIZES = {
    "tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                    image_size=28, patch_size=14, projection_dim=16),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100, max_position_embeddings=1024),
        image_token_index=99),
    "50m": dict(
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                    image_size=112, patch_size=14, projection_dim=256),
        text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=32064, max_position_embeddings=1024),
        image_token_index=32000),
}


def quiet_transformers() -> None:
    """No transformers progress bars or advisory warnings in benchmark output."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def cpu_count() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0))


def configure_threads(threads: int) -> int:
    """Use `threads` cores (0 = all available) for both torch and XLA; returns the count.

    Fewer cores than available pins this process to the first `threads` of them, which is
    what limits XLA's CPU thread pool; call it before JAX first runs anything."""
    import torch

    cores = sorted(os.sched_getaffinity(0))
    threads = threads or len(cores)
    if threads > len(cores):
        raise ValueError(f"--threads {threads}: only {len(cores)} cores available")
    if threads < len(cores):
        os.sched_setaffinity(0, cores[:threads])
    torch.set_num_threads(threads)
    return threads


def hf_config(size: str):
    """A transformers `LlavaConfig` for a named size (see the module docstring)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    s = SIZES[size]
    return LlavaConfig(vision_config=CLIPVisionConfig(**s["vision"]),
                       text_config=LlamaConfig(rope_theta=10000.0, **s["text"]),
                       image_token_index=s["image_token_index"], vision_feature_layer=-2,
                       vision_feature_select_strategy="default")


def save_random_llava(folder: pathlib.Path, size: str, seed: int = 0) -> int:
    """Build a randomly initialised transformers LLaVA of `size`, perturb norms and biases (so
    they are not trivially 1 / 0), `save_pretrained` it into `folder`; returns the parameter count."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(hf_config(size)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def load_hf(folder: pathlib.Path, attn: str):
    """transformers' `LlavaForConditionalGeneration` in float32 eval mode with attention `attn`
    ('eager' or 'sdpa')."""
    import torch
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation=attn,
                                                         dtype=torch.float32).eval()


def llava_inputs(size: str, batch: int, seq: int, max_pad: int = 8, seed: int = 0):
    """Left-padded prompts of total length `seq`, one image per row.

    Returns ids [B, seq] int64 (BOS, image tokens, random text), mask [B, seq] int64,
    pixels [B, 3, H, W] float32, position ids [B, seq] int64 (cumsum(mask) - 1, clipped at 0)."""
    s = SIZES[size]
    v, t = s["vision"], s["text"]
    n_img = (v["image_size"] // v["patch_size"]) ** 2
    if seq <= n_img + 2 + max_pad:
        raise ValueError(f"seq {seq} too short for {n_img} image tokens and {max_pad} padding")
    rng = np.random.RandomState(seed)
    ids = np.zeros((batch, seq), np.int64)
    mask = np.zeros((batch, seq), np.int64)
    for i in range(batch):
        pad = int(rng.randint(0, max_pad + 1)) if i else 0  # row 0 unpadded: full-length prompt
        text = rng.randint(3, min(t["vocab_size"], s["image_token_index"]), size=seq - pad - 1 - n_img)
        row = np.concatenate([[1], np.full(n_img, s["image_token_index"]), text])
        ids[i, pad:] = row
        mask[i, pad:] = 1
    pixels = rng.randn(batch, 3, v["image_size"], v["image_size"]).astype(np.float32)
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    return ids, mask, pixels, pos


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `fn` after `warmup` untimed calls.
    `fn` must block until its result is ready."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Like `time_calls` for several implementations, timed round-robin (one call of each per
    round) so that load from other processes on a shared machine hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - t0)
    return out


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of the fastest of `repeats` jitted float32 n^3 matmuls (XLA, this process's cores)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    return 2 * n ** 3 / min(time_calls(lambda: f(a).block_until_ready(), repeats)) / 1e9


def stream_gbps(mbytes: int = 512, repeats: int = 5) -> float:
    """GB/s of the fastest of `repeats` jitted sums over a float32 array of `mbytes` MB: the rate
    a memory-bound step can read weights and caches at."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mbytes * 2 ** 20 // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    return x.nbytes / min(time_calls(lambda: f(x).block_until_ready(), repeats)) / 1e9


def median(xs: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return statistics.median(xs)


def load_average() -> str:
    """The 1/5/15-minute load averages, as `uptime` prints them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_info() -> dict:
    """Cores, CPU model, date, load and library versions, for the results file."""
    import jax
    import torch
    import transformers

    model = "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "cores available": CORES_AT_START,
            "cores used": cpu_count(), "cpu": model,
            "python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "load": load_average()}


def print_machine(info: dict) -> None:
    """One block of `key: value` lines."""
    for k, v in info.items():
        print(f"{k}: {v}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats are printed with 3 significant digits (or as integers when >= 100)."""
    def fmt(x):
        if isinstance(x, float):
            if x != x:
                return "-"
            return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)
