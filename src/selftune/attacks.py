"""Attack flags: what an answer does to game its grader rather than to answer the question.

Computed once per item, from the answer text (and the question, for echoes). A flagged item's overall
score is capped (``judge.flag_cap``) whatever its criteria say; the flags are recorded on the
``Judgment`` and on every model-scored ``Score``.
"""

from __future__ import annotations

import re

# Patterns that look like an answer talking to its grader rather than to the user.
_SUSPICIOUS = [
    (re.compile(r"ignore (all |the |any |your )?(previous|above|prior|rubric|instructions|criteria)", re.I), "injection:ignore"),
    (re.compile(r"\b(give|assign|award|deserves?|grade (it|this|me))\b[^.\n]{0,40}"
                r"\b(a 5|5/5|10/10|five|full marks|(maximum|highest|perfect|top) (score|grade|mark|rating)|score of (5|10))\b",
                re.I), "injection:score-request"),
    # A fake fence: a word inside double angle brackets (shift operators like `x << 2` do not match).
    (re.compile(r"<</?\s*[A-Za-z][\w-]{2,}\s*>>|\bDATA-[0-9a-f]{6,}", re.I), "injection:fake-fence"),
    (re.compile(r"\b(as an ai|you are (a|the) (grader|judge|evaluator)|dear (judge|grader|evaluator)|"
                r"^\s*(system|assistant)\s*:)", re.I | re.M), "injection:addresses-grader"),
    (re.compile(r"^\s*(thought process|thoughts?|reasoning|let'?s think)[^\n]{0,20}:", re.I), "degenerate:thought-process"),
]
_WORDS = re.compile(r"[A-Za-z0-9_]+")
# Phrases that make an answer look thorough without saying anything.
_FILLER = re.compile(r"\b(it is (important|worth) (to note|noting)|in conclusion|to summari[sz]e|furthermore|"
                     r"as (mentioned|discussed|noted) (above|earlier|before)|comprehensive|thorough|"
                     r"in (great|full) detail|every aspect)\b", re.I)


def attack_flags(answer: str, question: str = "") -> tuple[str, ...]:
    """What an answer does to game its grader rather than to answer: injected instructions, fake
    fences, a degenerate reply (no words, a bare label), the question echoed back, or padding
    (the same words over and over). Flagged items are capped (``judge.flag_cap``), whatever they score."""
    flags = [flag for pattern, flag in _SUSPICIOUS if pattern.search(answer)]
    words = [w.lower() for w in _WORDS.findall(answer)]
    if not words:
        flags.append("degenerate:no-content")
    q = {w.lower() for w in _WORDS.findall(question)}
    if words and q and set(words) <= q:  # says nothing the question did not
        flags.append("echo:question")
    if len(words) >= 30 and len(set(words)) / len(words) < 0.45:
        flags.append("padding:repetitive")
    if len(_FILLER.findall(answer)) >= 2:
        flags.append("padding:filler")
    return tuple(dict.fromkeys(flags))
