"""Where a compiled call spends its time, per HLO operation, from one call under the JAX profiler.

    rows = op_profile.per_op(compiled, args, per=new - 1, min_count=2)

runs `compiled(*args)` once inside `jax.profiler.trace`, reads the Perfetto trace it writes and
sums the duration of every event named after an instruction of `compiled`'s HLO. Instructions
are labelled by their `op_name` metadata (the JAX source op, e.g.
`LlavaModel.forward/language_model/layers_3/mlp/up_proj/dot_general`; layer numbers folded into
`layers_*` so that the layers add up) or, without one, by opcode and shape. `min_count` keeps the
instructions that ran at least that many times (2: those inside loops, such as a rollout's
decode loops) and `per` divides the totals (ms per step). Tracing adds a few microseconds per
operation, so the sum exceeds the untraced time of a step; use it for shares, not for absolute
speed.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile


def _labels(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> label (op_name metadata, or opcode + shape)."""
    labels = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(", line)
        if not m:
            continue
        name, shape, opcode = m.groups()
        meta = re.search(r'op_name="([^"]+)"', line)
        if meta:
            label = re.sub(r"layers_\d+", "layers_*", meta.group(1))
            label = re.sub(r"^jit\([^)]*\)/", "", label).replace("while/body/", "")
        else:
            label = f"{opcode} {shape.split('{')[0]}"
        labels[name] = label
    return labels


def per_op(compiled, args, per: float = 1.0, min_count: int = 1) -> list[tuple[str, int, float]]:
    """[(label, instructions, ms / per)] for one call of `compiled(*args)`, largest first."""
    import jax

    labels = _labels(compiled.as_text())
    jax.block_until_ready(compiled(*args))  # warm: the traced call is a steady one
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            jax.block_until_ready(compiled(*args))
        files = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)
        if not files:
            raise RuntimeError(f"jax.profiler.trace wrote no Perfetto trace (*.trace.json.gz) under {tmp}")
        with gzip.open(files[0]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in labels:
            total[e["name"]] += e["dur"]  # microseconds
            count[e["name"]] += 1
    by_label, members = collections.Counter(), collections.Counter()
    for name, us in total.items():
        if count[name] >= min_count:
            by_label[labels[name]] += us
            members[labels[name]] += 1
    return [(label, members[label], us / 1e3 / per) for label, us in by_label.most_common()]
