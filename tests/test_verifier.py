"""Verifier scores against transformers' PyTorch CLIP on a tiny random checkpoint."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

from fisao_jax.models import hf_io
from fisao_jax.data.tokenizer import train_tokenizer  # noqa: E402
from fisao_jax.rewards import verifier  # noqa: E402
from fisao_jax.rewards.entities_build import vocab_from_names  # noqa: E402
from fisao_jax.rewards.spans import build_span_table, find_entity_spans  # noqa: E402

TEXTS = ["a photo of a dog.", "a photo of a hot dog.", "a red kite and two cups on a table.",
         "there is a teddy bear next to a plate and a fork.", "the cat sat on the mat with a ball."] * 20


@pytest.fixture(scope="module", params=["legacy-argmax", "first-eos"])
def world(request, tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel
    root = tmp_path_factory.mktemp("verifier")
    tok = train_tokenizer(TEXTS, root / "tok", vocab_size=300)
    # eos 2 selects transformers' legacy pooling (highest id); another id pools at the first EOS
    eos = tok.eos_token_id if request.param == "legacy-argmax" else tok.convert_tokens_to_ids("<image>")
    assert eos == 2 or request.param == "first-eos"
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=40,
                                      eos_token_id=eos),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=28, patch_size=14),
                     projection_dim=16)
    cfg._attn_implementation = "eager"
    hf = CLIPModel(cfg).eval()
    hf.save_pretrained(root / "clip")
    module, params = hf_io.from_hf(root / "clip")
    tok.clip_eos = eos
    return tok, hf, module, params, root


def _reference_score(hf, tok, word, pixels):
    ids = tok(f"a photo of a {word}.")["input_ids"] + [tok.clip_eos]
    with torch.no_grad():
        t = hf.get_text_features(input_ids=torch.tensor([ids]))
        i = hf.get_image_features(pixel_values=torch.tensor(pixels[None]))
    t = getattr(t, "pooler_output", t)[0].numpy().astype(np.float64)
    i = getattr(i, "pooler_output", i)[0].numpy().astype(np.float64)
    return 100 * t @ i / np.linalg.norm(t) / np.linalg.norm(i)


def test_span_scores_equal_100_cos_from_transformers(world, tmp_path):
    tok, hf, module, params, _ = world
    vocab = vocab_from_names(["dog", "hot dog", "kite", "cup", "teddy bear", "fork"])
    table = verifier.entity_text_table(module, params, tok, vocab.surface_forms, cache_dir=tmp_path,
                                       checkpoint_id="tiny", progress=False)
    responses = ["a hot dog and two cups.", "a kite, a fork and a teddy bear."]
    enc = tok(responses, padding=True, add_special_tokens=False)
    ids, mask = np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])
    spans = np.asarray(find_entity_spans(jnp.asarray(ids), jnp.asarray(mask), build_span_table(tok, vocab)))
    pixels = np.random.RandomState(0).randn(2, 3, 28, 28).astype(np.float32)
    img = verifier.image_embeddings(module, params, jnp.asarray(pixels))
    scores = np.asarray(verifier.span_scores(img, table, jnp.asarray(spans)))
    found = {(b, vocab.surface_forms[e]) for b, t in zip(*np.nonzero(spans >= 0)) for e in [spans[b, t]]}
    assert found == {(0, "hot dog"), (0, "cups"), (1, "kite"), (1, "fork"), (1, "teddy bear")}
    for b, t in zip(*np.nonzero(spans >= 0)):
        ref = _reference_score(hf, tok, vocab.surface_forms[spans[b, t]], pixels[b])
        assert abs(scores[b, t] - ref) <= 1e-3  # 100 * (1e-5 in cos)
    assert (scores[spans < 0] == 0).all()
    assert np.abs(scores[spans >= 0]).max() > 1.0  # non-degenerate


def test_text_table_is_cached_by_key(world, tmp_path):
    tok, _, module, params, _ = world
    forms = ("dog", "kite")
    a = verifier.entity_text_table(module, params, tok, forms, cache_dir=tmp_path, checkpoint_id="x", progress=False)
    files = list(tmp_path.glob("entity_table_*.npy"))
    assert len(files) == 1
    np.save(files[0], np.zeros((2, a.shape[1]), np.float32))  # a cache hit reads the file back
    b = verifier.entity_text_table(module, params, tok, forms, cache_dir=tmp_path, checkpoint_id="x", progress=False)
    assert float(jnp.abs(b).max()) == 0.0
    verifier.entity_text_table(module, params, tok, forms, cache_dir=tmp_path, checkpoint_id="y", progress=False)
    verifier.entity_text_table(module, params, tok, forms, "an image of {}", cache_dir=tmp_path, checkpoint_id="x",
                               progress=False)
    assert len(list(tmp_path.glob("entity_table_*.npy"))) == 3


def test_sentence_scores_equal_transformers(world):
    tok, hf, module, params, _ = world
    pixels = np.random.RandomState(1).randn(2, 3, 28, 28).astype(np.float32)
    texts = ["a red kite and two cups on a table.", "the cat sat on the mat."]
    v = verifier.Verifier(module, tok, verifier.DEFAULT_TEMPLATE, eos_token_id=tok.eos_token_id)
    state = verifier.VerifierState(params, jnp.zeros((1, module.cfg.projection_dim)), None)
    img = v.image_embeddings(params, jnp.asarray(pixels))
    ours = np.asarray(v.sentence_scores(state, img, texts))
    for b, text in enumerate(texts):
        ids = tok(text)["input_ids"] + [tok.clip_eos]
        with torch.no_grad():
            t = hf.get_text_features(input_ids=torch.tensor([ids]))
            i = hf.get_image_features(pixel_values=torch.tensor(pixels[b:b + 1]))
        t = getattr(t, "pooler_output", t)[0].numpy()
        i = getattr(i, "pooler_output", i)[0].numpy()
        assert abs(ours[b] - 100 * t @ i / np.linalg.norm(t) / np.linalg.norm(i)) <= 1e-3


def test_bad_template_is_rejected(world):
    tok, _, module, params, _ = world
    with pytest.raises(ValueError, match="must contain"):
        verifier.entity_text_table(module, params, tok, ("dog",), template="a photo", progress=False)
