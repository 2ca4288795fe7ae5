"""Tiny random transformers models saved with `save_pretrained`, for parity tests."""
from __future__ import annotations

import pathlib

import numpy as np

IMAGE_TOKEN = 99
VOCAB = 100


def llava_config(gqa: bool = True, feature_layer=-2, strategy: str = "default", layers: int = 2,
                 vision_layers: int = 3):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                          num_attention_heads=4, image_size=28, patch_size=14, projection_dim=16)
    tc = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                     num_key_value_heads=2 if gqa else 4, vocab_size=VOCAB, max_position_embeddings=128,
                     rope_theta=10000.0)
    return LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN,
                       vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy)


def save_llava(folder: pathlib.Path, seed: int = 0, **kw):
    """Build, perturb (so norms/biases are not trivially 1/0) and save a tiny LLaVA; returns the torch model."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = llava_config(**kw)
    cfg._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", "layrnorm.weight", ".bias")) or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def save_clip(folder: pathlib.Path, seed: int = 0, eos_token_id: int = 2):
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=14),
        projection_dim=24)
    cfg._attn_implementation = "eager"
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def llava_inputs(num_image_tokens: int, images_per_row=(1, 1), pads=(2, 0), text_len: int = 5, seed: int = 0,
                 image_size: int = 28):
    """Left-padded ids [B,T], mask [B,T], pixels [N_img,3,S,S], position ids [B,T]."""
    rng = np.random.RandomState(seed)
    rows = []
    for n_img, pad in zip(images_per_row, pads):
        toks = [1]
        for _ in range(n_img):
            toks += [IMAGE_TOKEN] * num_image_tokens + list(rng.randint(3, IMAGE_TOKEN, size=2))
        toks += list(rng.randint(3, IMAGE_TOKEN, size=text_len))
        rows.append((pad, toks))
    t = max(pad + len(toks) for pad, toks in rows)
    ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    for i, (pad, toks) in enumerate(rows):
        start = t - len(toks)
        ids[i, start:] = toks
        mask[i, start:] = 1
    pixels = rng.randn(sum(images_per_row), 3, image_size, image_size).astype(np.float32)
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    return ids, mask, pixels, pos


def _perturb(model, scale: float = 0.1):
    """Norm weights and biases off 1/0; learned queries, class and position embeddings (zero or
    ~1e-10 at transformers' init) to unit scale, so that each of them matters."""
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith(".bias"):
                p.add_(scale * torch.randn_like(p))
            elif name.endswith(("query_tokens", "class_embedding", "position_embedding")):
                p.copy_(torch.randn_like(p))


def blip_vision_config(odd: bool = False, layers: int = 2) -> dict:
    # transformers initialises the vision weights with std initializer_range, 1e-10 by default:
    # the image would not matter
    if odd:  # 3 heads of 8, 42 px = 3x3 patches
        return dict(hidden_size=24, intermediate_size=40, num_hidden_layers=layers, num_attention_heads=3,
                    image_size=42, patch_size=14, initializer_range=0.05)
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                image_size=28, patch_size=14, initializer_range=0.05)


def qformer_config(odd: bool = False, layers: int = 2, cross_attention_frequency: int = 2, **kw) -> dict:
    kw.setdefault("initializer_range", 0.1)  # larger than BERT's 0.02 so that the image counts
    if odd:  # 4 heads of 5
        return dict(vocab_size=QFORMER_VOCAB, hidden_size=20, num_hidden_layers=layers, num_attention_heads=4,
                    intermediate_size=36, max_position_embeddings=24,
                    cross_attention_frequency=cross_attention_frequency, **kw)
    return dict(vocab_size=QFORMER_VOCAB, hidden_size=24, num_hidden_layers=layers, num_attention_heads=4,
                intermediate_size=40, max_position_embeddings=24, cross_attention_frequency=cross_attention_frequency,
                **kw)


QFORMER_VOCAB = 50


def instructblip_config(gqa: bool = True, odd: bool = False, cross_attention_frequency: int = 2,
                        qformer_layers: int = 2, layers: int = 2, num_query_tokens: int = 3):
    from transformers import InstructBlipConfig, LlamaConfig

    tc = LlamaConfig(hidden_size=24 if odd else 32, intermediate_size=44 if odd else 64, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2 if gqa else 4, vocab_size=VOCAB,
                     max_position_embeddings=128, rope_theta=10000.0)
    return InstructBlipConfig(vision_config=blip_vision_config(odd),
                              qformer_config=qformer_config(odd, qformer_layers, cross_attention_frequency),
                              text_config=tc.to_dict(), num_query_tokens=num_query_tokens,
                              image_token_index=IMAGE_TOKEN)


def save_instructblip(folder: pathlib.Path, seed: int = 0, **kw):
    """Build, perturb and save a tiny InstructBLIP (LLaMA); returns the torch model."""
    import torch
    from transformers import InstructBlipForConditionalGeneration

    torch.manual_seed(seed)
    cfg = instructblip_config(**kw)
    cfg._attn_implementation = "eager"
    model = InstructBlipForConditionalGeneration(cfg).eval()
    _perturb(model)
    model.save_pretrained(folder)
    return model


def save_blip2_itm(folder: pathlib.Path, seed: int = 0, odd: bool = False, cross_attention_frequency: int = 2,
                   qformer_layers: int = 2, num_query_tokens: int = 3, image_token_index=None):
    """Build, perturb and save a tiny BLIP-2 image-text retrieval model; returns the torch model."""
    import torch
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    torch.manual_seed(seed)
    cfg = Blip2Config(vision_config=blip_vision_config(odd),
                      qformer_config=qformer_config(odd, qformer_layers, cross_attention_frequency,
                                                    use_qformer_text_input=True),
                      num_query_tokens=num_query_tokens, image_text_hidden_size=12 if odd else 16,
                      image_token_index=image_token_index)
    cfg._attn_implementation = "eager"
    model = Blip2ForImageTextRetrieval(cfg).eval()
    _perturb(model)
    model.save_pretrained(folder)
    return model


def qformer_inputs(lengths, seed: int = 0):
    """Right-padded Q-Former ids / mask [N, max(lengths)] ([CLS]-like 1 first, as BERT pads)."""
    rng = np.random.RandomState(seed)
    t = max(lengths)
    ids = np.zeros((len(lengths), t), np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = [1] + list(rng.randint(3, QFORMER_VOCAB, size=n - 1))
        mask[i, :n] = 1
    return ids, mask


def bert_tokenizer(folder: pathlib.Path, words):
    """A tiny uncased BERT WordPiece tokenizer ([PAD]=0, [UNK], [CLS], [SEP], [MASK], then
    `words` and a few suffix pieces), saved to and loaded back from `folder`."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(words)) + [".", "?", ",", "##s", "##ing"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 takes the vocabulary file as `vocab` (a `vocab_file=` keyword is ignored)
    tok = transformers.BertTokenizerFast(vocab=str(folder / "vocab.txt"))
    tok.save_pretrained(str(folder))
    return transformers.AutoTokenizer.from_pretrained(str(folder))
