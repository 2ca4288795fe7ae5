"""fisao_jax: FiSAO token-level PPO self-alignment of LLaVA-style models in JAX/Flax."""

__version__ = "0.1.0"
