"""Text as the checks and the attack flags read it: Unicode normalised, tokenised, stemmed.

``normalize`` folds what an attacker uses to hide words from a pattern: compatibility forms
(full-width ``Ｓｃｏｒｅ``, mathematical letters, ligatures) by NFKC, invisible format characters
(zero-width spaces and joiners, soft hyphens, bidi controls) by deletion, and letters of other
scripts that look Latin (Cyrillic ``о``, Greek ``Α``) by the Unicode confusables table
(``confusable-homoglyphs``). Text that is already plain ASCII is returned unchanged.
"""

from __future__ import annotations

import re
import unicodedata
from functools import cache

# Function words: they carry no claim, so agreement on them is not agreement. Negation cues and
# the words of the antonym list are deliberately absent (they are read separately).
STOPWORDS = frozenset("""
a an the this that these those it its it's they them their there here he she we you your our i me my
is are was were be been being am do does did doing done has have had having will would shall should
can could may might must of in on at by for to from with as into onto upon over about than then so
and or but if also just only even very too much many more most some any each every all both either
such same other another own which who whom whose what when where why how while whereas although though
because since until unless whether s t d ll m re ve something anything everything someone anyone one
""".split())
NEGATIONS = frozenset("not no never nothing none neither nor nobody nowhere cannot without noone excluding "
                      "rather_not instead_not".split())
# Capitalised None is Python's None (a value), unless it starts "None of ...".
_PY_NONE = re.compile(r"\bNone\b(?!\s+of\b)")
NOT_NEGATION = re.compile(r"\b(not only|no matter|no doubt|whether or not|or not)\b", re.I)
_TOKEN = re.compile(r"[a-z0-9_]+(?:['\u2019][a-z]+)?")


@cache
def _fold(ch: str) -> str:
    """The ASCII letter an other-script letter looks like, else the letter itself."""
    from confusable_homoglyphs import confusables

    found = confusables.is_confusable(ch, greedy=True, preferred_aliases=["latin"])
    if not found:
        return ch
    for glyph in found[0]["homoglyphs"]:
        c = glyph["c"]
        if len(c) == 1 and c.isascii() and c.isalpha():
            # the table gives capital iota as lower-case l; keep an upper-case letter upper-case
            return "I" if c == "l" and ch.isupper() else c
    return ch


def normalize(text: str) -> str:
    """NFKC, format characters (Unicode category Cf) removed, Latin look-alikes folded to ASCII."""
    if text.isascii():
        return text
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return "".join(_fold(ch) if not ch.isascii() and ch.isalpha() else ch for ch in text)


def tokens(text: str) -> list[str]:
    """Lower-cased word tokens of the normalised text; ``doesn't`` stays one token (a negation)."""
    return _TOKEN.findall(normalize(text).lower())


def python_none(text: str) -> str:
    """``None`` the value spelled so it is not read as the negation ``none``."""
    return _PY_NONE.sub("None_value", text)


@cache
def _stemmer() -> object:
    from nltk.stem.porter import PorterStemmer

    return PorterStemmer()


@cache
def stem(word: str) -> str:
    """Porter stem (``executed``, ``executes``, ``executing`` -> ``execut``)."""
    return _stemmer().stem(word)  # type: ignore[attr-defined]


def is_negation(token: str) -> bool:
    return token in NEGATIONS or token.endswith(("n't", "n\u2019t"))


def negated(text: str) -> bool:
    """Does the text carry a negation cue (``not``, ``never``, ``nothing``, ``doesn't``, ``without``...)?
    ``not only``, ``no matter`` and ``no doubt`` are not negations."""
    return any(is_negation(t) for t in tokens(NOT_NEGATION.sub(" ", normalize(text).lower())))


def content(text: str) -> list[str]:
    """Stems of the content words: no function words, no negation cues, contractions split off."""
    out = []
    for t in tokens(python_none(text)):
        t = re.split(r"['\u2019]", t)[0]
        if t in STOPWORDS or is_negation(t) or t in NEGATIONS:
            continue
        out.append(stem(t))
    return out
