"""Agreement with the reference answer that a negation or a swapped fact cannot fool.

Token F1 rewards a copy of the reference with ``not`` slipped in: every word matches. This sensor
(``reference_match`` ``method: consistent``) needs no model. It first looks for a *contradiction*
between the answer and the reference, clause by clause: each answer clause is paired with each
reference clause that says nearly the same thing (they share most of their content words, counting
a swapped number, name or antonym as a shared slot, and not only the words the question already
used). In a paired clause it is a contradiction when

- the polarity differs: one is negated (``not``, ``never``, ``nothing``, ``without``, ``rather
  than``, ``doesn't``...) where it reaches words the two share, and the other is not, or they carry
  a different number of negations on different words; each antonym swap (``true``/``false``,
  ``nearest``/``outermost``, ``mutable``/``immutable``) is one more flip, and two flips cancel, so
  ``not mutable`` agrees with ``immutable``. ``whether or not`` and ``not only`` are not negations;
  ``not ... until``/``none ... before`` say when ("does not run until next" = "runs after next");
- a number differs (``1000`` vs ``100``, ``two`` vs ``3``);
- a name differs (identifiers such as ``AssertionError`` vs ``ValueError``, ``__exit__`` vs
  ``__enter__``, dotted or back-quoted names, capitalised proper names), unless the other text spells
  the name out in words.

A contradiction scores 0. Otherwise the score is the F1 of the sets of content-word stems (no
function words, so ``the``/``is`` earn nothing; a word said twice counts once, so repetition earns
nothing), without the words the question already used (echoing the question earns nothing), unless
that would leave the reference empty.

What it cannot see: a wrong claim in other words (``pass skips the loop``), a true reference sentence
appended to a false claim, negation by a verb outside the antonym list. The labelled set
``datasets/reference/agreement.jsonl`` measures it (``tests/test_reference.py``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import cache

from .text import NOT_NEGATION, STOPWORDS, content, is_negation, normalize, python_none, stem, tokens

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({"thirty": "30", "forty": "40", "fifty": "50", "hundred": "100", "thousand": "1000",
                      "million": "1000000", "once": "1", "twice": "2"})
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w])")
# Pairs whose swap turns a statement into its opposite (the implicit negatives, such as skip/run,
# pair with their positive, so "skips the else clause" agrees with "the else clause does not run").
ANTONYMS = tuple(tuple(p.split("/")) for p in """
true/false before/after first/last left/right increase/decrease increment/decrement enable/disable
always/sometimes inside/outside minimum/maximum min/max more/less more/fewer larger/smaller greater/less
greater/smaller higher/lower up/down start/end begin/end open/close opened/closed input/output read/write
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


@cache
def _opposites() -> dict[str, frozenset[str]]:
    """Stem -> the stems of its antonyms."""
    out: dict[str, set[str]] = {}
    for a, b in ANTONYMS:
        out.setdefault(stem(a), set()).add(stem(b))
        out.setdefault(stem(b), set()).add(stem(a))
    return {k: frozenset(v) for k, v in out.items()}


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
_NOT_UNTIL = re.compile(r"(\b(?:not|never|none|no|nothing)\b|n['\u2019]t\b)([^.;:!?]*?)\b(?:until|before)\b", re.I)
_NARROW = frozenset("no without excluding rather_not instead_not".split())
_WORD = re.compile(r"[A-Za-z0-9_]+(?:['\u2019][A-Za-z]+)?|,")


@dataclass(frozen=True)
class Clause:
    text: str
    content: frozenset[str]  # stems of content words, numbers left out
    words: Counter[str]  # stems of every token, counted (antonyms hide among function words: before/after)
    raw: frozenset[str]  # lower-case tokens (prefix antonyms: mutable/immutable)
    numbers: frozenset[str]
    names: frozenset[str]  # identifiers and proper names, lower-case
    cues: tuple[frozenset[str], ...]  # per negation cue, the content stems it reaches


def _numbers(text: str) -> frozenset[str]:
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000
    found = {n.rstrip("0").rstrip(".") if "." in n else n for n in _NUMBER.findall(text)}
    found |= {_NUMBER_WORDS[t] for t in tokens(text) if t in _NUMBER_WORDS}
    return frozenset(found)


def _names(text: str) -> frozenset[str]:
    found = {(m.group(1) or m.group(0)).strip("`").lower() for m in _NAME.finditer(text)}
    found |= {m.group(0).lower() for m in _PROPER.finditer(text)}
    return frozenset(n for n in found if len(n) > 1 and not n.isdigit() and n not in _NOT_NAMES)


def _scan(part: str) -> tuple[list[str], tuple[frozenset[str], ...]]:
    """(content stems in order, per negation cue the stems it reaches). ``not``, ``never``,
    ``nothing``... reach three content words on and two back; ``no``, ``without``, ``rather than``
    reach the next two (what they govern). No reach crosses a comma or a boundary word (``that``,
    ``when``, ``so``...)."""
    seq: list[tuple[str, str]] = []
    for m in _WORD.finditer(part):
        low = m.group(0).lower()
        if low == ",":
            seq.append(("cut", low))
        elif is_negation(low):
            seq.append(("neg", low))
        elif low in _BOUNDARY:
            seq.append(("cut", low))
        elif low in STOPWORDS or _NUMBER.fullmatch(low) or low in _NUMBER_WORDS:
            seq.append(("stop", low))
        else:
            seq.append(("word", stem(re.split(r"['\u2019]", low)[0])))
    cues = []
    for i, (kind, cue) in enumerate(seq):
        if kind != "neg":
            continue
        reach: set[str] = set()
        for direction, n in ((1, 2),) if cue in _NARROW else ((1, 3), (-1, 2)):
            got, j = 0, i + direction
            while 0 <= j < len(seq) and seq[j][0] != "cut" and got < n:
                if seq[j][0] == "word":
                    reach.add(seq[j][1])
                    got += 1
                j += direction
        cues.append(frozenset(reach))
    return [v for k, v in seq if k == "word"], tuple(cues)


def _phrases(text: str) -> str:
    """Multi-word cues made single tokens, and phrases that only look negative rewritten: ``not ...
    until``/``none ... before`` say when, not whether ("does not run until next" = "runs after next")."""
    text = NOT_NEGATION.sub(" ", text)
    text = _NOT_UNTIL.sub(lambda m: f"{m.group(2)} after", text)
    text = re.sub(r"^\s*no\b\s*[,.!;]", " ", text, flags=re.I)  # "No, tuples are immutable": an answer word
    return re.sub(r"\b(rather) than\b|\b(instead) of\b", lambda m: f"{m.group(1) or m.group(2)}_not", text, flags=re.I)


def clauses(text: str) -> list[Clause]:
    """The text cut at sentence ends, semicolons, colons and coordinating conjunctions."""
    out = []
    for part in _CLAUSE.split(normalize(text)):
        if not part or not part.strip():
            continue
        part = _phrases(python_none(part))
        words, cues = _scan(part)
        raw = tokens(part)
        out.append(Clause(text=part.strip(), content=frozenset(words), words=Counter(stem(t) for t in raw),
                          raw=frozenset(raw), numbers=_numbers(part), names=_names(part), cues=cues))
    return out


def _present(name: str, other: str) -> bool:
    """Is ``name`` in the other text? A plain-word name (``AssertionError``, ``Guido``) may be spelled
    out there (``assertion error``); an identifier with ``_``, ``.`` or ``()`` must appear as it is."""
    if re.fullmatch(r"[a-z]+", name):
        return name in re.sub(r"[^a-z0-9]", "", other.lower()) if len(name) >= 3 else name in tokens(other)
    return name in other.lower()


def _antonym_swaps(a: Clause, r: Clause) -> list[tuple[str, str]]:
    """(reference word, answer word) pairs where the answer puts the opposite word."""
    only_r, only_a = set(r.words - a.words), set(a.words - r.words)
    swaps = [(x, y) for x in sorted(only_r) for y in sorted(only_a) if y in _opposites().get(x, ())]
    for x in sorted(r.raw - a.raw):
        for y in sorted(a.raw - r.raw):
            if any(y == p + x or x == p + y for p in _PREFIXES):
                swaps.append((stem(x), stem(y)))
    return list(dict.fromkeys(swaps))


def _flipped(a: Clause, r: Clause, swaps: list[tuple[str, str]]) -> bool:
    """Does the answer clause say the opposite of the reference clause? Only negations that reach
    what the two share count (a swapped word is one slot, named by the reference's word). One side
    negated and the other not flips the statement; so does a different number of negations on
    different words ("does not return None" against "without an expression returns None"); so does
    an antonym swap; two flips cancel ("not mutable" = "immutable")."""
    slot = {y: x for x, y in swaps}
    shared = (a.content & r.content) | set(slot.values())
    cues_a = [{slot.get(w, w) for w in c} & shared for c in a.cues]
    cues_a = [c for c in cues_a if c]
    cues_r = [c & shared for c in r.cues if c & shared]
    reach_a, reach_r = set().union(*cues_a), set().union(*cues_r)
    flipped = bool(cues_a) != bool(cues_r) or (len(cues_a) % 2 != len(cues_r) % 2 and reach_a != reach_r)
    return flipped != (len(swaps) % 2 == 1)


def _word(c: Clause, stemmed: str) -> str:
    """The clause's own word for a stem (for the rationale)."""
    return next((t for t in sorted(c.raw) if stem(t) == stemmed), stemmed)


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
    nums_a, nums_r = _numbers(answer), _numbers(reference)
    if nums_a and nums_r and not nums_a & nums_r:  # every number changed: "1000" -> "100", "3" -> "4"
        return f"number {sorted(nums_a)[0]} where the reference has {sorted(nums_r)[0]}"
    ref_clauses = clauses(reference)
    for a in clauses(answer):
        for r in ref_clauses:
            swaps = _antonym_swaps(a, r)
            names_r = {n for n in r.names - a.names if not _present(n, answer)}
            names_a = {n for n in a.names - r.names if not _present(n, reference)}
            slots = len(swaps) + min(len(names_r), len(names_a))
            if not _paired(a, r, q, slots):
                continue
            if _flipped(a, r, swaps):
                what = (f"{_word(a, swaps[0][1])!r} where the reference has {_word(r, swaps[0][0])!r}"
                        if swaps and bool(a.cues) == bool(r.cues) else "a negation the reference does not have"
                        if len(a.cues) > len(r.cues) else "the reference's negation dropped")
                return f"{what}, in {a.text!r}"
            if a.numbers and r.numbers and a.numbers - r.numbers and r.numbers - a.numbers:
                return (f"number {sorted(a.numbers - r.numbers)[0]} where the reference has "
                        f"{sorted(r.numbers - a.numbers)[0]}, in {a.text!r}")
            if names_r and names_a:
                return f"name {sorted(names_a)[0]!r} where the reference has {sorted(names_r)[0]!r}, in {a.text!r}"
    return None


def content_f1(answer: str, reference: str, question: str = "") -> float:
    """F1 of the sets of content-word stems (saying a word twice earns nothing), without the
    question's words (unless none of the reference's would remain)."""
    q = set(content(question))
    a, r = set(content(answer)), set(content(reference))
    if r - q:
        a, r = a - q, r - q
    common = len(a & r)
    if not common:
        return 0.0
    prec, rec = common / len(a), common / len(r)
    return 2 * prec * rec / (prec + rec)


def consistent_f1(answer: str, reference: str, question: str = "", own: str | None = None) -> tuple[float, str]:
    """(score, rationale): 0 on a contradiction, else the content-word F1 of ``own`` (the answer's own
    words, when it pasted more context than it needs: ``quotes.Copies.unpasted``) or of the answer."""
    why = contradiction(answer, reference, question)
    if why is not None:
        return 0.0, f"contradicts the reference: {why}"[:300]
    f1 = content_f1(answer if own is None else own, reference, question)
    pasted = "" if own is None else "; context pasted beyond the need left out"
    return f1, f"content-word F1 with the reference = {f1:.2f}{pasted}; no contradiction found"
