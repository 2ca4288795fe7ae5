"""The tiny LLaMA-style tokenizer: transformers encodings equal SentencePiece's own."""
import random

import pytest
import sentencepiece as spm
import transformers

from fisao_jax.data.tokenizer import train_tokenizer

WORDS = ("a cat sits on the table near two dogs and a hot dog with some teddy bears "
         "in the kitchen while people watch").split()


def _corpus(seed=0, n=300):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "."
            for _ in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tiny"
    return out, train_tokenizer(_corpus(), out, vocab_size=360)


def test_saved_folder_loads_with_auto_tokenizer(trained):
    out, tok = trained
    assert {p.name for p in out.iterdir()} >= {"tokenizer.json", "tokenizer_config.json",
                                                "tokenizer.model"}
    again = transformers.AutoTokenizer.from_pretrained(str(out))
    assert again.get_vocab() == tok.get_vocab()


def test_llama_special_ids_and_byte_pieces(trained):
    _, tok = trained
    sp = spm.SentencePieceProcessor(model_file=str(trained[0] / "tokenizer.model"))
    n = sp.get_piece_size()
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 3 + 0x0A, 258]) == [
        "<unk>", "<s>", "</s>", "<0x00>", "<0x0A>", "<0xFF>"]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids("<image>") == n
    assert tok.pad_token == "<pad>" and tok.pad_token_id == n + 1
    assert len(tok) == n + 2
    assert tok("a cat")["input_ids"][0] == 1  # BOS added, as LLaMA does


@pytest.mark.parametrize("text", [
    "A cat sits on the table.", "Teddy bears, hot dogs; people!", "Zebra qx 12345 cats",
    "line one\nline two", "naïve café € 😀", "two  spaces", "trailing space ",
])
def test_encoding_equals_sentencepiece_and_round_trips(trained, text):
    out, tok = trained
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == sp.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids  # byte fallback covers unseen characters


def test_word_start_marker_and_newline_byte(trained):
    _, tok = trained
    assert tok.tokenize("cat dog") == ["▁cat", "▁dog"]
    assert "<0x0A>" in tok.tokenize("cat\ndog")
    assert not any("\n" in piece for piece in tok.get_vocab())


def test_image_token_is_one_token(trained):
    _, tok = trained
    pieces = tok.tokenize("USER: <image>\nWhat is this?")
    assert pieces.count("<image>") == 1
    assert "<0x3C>" not in pieces  # no stray '<' byte: the special token was not split


def test_training_is_deterministic_and_replaces_the_folder(tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    first = train_tokenizer(_corpus(), out, vocab_size=360).get_vocab()
    assert not (out / "stale.txt").exists()
    assert train_tokenizer(_corpus(), tmp_path / "again", vocab_size=360).get_vocab() == first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="vocab_size 100"):
        train_tokenizer(_corpus(), tmp_path / "a", vocab_size=100)
    with pytest.raises(ValueError, match="no non-empty training text"):
        train_tokenizer(["", "  \n"], tmp_path / "b", vocab_size=300)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
