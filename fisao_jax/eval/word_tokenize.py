"""`nltk.word_tokenize` without the Punkt model data.

`nltk.word_tokenize(text)` = Punkt sentence splitting (needs the downloadable `punkt_tab`
data) followed by `NLTKWordTokenizer` on each sentence (pure regex, no data). The
sentence split matters because NLTKWordTokenizer only separates a period at the *end*
of its input: "a dog. the cat" gives "dog." unless the text is split after "dog.".

`split_sentences` re-implements Punkt's decision rule for the case the reference CHAIR
uses (lower-cased text) with a fixed abbreviation list instead of the trained English
model. Deviations from Punkt are limited to abbreviations missing from that list and
learnt collocations; they can change a token like "st." vs "st" + "." (so CHAIR's `Len`
by one token) but not the object words CHAIR counts.
"""
from __future__ import annotations

import functools
import re

from nltk.tokenize.destructive import NLTKWordTokenizer

# Common abbreviations of the English Punkt model (lower case, without final period).
_ABBREVIATIONS = frozenset((
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "rev", "gen", "col", "lt", "sgt",
    "capt", "gov", "sen", "rep", "inc", "co", "corp", "ltd", "vs", "etc", "e.g", "i.e",
    "a.m", "p.m", "u.s", "u.k", "u.n", "n.y", "d.c", "ave", "blvd", "rd", "mt", "ft",
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
    "no", "approx", "dept", "est", "fig", "mass", "calif", "fla", "ariz",
))
# Punkt's "non-word" characters: they end a word token and may follow a sentence end.
_NON_WORD = r"[)\";}\]*:@'({\[!?]"
_SENTENCE_END = re.compile(r"[.?!](?=(?P<after>" + _NON_WORD + r"|\s+(?P<next>\S+)))")
_PERIOD_TOKEN = re.compile(r"'?[^\s)\";}\]*:@'({\[!?]*\.$")
_NUMERIC = re.compile(r"^-?[.,]?\d[\d,.-]*\.?$")
_INITIAL = re.compile(r"[^\W\d]\.$")
_REALIGN = re.compile(r"[\"')\]}]+?(?:\s+|(?=--)|$)")


def _is_sentence_break(text: str, match: re.Match) -> bool:
    """Punkt's first+second pass verdict for the sentence-end character at `match`."""
    if match.group(0) in "?!":
        return True
    end = match.end()
    if text[end - 2 : end] == "..":  # ellipsis: a break only before a capital
        word = None
    else:
        start = end - 1
        while start > 0 and not text[start - 1].isspace():
            start -= 1
        found = _PERIOD_TOKEN.search(text[start:end])
        word = found.group(0) if found else "."
    next_tok = match.group("next") or match.group("after")
    next_upper = next_tok[:1].isupper()
    next_lower = next_tok[:1].islower()
    if word is None:
        return next_upper
    stem = word[:-1].lower()
    is_initial = _INITIAL.match(word) is not None
    if (stem in _ABBREVIATIONS or stem.split("-")[-1] in _ABBREVIATIONS) and not is_initial:
        return next_upper
    if is_initial or _NUMERIC.match(word.lower()):
        # Orthographic heuristic: a lower-case next word does not start a sentence.
        return not next_lower
    return True


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` as Punkt would split them (see module docstring)."""
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        if match.start() < start or not _is_sentence_break(text, match):
            continue
        sentences.append(text[start : match.end()])
        start = match.start("next") if match.group("next") else match.end()
    sentences.append(text[start:].rstrip())
    # Punkt moves closing quotes/brackets after a sentence end into that sentence.
    realigned: list[str] = []
    for sentence in sentences:
        moved = _REALIGN.match(sentence) if realigned else None
        if moved:
            realigned[-1] += moved.group(0).strip()
            sentence = sentence[moved.end() :]
        if sentence:
            realigned.append(sentence)
    return realigned


@functools.lru_cache(maxsize=1)
def _word_tokenizer() -> NLTKWordTokenizer:
    return NLTKWordTokenizer()


def word_tokenize(text: str) -> list[str]:
    """Word tokens of `text`, like `nltk.word_tokenize` (English) on lower-cased text."""
    tokenizer = _word_tokenizer()
    return [tok for sentence in split_sentences(text) for tok in tokenizer.tokenize(sentence)]
