"""Deterministic checks (computational sensors): a closed catalogue, each ``(spec, answer) -> Score``.

They cost nothing, cannot be flattered, and are the signal that still works when the judge model is
too small to tell right from wrong.
"""

from __future__ import annotations

import re
from collections import Counter

from .quotes import Copies, cites, own
from .records import Answer, Score
from .reference import consistent_f1, contradiction
from .rubric import Abstains, CheckSpec, CitesContext, OwnWords, ReferenceMatch, Regex, RetrievalHit, WordBounds

_WORD = re.compile(r"[a-z0-9_]+")
PASTE_WORDS = 4  # a run this long copied from the context counts as pasted (reference_match: consistent)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style token F1 between two texts."""
    p, r = words(pred), words(ref)
    if not p or not r:
        return 0.0
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def run_check(spec: CheckSpec, answer: Answer) -> Score:
    text = answer.text
    if isinstance(spec, WordBounds):
        n = len(text.split())
        ok = spec.min <= n <= spec.max
        return Score(value=float(ok), raw=n,
                     rationale=f"{n} words; bounds [{spec.min}, {spec.max}] {'met' if ok else 'not met'}")
    if isinstance(spec, Regex):
        pattern = spec.must or spec.must_not or ""
        found = re.search(pattern, text) is not None
        ok = found if spec.must else not found
        what = "must match" if spec.must else "must not match"
        return Score(value=float(ok), raw=float(found),
                     rationale=f"/{pattern}/ {what}: {'found' if found else 'not found'}")
    if isinstance(spec, RetrievalHit):
        p = answer.probe
        if not p.source_doc:
            return Score(status="n/a", rationale="probe has no known source span")
        ranks = [i + 1 for i, c in enumerate(answer.contexts) if c.overlaps(p.source_doc, p.source_start, p.source_end)]
        if ranks:
            return Score(value=1.0, raw=ranks[0], rationale=f"source span retrieved at rank {ranks[0]}")
        return Score(value=0.0, raw=0, rationale=f"source span not among {len(answer.contexts)} retrieved chunks")
    if isinstance(spec, ReferenceMatch):
        ref = answer.probe.reference
        if not ref:
            return Score(status="n/a", rationale="probe has no reference answer")
        if spec.method == "no_contradiction":
            why = contradiction(text, ref, answer.probe.question)
            return Score(value=float(why is None), raw=float(why is None),
                         rationale=f"contradicts the reference: {why}"[:300] if why else "no contradiction found")
        if spec.method == "consistent":
            copies = Copies(answer, PASTE_WORDS)
            value, why = consistent_f1(text, ref, answer.probe.question, copies.unpasted() if copies.excess else None)
            return Score(value=value, raw=value, rationale=why)
        if spec.method == "f1":
            f1 = token_f1(text, ref)
            return Score(value=f1, raw=f1, rationale=f"token F1 with the reference = {f1:.2f}")
        inside = " ".join(words(ref)) in " ".join(words(text))
        return Score(value=float(inside), raw=float(inside),
                     rationale=f"reference {'contained' if inside else 'not contained'} in the answer")
    if isinstance(spec, CitesContext):
        return cites(answer, spec.min_words)
    if isinstance(spec, OwnWords):
        return own(answer, spec.min_words)
    if isinstance(spec, Abstains):
        said = re.search(spec.pattern, text) is not None
        should = not answer.probe.answerable
        ok = said == should
        what = ("abstained" if said else "answered") + (" on an unanswerable probe" if should else "")
        return Score(value=float(ok), raw=float(said), rationale=f"{what}: {'right' if ok else 'wrong'}")
    raise TypeError(f"unknown check spec {type(spec).__name__}")  # pragma: no cover - closed union
