"""Random (untrained) world artifacts for trainer tests: a tokenizer, a tiny LLaVA and CLIP
in the converted-checkpoint format, sized for the default synthetic world's scenes."""
from __future__ import annotations

import json
import pathlib

import jax

from fisao_jax.data import synthetic
from fisao_jax.data.tokenizer import train_tokenizer
from fisao_jax.models import configs as C
from fisao_jax.models import config_io
from fisao_jax.models.hf_io import init_params, save_params
from fisao_jax.world.configs import default_build_config


def _save(cfg, folder: pathlib.Path, params) -> None:
    folder.mkdir(parents=True)
    save_params(folder / "params", params)
    kind = "llava" if isinstance(cfg, C.LlavaConfig) else "clip"
    (folder / "fisao_config.json").write_text(json.dumps({"kind": kind, "dtype": "float32", "config": config_io.to_dict(cfg)}))


def make_toy_world(root: pathlib.Path, seed: int = 0) -> dict:
    """{'policy', 'verifier', 'tokenizer'} folders of random tiny models; the policy's vision
    tower is the verifier's (the LLaVA recipe)."""
    data = synthetic.make_dataset(synthetic.WorldConfig(), 200, seed=0, split="toy")
    tok = train_tokenizer(data["captions"] + list(synthetic.PROMPTS), root / "tokenizer", vocab_size=300)
    world = default_build_config().world  # the scenes configs/tiny.py generates
    vision = C.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=world.image_size, patch_size=world.image_size // 3)
    image_token = tok.convert_tokens_to_ids("<image>")
    llava = C.LlavaConfig(vision=vision, image_token_id=image_token,
                          text=C.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                             max_position_embeddings=256))
    clip = C.CLIPConfig(vision=vision, projection_dim=16,
                        text=C.CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                                              eos_token_id=tok.eos_token_id, argmax_pooling=False))
    clip_params = init_params(clip, jax.random.PRNGKey(seed + 1))
    llava_params = dict(init_params(llava, jax.random.PRNGKey(seed)), vision_tower=clip_params["vision_model"])
    _save(llava, root / "llava", llava_params)
    _save(clip, root / "clip", clip_params)
    return {"policy": str(root / "llava"), "verifier": str(root / "clip"), "tokenizer": str(root / "tokenizer")}
