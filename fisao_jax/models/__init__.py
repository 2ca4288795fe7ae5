"""Model definitions (flax.linen) and Hugging Face loaders."""
