"""``cites_context`` and ``own_words``: the answer quotes the words of the context that answer the
question, and pastes no more.

Copying context is cheap: an answer stuffed with retrieved text looks grounded to a counter of
shared words. So a quote counts only when it is *relevant*, and copying beyond what the answer needs
is charged against it:

- a quote is a run of at least ``min_words`` consecutive words that also appear consecutively in a
  retrieved chunk (words as ``text.tokens`` reads them: Unicode normalised, so hidden characters do
  not break a run);
- it is relevant when it overlaps the probe's source span (the chunk's ``doc``/``start``/``end``
  against the probe's ``source_doc``/``source_start``/``source_end``); when the source span is
  unknown (``selftune judge`` items), when at least half of its content words are the reference's
  (the question's, if there is no reference): what a quote that supports the answer looks like;
  and never when it is only the question's words (an echo of the question quotes nothing);
- the need is the reference's length in words (else the source span's), plus ``min_words`` of slack;
  the *excess* is what is pasted beyond it: relevant words past the need, irrelevant ones past
  ``2 * min_words`` (an incidental phrase is free), and every word of the question repeated (a run
  of at least 80% of it: the question is given, not said);
- ``cites_context`` = 1 - excess / (the answer's words) when a quote is relevant, and 0 when none is
  or the answer contradicts the reference (``reference.contradiction``): a quote turned against its
  source supports nothing. Stuffing earns nothing, and the score falls as the answer becomes
  copied context;
- ``own_words`` = 1 - excess / (the answer's words), whether or not it quotes: an answer that pastes
  context it does not need scores below one that pastes nothing. (A judge model tends to read pasted
  context as grounded; this is the sensor that says otherwise.)

``Copies.unpasted`` is the answer without what it pasted, when it pasted more than it needs:
``reference_match`` scores that, so pasting the whole context cannot buy agreement with the reference.
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


class Copies:
    """Which of the answer's words (``text.tokens``) are copied from the retrieved context, in runs of
    at least ``min_words``, and which of those runs are relevant (see the module docstring)."""

    def __init__(self, answer: Answer, min_words: int):
        p, m = answer.probe, min_words
        self.min_words = m
        self.words = aw = tokens(answer.text)
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
        # the question repeated (a run of at least 80% of its words) is pasted too: it is given, not said
        qw = tokens(p.question)
        self.echoed = [False] * len(aw)
        for j in range(len(aw)):
            for k in range(len(qw)):
                n = 0
                while j + n < len(aw) and k + n < len(qw) and aw[j + n] == qw[k + n]:
                    n += 1
                if n >= max(m, 0.8 * len(qw)):
                    self.echoed[j:j + n] = [True] * n
        self.copied = copied = [c and not e for c, e in zip(copied, self.echoed)]
        target, asked = set(content(p.reference or p.question)), set(content(p.question))
        self.relevant = [False] * len(aw)
        j = 0
        while j < len(aw):  # maximal runs of copied words
            if not copied[j]:
                j += 1
                continue
            k = j
            while k < len(aw) and copied[k]:
                k += 1
            words = content(" ".join(aw[j:k]))
            says = set(words) - asked  # a run of the question's own words answers nothing (an echo)
            if says and (any(on_source[j:k]) if p.source_doc else
                         sum(w in target for w in words) >= max(1, len(words) / 2)):
                self.relevant[j:k] = [True] * (k - j)
            j = k
        #: what the answer needs to copy at most: the reference's length (else the source span's), plus slack
        self.need = (len(tokens(p.reference)) if p.reference else need_source or len(aw)) + m

    @property
    def excess(self) -> int:
        """Pasted words beyond the need: relevant ones past it, irrelevant ones past ``2 * min_words``
        (an incidental phrase is free), and every word of the question repeated."""
        relevant = sum(self.relevant)
        irrelevant = sum(self.copied) - relevant
        return max(0, irrelevant - 2 * self.min_words) + max(0, relevant - self.need) + sum(self.echoed)

    def unpasted(self) -> str:
        """The answer without what it copied, when it copied more than it needs (else the answer)."""
        if not self.excess:
            return " ".join(self.words)
        return " ".join(w for w, c in zip(self.words, self.copied) if not c)


def cites(answer: Answer, min_words: int) -> Score:
    p = answer.probe
    if not p.answerable:
        return Score(status="n/a", rationale="unanswerable probe: nothing to cite")
    copies = Copies(answer, min_words)
    n_copied, relevant = sum(copies.copied), sum(copies.relevant)
    if not n_copied:
        return Score(value=0.0, raw=0, rationale=f"no run of {min_words} words from any retrieved context")
    if relevant == 0:
        return Score(value=0.0, raw=0, rationale=f"copies {n_copied} words of context, none that answer the question")
    if p.reference:
        why = contradiction(answer.text, p.reference, p.question)
        if why is not None:
            return Score(value=0.0, raw=relevant, rationale=f"quotes the source but contradicts it: {why}"[:300])
    value = max(0.0, 1.0 - copies.excess / len(copies.words))
    return Score(value=value, raw=relevant, rationale=f"quotes {relevant} relevant words; {copies.excess} of "
                                                      f"{n_copied} copied words beyond the need: {value:.2f}")


def own(answer: Answer, min_words: int) -> Score:
    copies = Copies(answer, min_words)
    if not copies.words:
        return Score(status="n/a", rationale="no answer words")
    value = max(0.0, 1.0 - copies.excess / len(copies.words))
    return Score(value=value, raw=copies.excess,
                 rationale=f"{copies.excess} of {len(copies.words)} words are context pasted beyond the need "
                           f"({sum(copies.relevant)} copied words answer the question)")
