"""Verifier scores against transformers' PyTorch CLIP on a tiny random checkpoint; spans cut by
the token budget."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

from fisao_jax.models import hf_io
from fisao_jax.data.tokenizer import train_tokenizer  # noqa: E402
from fisao_jax.rewards import verifier  # noqa: E402
from fisao_jax.rewards.entities_build import vocab_from_names  # noqa: E402
from fisao_jax.rewards.spans import build_span_table, find_entity_spans  # noqa: E402

import hf_tiny  # noqa: E402

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


# ------------------------------------------------------------------ responses cut at the budget

def test_cut_spans_by_hand():
    """Only the span ending at the last slot of a row that used every slot without EOS goes."""
    eos = 2
    tokens = np.array([[7, 8, 9, 10],    # full, no EOS: cut
                       [7, 8, 9, 2],     # full, ends with EOS: finished
                       [7, 8, 0, 0],     # stopped before the budget: finished
                       [7, 8, 9, 10],    # full, no EOS, but no span at the cut
                       [0, 0, 0, 0]])    # empty
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    ids = np.array([[-1, 3, -1, 5],
                    [-1, 3, 4, -1],
                    [-1, 3, -1, -1],
                    [-1, -1, 6, -1],
                    [-1, -1, -1, -1]])
    expected = np.array([[-1, 3, -1, -1],
                         [-1, 3, 4, -1],
                         [-1, 3, -1, -1],
                         [-1, -1, 6, -1],
                         [-1, -1, -1, -1]])
    got = verifier.cut_spans(jnp.asarray(ids), jnp.asarray(tokens), jnp.asarray(mask), eos)
    np.testing.assert_array_equal(np.asarray(got), expected)


CUT_TEXTS = ["a cat and a baseball bat.", "a caterpillar on a leaf.", "a baseball and a cat.",
             "the cat sat with a baseball."] * 20


@pytest.fixture(scope="module")
def cut_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cut")
    tok = train_tokenizer(CUT_TEXTS, root / "tok", vocab_size=320)
    vocab = vocab_from_names(["cat", "baseball", "baseball bat"], plurals=False)
    hf_tiny.save_clip(root / "clip")
    module, params = hf_io.from_hf(root / "clip")
    rng = np.random.RandomState(0)
    table = rng.randn(len(vocab), module.cfg.projection_dim)
    table /= np.linalg.norm(table, axis=-1, keepdims=True)
    state = verifier.VerifierState(params, jnp.asarray(table, jnp.float32), build_span_table(tok, vocab))
    return tok, vocab, table, state, verifier.Verifier(module, tok, eos_token_id=tok.eos_token_id)


@pytest.mark.parametrize("text, form", [("a cat", "cat"), ("a cat and a baseball", "baseball")])
def test_span_at_the_budget_is_dropped_and_kept_after_eos(cut_world, text, form):
    """A response whose last token completes 'cat' / 'baseball' exactly at the token budget,
    without EOS, may go on ('caterpillar', 'baseball bat'): that span gets no entity id and no
    score. The same words followed by EOS (with the budget filled, or with room left) are
    scored; so are the other spans of the cut response."""
    tok, vocab, table, state, v = cut_world
    words = tok(text, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    n = len(words)
    rows = [(words, n),                       # cut: every slot used, no EOS
            (words + [eos], n + 1),           # EOS in the last slot
            (words + [eos], n + 3)]           # EOS with room left
    emb = rng_unit(1, table.shape[1], seed=1)
    for row_tokens, budget in rows:
        tokens = np.full((1, budget), tok.pad_token_id, np.int32)
        mask = np.zeros((1, budget), np.int32)
        tokens[0, :len(row_tokens)], mask[0, :len(row_tokens)] = row_tokens, 1
        out = v.verify(state, jnp.asarray(tokens), jnp.asarray(mask), None,
                       image_emb=jnp.asarray(emb[:1, None], jnp.float32))
        ids, scores = np.asarray(out.entity_id)[0], np.asarray(out.scores)[0]
        cut = budget == n
        # the mention ends at the last word token (index n - 1)
        want_id = -1 if cut else vocab.entity_id(form)
        assert ids[n - 1] == want_id, (row_tokens, budget, ids)
        want_score = 0.0 if cut else 100 * float(table[vocab.entity_id(form)] @ emb[0])
        assert scores[n - 1] == pytest.approx(want_score, abs=1e-3)
        if form == "baseball":  # 'cat' (token 1) is inside the response: always scored
            assert ids[1] == vocab.entity_id("cat")
            assert scores[1] == pytest.approx(100 * float(table[vocab.entity_id("cat")] @ emb[0]), abs=1e-3)
        assert (ids >= 0).sum() == (1 if form == "cat" else 2) - int(cut)


def test_multiword_entity_completed_before_eos_is_one_span(cut_world):
    """'baseball bat' then EOS: one span, the multi-word entity (what the cut rule protects)."""
    tok, vocab, table, state, v = cut_world
    words = tok("a baseball bat", add_special_tokens=False)["input_ids"]
    tokens = np.asarray([words + [tok.eos_token_id]], np.int32)
    out = v.verify(state, jnp.asarray(tokens), jnp.ones_like(jnp.asarray(tokens)), None,
                   image_emb=jnp.asarray(rng_unit(1, table.shape[1], seed=2)[:, None], jnp.float32))
    ids = np.asarray(out.entity_id)[0]
    assert [vocab.surface_forms[e] for e in ids if e >= 0] == ["baseball bat"]
    assert ids[len(words) - 1] == vocab.entity_id("baseball bat")


def rng_unit(n, d, seed):
    x = np.random.RandomState(seed).randn(n, d)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
