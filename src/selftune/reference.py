"""Agreement with the reference answer that a negation or a swapped fact cannot fool.

Token F1 rewards a copy of the reference with ``not`` slipped in: every word matches. This sensor
(``reference_match`` ``method: consistent``) needs no model. It first looks for a *contradiction*
between the answer and the reference, clause by clause: each answer clause is paired with each
reference clause that says nearly the same thing (they share most of their content words, counting
a swapped number, name or antonym as a shared slot, and not only the words the question already
used). In a paired clause it is a contradiction when

- the polarity differs (one is negated: ``not``, ``never``, ``nothing``, ``without``, ``doesn't``...)
  an odd number of times, counting each antonym swap (``true``/``false``, ``before``/``after``,
  ``mutable``/``immutable``) as one more flip, so ``not mutable`` agrees with ``immutable``;
- a number differs (``1000`` vs ``100``, ``two`` vs ``3``);
- a name differs (identifiers such as ``AssertionError`` vs ``ValueError``, ``__exit__`` vs
  ``__enter__``, dotted or back-quoted names, capitalised proper names), unless the other text spells
  the name out in words.

A contradiction scores 0. Otherwise the score is the F1 of the content words' stems (no function
words, so ``the``/``is`` earn nothing), without the words the question already used (echoing the
question earns nothing), unless that would leave the reference empty.

What it cannot see: a wrong claim in other words (``pass skips the loop``), a true reference sentence
appended to a false claim, negation by a verb outside the antonym list. The labelled set
``datasets/reference/agreement.jsonl`` measures it (``tests/test_reference.py``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from .text import NOT_NEGATION, STOPWORDS, content, is_negation, normalize, stem, tokens

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({"thirty": "30", "forty": "40", "fifty": "50", "hundred": "100", "thousand": "1000",
                      "million": "1000000", "once": "1", "twice": "2", "single": "1", "double": "2"})
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w])")
# Pairs whose swap turns a statement into its opposite (the implicit negatives, such as skip/run,
# pair with their positive, so "skips the else clause" agrees with "the else clause does not run").
ANTONYMS = tuple(tuple(p.split("/")) for p in """
true/false before/after first/last left/right increase/decrease increment/decrement enable/disable
always/sometimes inside/outside minimum/maximum min/max more/less more/fewer larger/smaller greater/less
greater/smaller higher/lower start/end begin/end open/close opened/closed input/output read/write
required/optional allowed/forbidden allow/forbid allow/disallow allow/prevent positive/negative even/odd
upper/lower local/global public/private synchronous/asynchronous sync/async valid/invalid include/exclude
success/failure succeed/fail accept/reject add/remove inner/outer innermost/outermost nearest/outermost
nearest/farthest same/different explicit/implicit static/dynamic ascending/descending top/bottom
earlier/later above/below enter/exit entry/exit push/pop lock/unlock encode/decode import/export
mutable/immutable hashable/unhashable ordered/unordered bound/unbound defined/undefined visible/invisible
empty/nonempty zero/nonzero present/absent lazy/eager lazily/eagerly shallow/deep strong/weak
skip/run skip/execute skip/evaluate omit/include ignore/handle lack/have keep/discard keep/drop
keep/lose create/destroy create/delete save/discard copy/move copy/reference new/existing new/old
raise/suppress raise/catch handled/unhandled caught/uncaught catch/propagate
""".split())
_OPPOSITE: dict[str, set[str]] = {}
for _a, _b in ANTONYMS:
    _OPPOSITE.setdefault(stem(_a), set()).add(stem(_b))
    _OPPOSITE.setdefault(stem(_b), set()).add(stem(_a))
_NAME = re.compile(r"`([^`\n]{1,60})`|\b[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+(?:\(\))?|\b\w*_\w*\b|\b\w+\(\)"
                   r"|\b[A-Za-z]*[a-z][A-Z]\w*|\b[A-Z][A-Z0-9]{1,}\b")
_PREFIXES = ("un", "in", "im", "ir", "il", "non", "dis")
_PROPER = re.compile(r"(?<=[a-z0-9,;] )[A-Z][a-z]{2,}\b")
_NOT_NAMES = {"e.g", "i.e", "etc", "vs"}
_CLAUSE = re.compile(r"[.!?;:]+(?=\s|$)|\n+|,?\s+(?:and|but|whereas|although|though|however|yet)\s+", re.I)
# Words that end a negation's reach ("X is a null operation that does nothing": "nothing" is about
# what X does, not about "null operation").
_BOUNDARY = frozenset("that which who whom whose when whenever if because so where while unless until since "
                      "then after before".split())
_WORD = re.compile(r"[A-Za-z0-9_]+(?:['\u2019][A-Za-z]+)?")


@dataclass(frozen=True)
class Clause:
    text: str
    content: frozenset[str]  # stems of content words, numbers left out
    words: frozenset[str]  # stems of every token (antonyms hide among function words: before/after)
    raw: frozenset[str]  # lower-case tokens (prefix antonyms: mutable/immutable)
    numbers: frozenset[str]
    names: frozenset[str]  # identifiers and proper names, lower-case
    scope: frozenset[str]  # content stems a negation cue reaches (empty: not negated)


def _numbers(text: str) -> frozenset[str]:
    found = {n.rstrip("0").rstrip(".") if "." in n else n for n in _NUMBER.findall(text)}
    found |= {_NUMBER_WORDS[t] for t in tokens(text) if t in _NUMBER_WORDS}
    return frozenset(found)


def _names(text: str) -> frozenset[str]:
    found = {(m.group(1) or m.group(0)).strip("`").lower() for m in _NAME.finditer(text)}
    found |= {m.group(0).lower() for m in _PROPER.finditer(text)}
    return frozenset(n for n in found if len(n) > 1 and not n.isdigit() and n not in _NOT_NAMES)


def _scan(part: str) -> tuple[list[str], frozenset[str]]:
    """(content stems in order, the stems within reach of a negation cue). A cue reaches the next
    three content words, or, at the end of its clause, the two before it, never across a boundary
    word. ``None`` inside a sentence is Python's None, not a negation."""
    seq: list[tuple[str, str]] = []
    for i, m in enumerate(_WORD.finditer(NOT_NEGATION.sub(" ", part))):
        t, low = m.group(0), m.group(0).lower()
        if is_negation(low) and not (t == "None" and i > 0):
            seq.append(("neg", low))
        elif low in _BOUNDARY:
            seq.append(("cut", low))
        elif low in STOPWORDS or _NUMBER.fullmatch(low) or low in _NUMBER_WORDS:
            seq.append(("stop", low))
        else:
            seq.append(("word", stem(re.split(r"['\u2019]", low)[0])))
    reach: set[str] = set()
    for i, (kind, _) in enumerate(seq):
        if kind != "neg":
            continue
        for direction, n in ((1, 3), (-1, 2)):
            got, j = [], i + direction
            while 0 <= j < len(seq) and seq[j][0] != "cut" and len(got) < n:
                if seq[j][0] == "word":
                    got.append(seq[j][1])
                j += direction
            reach.update(got)
            if got:
                break
    return [v for k, v in seq if k == "word"], frozenset(reach)


def clauses(text: str) -> list[Clause]:
    """The text cut at sentence ends, semicolons, colons and coordinating conjunctions."""
    out = []
    for part in _CLAUSE.split(normalize(text)):
        if not part or not part.strip():
            continue
        words, reach = _scan(part)
        raw = tokens(part)
        out.append(Clause(text=part.strip(), content=frozenset(words), words=frozenset(stem(t) for t in raw),
                          raw=frozenset(raw), numbers=_numbers(part), names=_names(part), scope=reach))
    return out


def _spelled(name: str, other: str) -> bool:
    """Is ``name`` present in the other text, possibly spelled out (``AssertionError`` ~ assertion error)?"""
    key = re.sub(r"[^a-z0-9]", "", name)
    squashed = re.sub(r"[^a-z0-9]", "", other.lower())
    return key in squashed if len(key) >= 3 else key in tokens(other)


def _antonym_swaps(a: Clause, r: Clause) -> list[tuple[str, str]]:
    """(reference word, answer word) pairs where the answer puts the opposite word."""
    only_r, only_a = r.words - a.words, a.words - r.words
    swaps = [(x, y) for x in sorted(only_r) for y in sorted(only_a) if y in _OPPOSITE.get(x, ())]
    for x in sorted(r.raw - a.raw):
        for y in sorted(a.raw - r.raw):
            if any(y == p + x or x == p + y for p in _PREFIXES):
                swaps.append((stem(x), stem(y)))
    return list(dict.fromkeys(swaps))


def _paired(a: Clause, r: Clause, question: frozenset[str], slots: int) -> bool:
    """Do two clauses say nearly the same thing (so a flipped polarity or a changed fact between them
    is a contradiction, not a different topic)?"""
    shared = a.content & r.content
    size = max(len(a.content), len(r.content))
    hits = len(shared) + slots
    if size == 0 or hits < min(2, size) or hits < 0.5 * size:
        return False
    # sharing only the question's words (the topic) is not saying the same thing, unless there is
    # nothing else to share (a yes/no question: "tuples are hashable" vs "tuples are not hashable")
    return bool(shared - question) or slots > 0 or (a.content | r.content) <= question


def contradiction(answer: str, reference: str, question: str = "") -> str | None:
    """Why the answer contradicts the reference (one line), or None when no signal is found."""
    q = frozenset(content(question))
    ref_clauses = clauses(reference)
    for a in clauses(answer):
        for r in ref_clauses:
            swaps = _antonym_swaps(a, r)
            names_r = {n for n in r.names - a.names if not _spelled(n, answer)}
            names_a = {n for n in a.names - r.names if not _spelled(n, reference)}
            slots = len(swaps) + min(len(names_r), len(names_a))
            if not _paired(a, r, q, slots):
                continue
            # a negation counts where it reaches what the two clauses share (or a swapped word)
            shared = a.content & r.content
            neg_a = bool(a.scope & (shared | {y for _, y in swaps}))
            neg_r = bool(r.scope & (shared | {x for x, _ in swaps}))
            if (neg_a != neg_r) ^ (len(swaps) % 2 == 1):
                what = (f"{swaps[0][1]!r} where the reference has {swaps[0][0]!r}" if swaps and neg_a == neg_r
                        else "a negation the reference does not have" if neg_a else "the reference's negation dropped")
                return f"{what}, in {a.text!r}"
            if a.numbers and r.numbers and a.numbers - r.numbers and r.numbers - a.numbers:
                return (f"number {sorted(a.numbers - r.numbers)[0]} where the reference has "
                        f"{sorted(r.numbers - a.numbers)[0]}, in {a.text!r}")
            if names_r and names_a:
                return f"name {sorted(names_a)[0]!r} where the reference has {sorted(names_r)[0]!r}, in {a.text!r}"
    return None


def content_f1(answer: str, reference: str, question: str = "") -> float:
    """F1 of content-word stems, without the question's words (unless none of the reference's remain)."""
    q = set(content(question))
    a, r = content(answer), content(reference)
    if [w for w in r if w not in q]:
        a, r = [w for w in a if w not in q], [w for w in r if w not in q]
    if not a or not r:
        return 0.0
    common = sum((Counter(a) & Counter(r)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(a), common / len(r)
    return 2 * prec * rec / (prec + rec)


def consistent_f1(answer: str, reference: str, question: str = "") -> tuple[float, str]:
    """(score, rationale): 0 on a contradiction, else the content-word F1."""
    why = contradiction(answer, reference, question)
    if why is not None:
        return 0.0, f"contradicts the reference: {why}"[:300]
    f1 = content_f1(answer, reference, question)
    return f1, f"content-word F1 with the reference = {f1:.2f}; no contradiction found"
