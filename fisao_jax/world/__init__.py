"""The synthetic world's pretrained models: tokenizer, CLIP (the verifier) and SFT LLaVA (the policy).

`build_world(workdir, cfg)` trains them or loads them from the cache; see `build`.
"""
from fisao_jax.world.build import WorldArtifacts, WorldCacheError, build_world  # noqa: F401
from fisao_jax.world.configs import (  # noqa: F401
    ClipSettings,
    SftSettings,
    TokenizerSettings,
    WorldBuildConfig,
    build_config_from_dict,
    default_build_config,
    pixel_values,
    test_build_config,
    to_dict,
)
