"""Train a tiny LLaMA-style SentencePiece tokenizer and save it as a transformers tokenizer.

For tests and the synthetic world, where no pretrained tokenizer can be downloaded. The
model follows LLaMA's SentencePiece settings: byte fallback (no token is ever <unk> for
real text), '▁' marks a word start (dummy prefix), ids <unk>=0, <s>=1, </s>=2, digits split,
no text normalisation, and newlines only as the byte token <0x0A>. Extra special tokens
("<image>", then "<pad>", as in llava-hf checkpoints) get the ids after the pieces.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from typing import Iterable, Sequence

LLAMA_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": False,
}


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int,
                    extra_special_tokens: Sequence[str] = ("<image>",),
                    pad_token: str | None = "<pad>",
                    max_piece_length: int = 16):
    """Train a SentencePiece BPE model on `texts`; save it as a transformers tokenizer.

    BPE only: transformers' LlamaTokenizer rebuilds a BPE tokenizer from the SentencePiece
    model, which would mis-tokenize a unigram model.

    Args:
      texts: training documents; split on newlines into sentences.
      out_dir: folder to create (replaced whole if it exists) with tokenizer.json,
        tokenizer_config.json and the SentencePiece tokenizer.model.
      vocab_size: number of SentencePiece pieces, including <unk>, <s>, </s> and the 256
        byte pieces; a soft limit (fewer when the text has too few distinct pieces).
      extra_special_tokens: added after the pieces, in order, as special tokens.
      pad_token: added after them and set as the pad token (None: no pad token).
      max_piece_length: longest piece in characters.

    Returns:
      The tokenizer as loaded back by `transformers.AutoTokenizer.from_pretrained(out_dir)`.
      Training is deterministic: the same texts and arguments give the same vocabulary.
    """
    import sentencepiece as spm
    import transformers

    minimum = 3 + 256 + 1
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is below {minimum}: 3 control pieces and 256 "
                         f"byte pieces come first")
    sentences = [line for text in texts for line in text.split("\n") if line.strip()]
    if not sentences:
        raise ValueError("train_tokenizer: no non-empty training text")

    out_dir = pathlib.Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(work, 0o755)
    try:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_prefix=str(work / "tokenizer"),
                vocab_size=vocab_size, model_type="bpe", hard_vocab_limit=False,
                byte_fallback=True, character_coverage=1.0, split_digits=True,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                normalization_rule_name="identity", add_dummy_prefix=True,
                remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                max_sentencepiece_length=max_piece_length, max_sentence_length=1 << 16,
                shuffle_input_sentence=False, input_sentence_size=0, num_threads=1,
                minloglevel=2)
        except RuntimeError as e:
            raise ValueError(f"train_tokenizer: SentencePiece training failed with "
                             f"vocab_size={vocab_size}: {e}") from None
        (work / "tokenizer.vocab").unlink()
        _write_json(work / "tokenizer_config.json", LLAMA_TOKENIZER_CONFIG)
        # transformers converts the SentencePiece model to its own fast tokenizer here.
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(work))
        if extra_special_tokens:
            tokenizer.add_special_tokens({"extra_special_tokens": list(extra_special_tokens)})
        if pad_token is not None:
            tokenizer.add_special_tokens({"pad_token": pad_token})
        tokenizer.save_pretrained(str(work))
        _replace_dir(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return transformers.AutoTokenizer.from_pretrained(str(out_dir))


def _write_json(path: pathlib.Path, obj) -> None:
    import json
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _replace_dir(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Move `src` to `dst`, replacing an existing `dst` only once `src` is complete."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old.{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
