"""Alignment methods on one run frame (`fisao_jax.run`): `config.method` picks one.

  fisao.py   FiSAO: token-level rewards from the verifier, PPO on LoRA + value head
  csr.py     CSR: sentence-level beam search with the calibrated reward, iterative DPO
             (csr_search.py: the beam search and its sentence sampler)
  vigor.py   ViGoR (automatic): verifier-guided selection and refinement, then SFT
  dpo.py     the DPO loss and update; sft.py the SFT loss and update

Each method module has `train(config, workdir) -> summary` and `validate(config)`. Every
method shares the task, models, verifier, calibration (baseline.json), evaluation (CHAIR
before and after) and the workdir layout (config.json, eval_*.json, metrics.jsonl,
checkpoints/, summary.json).
"""
from __future__ import annotations

import importlib
from types import ModuleType

METHODS: dict[str, str] = {
    "fisao": "fisao_jax.methods.fisao",
    "csr": "fisao_jax.methods.csr",
    "vigor": "fisao_jax.methods.vigor",
}
"""Method name -> the module that trains it (imported on demand, so that validating a config
does not import every trainer)."""


def method_module(name: str) -> ModuleType:
    """The trainer module of `name` (config key 'method')."""
    if name not in METHODS:
        raise KeyError(f"config key 'method' must be one of {tuple(METHODS)}, got {name!r}")
    return importlib.import_module(METHODS[name])
