"""Noun singularisation that behaves exactly like `pattern.en.singularize` (Pattern 3.6).

The reference CHAIR implementation singularises every caption token with Pattern, and
its quirks change CHAIR numbers, so they are kept on purpose:

- a word that is a *suffix* of an uninflected/uncountable word is left as is
  ("ice" because of "advice", "ears" because of "shears");
- words of the -ie list come back *plural* ("cookies", "doggies" unchanged), and its
  "^pie"/"^tie" entries never match (literal caret), so "ties" -> "ty", "pies" -> "py";
- irregular plurals match as suffixes ("women" -> "woman", "shelves" -> "shelve",
  "your" -> "ymy");
- "bus" -> "bu" and "glass" -> "glas" (hence CHAIR's "wine glas" override);
- `([octop|vir])i$` is a character class ("spaghetti" -> "spaghettus").

Pattern itself is not a dependency (its install needs MySQL client libraries); the rule
tables below are transcribed from pattern/text/en/inflect.py (BSD licence; the rules
are adapted from Bermi Ferrer's Inflector, MIT licence).
"""
from __future__ import annotations

import functools
import re

# Prepositions that keep compound words like "mothers-in-law" inflecting on the head.
_PLURAL_PREPOSITIONS = frozenset((
    "about", "before", "during", "of", "till", "above", "behind", "except", "off", "to",
    "across", "below", "for", "on", "under", "after", "beneath", "from", "onto", "until",
    "among", "beside", "in", "out", "unto", "around", "besides", "into", "over", "upon",
    "at", "between", "near", "since", "with", "athwart", "betwixt", "beyond", "but", "by",
))

_SINGULAR_RULES = tuple((re.compile(pattern), replacement) for pattern, replacement in (
    (r"(?i)(.)ae$", r"\1a"),
    (r"(?i)(.)itis$", r"\1itis"),
    (r"(?i)(.)eaux$", r"\1eau"),
    (r"(?i)(quiz)zes$", r"\1"),
    (r"(?i)(matr)ices$", r"\1ix"),
    (r"(?i)(ap|vert|ind)ices$", r"\1ex"),
    (r"(?i)^(ox)en", r"\1"),
    (r"(?i)(alias|status)es$", r"\1"),
    (r"(?i)([octop|vir])i$", r"\1us"),
    (r"(?i)(cris|ax|test)es$", r"\1is"),
    (r"(?i)(shoe)s$", r"\1"),
    (r"(?i)(o)es$", r"\1"),
    (r"(?i)(bus)es$", r"\1"),
    (r"(?i)([m|l])ice$", r"\1ouse"),
    (r"(?i)(x|ch|ss|sh)es$", r"\1"),
    (r"(?i)(m)ovies$", r"\1ovie"),
    (r"(?i)(.)ombies$", r"\1ombie"),
    (r"(?i)(s)eries$", r"\1eries"),
    (r"(?i)([^aeiouy]|qu)ies$", r"\1y"),
    (r"([aeo]l)ves$", r"\1f"),
    (r"([^d]ea)ves$", r"\1f"),
    (r"arves$", "arf"),
    (r"erves$", "erve"),
    (r"([nlw]i)ves$", r"\1fe"),
    (r"(?i)([lr])ves$", r"\1f"),
    (r"([aeo])ves$", r"\1ve"),
    (r"(?i)(sive)s$", r"\1"),
    (r"(?i)(tive)s$", r"\1"),
    (r"(?i)(hive)s$", r"\1"),
    (r"(?i)([^f])ves$", r"\1fe"),
    (r"(?i)(^analy)ses$", r"\1sis"),
    (r"(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
    (r"(?i)(.)opses$", r"\1opsis"),
    (r"(?i)(.)yses$", r"\1ysis"),
    (r"(?i)(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
    (r"(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"),
    (r"(?i)(.)oses$", r"\1osis"),
    (r"(?i)([ti])a$", r"\1um"),
    (r"(?i)(n)ews$", r"\1ews"),
    (r"(?i)s$", ""),
))

_UNINFLECTED = (
    "bison", "debris", "headquarters", "pincers", "trout", "bream", "diabetes", "herpes",
    "pliers", "tuna", "breeches", "djinn", "high-jinks", "proceedings", "whiting",
    "britches", "eland", "homework", "rabies", "wildebeest", "carp", "elk", "innings",
    "salmon", "chassis", "flounder", "jackanapes", "scissors", "christmas", "gallows",
    "mackerel", "series", "clippers", "georgia", "measles", "shears", "cod", "graffiti",
    "mews", "species", "contretemps", "mumps", "swine", "corps", "news", "swiss",
)
_UNCOUNTABLE = (
    "advice", "equipment", "happiness", "luggage", "news", "software", "bread", "fruit",
    "information", "mathematics", "progress", "understanding", "butter", "furniture",
    "ketchup", "mayonnaise", "research", "water", "cheese", "garbage", "knowledge", "meat",
    "rice", "electricity", "gravel", "love", "mustard", "sand",
)
_IE_WORDS = (
    "alergie", "cutie", "hoagie", "newbie", "softie", "veggie", "auntie", "doggie", "hottie",
    "nightie", "sortie", "weenie", "beanie", "eyrie", "indie", "oldie", "stoolie", "yuppie",
    "birdie", "freebie", "junkie", "^pie", "sweetie", "zombie", "bogie", "goonie", "laddie",
    "pixie", "techie", "bombie", "groupie", "laramie", "quickie", "^tie", "collie", "hankie",
    "lingerie", "reverie", "toughie", "cookie", "hippie", "meanie", "rookie", "valkyrie",
)
# Insertion order matters only when two keys are suffixes of one word; none are.
_IRREGULAR = {
    "atlantes": "atlas", "atlases": "atlas", "axes": "axe", "beeves": "beef",
    "brethren": "brother", "children": "child", "corpora": "corpus", "corpuses": "corpus",
    "ephemerides": "ephemeris", "feet": "foot", "ganglia": "ganglion", "geese": "goose",
    "genera": "genus", "genii": "genie", "graffiti": "graffito", "helves": "helve",
    "kine": "cow", "leaves": "leaf", "loaves": "loaf", "men": "man", "mongooses": "mongoose",
    "monies": "money", "moves": "move", "mythoi": "mythos", "numena": "numen",
    "occipita": "occiput", "octopodes": "octopus", "opera": "opus", "opuses": "opus",
    "our": "my", "oxen": "ox", "penes": "penis", "penises": "penis", "people": "person",
    "sexes": "sex", "soliloquies": "soliloquy", "teeth": "tooth", "testes": "testis",
    "trilbys": "trilby", "turves": "turf", "zoa": "zoon",
}


@functools.lru_cache(maxsize=65536)
def singularize(word: str) -> str:
    """Singular form of `word`, identical to Pattern 3.6 `singularize(word)` (pos=NOUN).

    Case is preserved except where Pattern itself lower-cases (the -ie list).
    """
    if "-" in word:
        parts = word.split("-")
        if len(parts) > 1 and parts[1] in _PLURAL_PREPOSITIONS:
            return singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):
        return singularize(word[:-1]) + "'s"
    lower = word.lower()
    if any(x.endswith(lower) for x in _UNINFLECTED):
        return word
    if any(x.endswith(lower) for x in _UNCOUNTABLE):
        return word
    if any(lower.endswith(x + "s") for x in _IE_WORDS):
        return lower
    for plural, singular in _IRREGULAR.items():
        if lower.endswith(plural):
            return re.sub("(?i)" + plural + "$", singular, word)
    for suffix, replacement in _SINGULAR_RULES:
        if suffix.search(word):
            # Unmatched optional groups substitute as "" (Pattern strips their backrefs).
            return suffix.sub(replacement, word)
    return word
