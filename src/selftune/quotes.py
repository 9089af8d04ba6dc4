"""``cites_context``: the answer quotes the words of the context that answer the question, and no more.

Copying context is cheap: an answer stuffed with retrieved text looks grounded to a counter of
shared words. So a quote counts only when it is *relevant*, and copying beyond what the answer needs
is charged against it:

- a quote is a run of at least ``min_words`` consecutive words that also appear consecutively in a
  retrieved chunk (words as ``text.tokens`` reads them: Unicode normalised, so hidden characters do
  not break a run);
- it is relevant when it overlaps the probe's source span (the chunk's ``doc``/``start``/``end``
  against the probe's ``source_doc``/``source_start``/``source_end``), or when at least half of its
  content words are the reference's (the question's, if there is no reference), which is what a
  quote that supports the answer to this question looks like when the source span is unknown;
- the need is the reference's length in words (else the source span's), plus ``min_words`` of slack;
- score = 1 - (copied words beyond the need, irrelevant ones included) / (the answer's words), and
  0 when no quote is relevant or the answer contradicts the reference (``reference.contradiction``):
  a quote turned against its source supports nothing.
"""

from __future__ import annotations

import re

from .records import Answer, Chunk, Score
from .reference import contradiction
from .text import content, tokens

_TOKEN = re.compile(r"[a-z0-9_]+(?:['\u2019][a-z]+)?")


def _spans(chunk: Chunk) -> tuple[list[str], list[tuple[int, int]]]:
    """The chunk's words and their absolute character spans in its document."""
    found = list(_TOKEN.finditer(chunk.text.lower()))
    return [m.group(0) for m in found], [(chunk.start + m.start(), chunk.start + m.end()) for m in found]


def cites(answer: Answer, min_words: int) -> Score:
    p = answer.probe
    if not p.answerable:
        return Score(status="n/a", rationale="unanswerable probe: nothing to cite")
    aw = tokens(answer.text)
    m = min_words
    copied, on_source = [False] * len(aw), [False] * len(aw)
    need_source = 0
    for c in answer.contexts:
        cw, spans = _spans(c)
        grams: dict[tuple[str, ...], list[int]] = {}
        for k in range(len(cw) - m + 1):
            grams.setdefault(tuple(cw[k:k + m]), []).append(k)
        if p.source_doc and c.doc == p.source_doc:
            need_source = max(need_source, sum(p.source_start < e and s < p.source_end for s, e in spans))
        for j in range(len(aw) - m + 1):
            starts = grams.get(tuple(aw[j:j + m]))
            if not starts:
                continue
            hit = bool(p.source_doc) and c.doc == p.source_doc and any(
                spans[k][0] < p.source_end and p.source_start < spans[k + m - 1][1] for k in starts)
            for i in range(j, j + m):
                copied[i] = True
                on_source[i] = on_source[i] or hit
    if not any(copied):
        return Score(value=0.0, raw=0, rationale=f"no run of {m} words from any retrieved context")
    target = set(content(p.reference or p.question))
    relevant = 0
    j = 0
    while j < len(aw):  # maximal runs of copied words
        if not copied[j]:
            j += 1
            continue
        k = j
        while k < len(aw) and copied[k]:
            k += 1
        words = content(" ".join(aw[j:k]))
        if any(on_source[j:k]) or (words and sum(w in target for w in words) >= max(1, len(words) / 2)):
            relevant += k - j
        j = k
    n_copied = sum(copied)
    if relevant == 0:
        return Score(value=0.0, raw=0, rationale=f"copies {n_copied} words of context, none that answer the question")
    if p.reference:
        why = contradiction(answer.text, p.reference, p.question)
        if why is not None:
            return Score(value=0.0, raw=relevant, rationale=f"quotes the source but contradicts it: {why}"[:300])
    need = len(tokens(p.reference)) if p.reference else need_source or len(aw)
    excess = (n_copied - relevant) + max(0, relevant - need - m)
    value = max(0.0, 1.0 - excess / len(aw))
    return Score(value=value, raw=relevant,
                 rationale=f"quotes {relevant} relevant words; {excess} copied words beyond the need of {need}")
