"""Entity spans: vectorized finder vs the plain-Python reference and hand-checked cases.

A real SentencePiece BPE tokenizer is trained on a small corpus of entity words,
sub-words, near misses ("catsup", "hotdog", "pineapples") and punctuation.
"""
import random

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fisao_jax.data.tokenizer import train_tokenizer
from fisao_jax.rewards import spans
from fisao_jax.rewards.entities import load_entity_vocab, vocab_from_mapping

ENTITIES = {
    "cat": "cat", "cats": "cat", "dog": "dog", "dogs": "dog", "hot dog": "hot dog",
    "hot dogs": "hot dog", "teddy bear": "teddy bear", "teddy bears": "teddy bear",
    "bear": "bear", "bears": "bear", "car": "car", "cars": "car", "apple": "apple",
    "pineapple": "pineapple", "t-shirt": "t-shirt", "doll's house": "doll's house",
    "wine glass": "wine glass", "glass": "glass", "tv": "tv", "baseball": "baseball",
    "baseball bat": "baseball bat", "bat": "bat", "bus": "bus", "person": "person",
    "people": "person", "x": "x", "2 cats": "cat",
}
NEAR_MISSES = ["catsup", "scatter", "hotdog", "dogma", "cart", "cartoon", "pineapples",
               "tvs", "teddy", "bearing", "glasses", "t-shirts", "houses", "baseballs",
               "busy", "persons", "doll", "wine", "hot", "xx", "2", "cat2", "the", "a", "on",
               "with", "naïve", "café", "über"]
SEPARATORS = [" ", " ", " ", "", ", ", ". ", "-", "'s ", "\n", "  ", " (", ") ", "!", "/",
              "’", "\t"]
CASES = [str.lower, str.capitalize, str.upper, str.title]
SEQ_LEN = 40
BATCH = 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = random.Random(0)
    words = list(ENTITIES) + NEAR_MISSES
    texts = [" ".join(rng.choice(words) for _ in range(12)).capitalize() + rng.choice(".!?")
             for _ in range(600)]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=420)


@pytest.fixture(scope="module")
def vocab():
    return vocab_from_mapping(ENTITIES)


@pytest.fixture(scope="module")
def table(tokenizer, vocab):
    return spans.build_span_table(tokenizer, vocab)


def _found(tokenizer, vocab, table, texts):
    """[(surface form, text of the span's tokens)] per text, via the jitted finder."""
    enc = tokenizer(texts, add_special_tokens=False, padding="max_length", max_length=SEQ_LEN,
                    return_tensors="np")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    out = spans.find_entity_span_bounds(jnp.asarray(ids), jnp.asarray(mask), table)
    result = []
    for row in range(len(texts)):
        toks = tokenizer.convert_ids_to_tokens(ids[row].tolist())
        ends = np.flatnonzero(np.asarray(out.entity_id[row]) >= 0)
        result.append([(vocab.surface_forms[int(out.entity_id[row, t])],
                        "".join(toks[int(out.start[row, t]):t + 1]).replace("▁", " "))
                       for t in ends])
    return result


def test_hand_checked_sentences(tokenizer, vocab, table):
    texts = [
        "A hotdog and a hot dog near Cats, catsup; the TEDDY BEAR. Bear!",
        "Scatter the cats' cart: a baseball bat, a baseball and a bat.",
        "Pineapples, a pineapple and an apple; glasses and a wine glass.",
        "His T-shirt, the doll's house, two tvs and a TV (a bus).",
    ]
    found = [[form for form, _ in row] for row in _found(tokenizer, vocab, table, texts)]
    assert found == [
        ["hot dog", "cats", "teddy bear", "bear"],
        ["cats", "baseball bat", "baseball", "bat"],
        ["pineapple", "apple", "wine glass"],
        ["t-shirt", "doll's house", "tv", "bus"],
    ]


def test_span_start_is_first_token_of_mention(tokenizer, vocab, table):
    [row] = _found(tokenizer, vocab, table, ["Look: hot dogs and Teddy bears."])
    assert row == [("hot dogs", " hot dogs"), ("teddy bears", " Teddy bears")]


def test_mask_and_special_tokens_separate_words(tokenizer, vocab, table):
    ids = tokenizer("hot dog", add_special_tokens=False)["input_ids"]
    image = tokenizer.convert_tokens_to_ids("<image>")
    # Masking the first word leaves "dog"; an <image> token between the words does too.
    masked = spans.find_entity_spans(jnp.asarray([ids]), jnp.asarray([[0] + [1] * (len(ids) - 1)]), table)
    split = spans.find_entity_spans(jnp.asarray([ids[:1] + [image] + ids[1:]]),
                                    jnp.ones((1, len(ids) + 1), jnp.int32), table)
    dog = vocab.entity_id("dog")
    assert np.asarray(masked)[0].tolist() == [-1] * (len(ids) - 1) + [dog]
    assert np.asarray(split)[0].tolist() == [-1] * len(ids) + [dog]


def test_match_does_not_depend_on_segmentation(tokenizer, vocab, table):
    # "Cat" spelled with one token per character (byte tokens for the letters).
    byte = {c: tokenizer.convert_tokens_to_ids(f"<0x{ord(c):02X}>") for c in "Cat "}
    ids = [byte[" "], byte["C"], byte["a"], byte["t"], byte[" "]]
    out = spans.find_entity_span_bounds(jnp.asarray([ids]), jnp.ones((1, 5), jnp.int32), table)
    assert np.asarray(out.entity_id)[0].tolist() == [-1, -1, -1, vocab.entity_id("cat"), -1]
    assert np.asarray(out.start)[0].tolist() == [-1, -1, -1, 1, -1]
    short = spans.find_entity_spans(jnp.asarray([ids]), jnp.ones((1, 5), jnp.int32), table,
                                    max_span_len=2)
    assert (np.asarray(short) == -1).all()


def _random_batch(tokenizer, rng, pool):
    """[BATCH, SEQ_LEN] ids and mask: sentences of words, near misses and punctuation, plus
    raw random token ids (arbitrary segmentations), masked prompt prefixes and padding."""
    rows, masks = [], []
    for _ in range(BATCH):
        if rng.random() < 0.75:
            words = [rng.choice(CASES)(rng.choice(list(ENTITIES) + NEAR_MISSES))
                     for _ in range(rng.randint(1, 10))]
            text = "".join(w + rng.choice(SEPARATORS) for w in words)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:SEQ_LEN]
        else:
            ids = [rng.choice(pool) if rng.random() < 0.9 else rng.randrange(len(tokenizer))
                   for _ in range(rng.randint(1, SEQ_LEN))]
        prompt = rng.randint(0, 3) if rng.random() < 0.5 else 0
        mask = [0] * prompt + [1] * (len(ids) - prompt) + [0] * (SEQ_LEN - len(ids))
        rows.append(ids + [tokenizer.pad_token_id] * (SEQ_LEN - len(ids)))
        masks.append(mask[:SEQ_LEN])
    return np.array(rows, np.int32), np.array(masks, np.int32)


def _token_pool(tokenizer):
    """Ids of the tokens in entity words and near misses, in all cases, and of punctuation."""
    words = list(ENTITIES) + NEAR_MISSES
    texts = [case(w) for w in words for case in CASES] + SEPARATORS + list("catdogbear")
    pool = sorted({i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]})
    return pool + [tokenizer.convert_tokens_to_ids("<image>"), tokenizer.eos_token_id]


@hypothesis.settings(max_examples=120, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(seed=st.integers(0, 2**32 - 1))
def test_vectorized_matches_reference_property(tokenizer, vocab, table, seed):
    ids, mask = _random_batch(tokenizer, random.Random(seed), _token_pool(tokenizer))
    max_len = table.max_entity_tokens
    got = spans.find_entity_span_bounds(jnp.asarray(ids), jnp.asarray(mask), table)
    want_id, want_start = spans.reference_entity_spans(ids, mask, tokenizer, vocab, max_len)
    np.testing.assert_array_equal(np.asarray(got.entity_id), want_id)
    np.testing.assert_array_equal(np.asarray(got.start), want_start)


def test_vectorized_matches_reference_bulk(tokenizer, vocab, table):
    """4000 sequences from a fixed seed; also checks the cases are really exercised."""
    rng, pool = random.Random(1234), _token_pool(tokenizer)
    finder = jax.jit(spans.find_entity_span_bounds, static_argnames=("max_span_len",))
    found = multi_word = multi_token = 0
    for _ in range(250):
        ids, mask = _random_batch(tokenizer, rng, pool)
        got = finder(jnp.asarray(ids), jnp.asarray(mask), table)
        want_id, want_start = spans.reference_entity_spans(ids, mask, tokenizer, vocab,
                                                           table.max_entity_tokens)
        np.testing.assert_array_equal(np.asarray(got.entity_id), want_id)
        np.testing.assert_array_equal(np.asarray(got.start), want_start)
        ends = want_id >= 0
        found += ends.sum()
        multi_token += (np.argwhere(ends)[:, 1] > want_start[ends]).sum()
        multi_word += sum(" " in vocab.surface_forms[e] for e in want_id[ends])
    assert found > 3000 and multi_token > 500 and multi_word > 200, (found, multi_token, multi_word)


def test_packaged_vocabulary_builds_a_table(tokenizer):
    vocab = load_entity_vocab()
    table = spans.build_span_table(tokenizer, vocab)
    assert table.entity_hash.shape == (len(vocab), 2)
    # Hash keys are unique in column 0, as the lookup requires.
    assert len(np.unique(np.asarray(table.entity_hash[:, 0]))) == len(vocab)
    text = "Two Teddy Bears and a fire hydrant beside the motorcycles."
    enc = tokenizer([text], add_special_tokens=False, return_tensors="np")
    got = np.asarray(spans.find_entity_spans(jnp.asarray(enc["input_ids"]),
                                             jnp.asarray(enc["attention_mask"]), table))
    assert [vocab.surface_forms[e] for e in got[0] if e >= 0] == ["teddy bears", "fire hydrant",
                                                                  "motorcycles"]


def test_rejects_byte_level_bpe():
    class FakeByteLevel:
        all_special_ids = []

        def __len__(self):
            return 3

        def convert_ids_to_tokens(self, ids):
            return ["Ġcat", "Ġdog", "s"]

    with pytest.raises(ValueError, match="byte-level BPE"):
        spans.token_codes(FakeByteLevel())
