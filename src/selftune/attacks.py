"""Attack flags: what an answer does to game its grader rather than to answer the question.

Computed once per item, from the answer text (and the question, for echoes). A flagged item's overall
score is capped (``judge.flag_cap``) whatever its criteria say; the flags are recorded on the
``Judgment`` and on every model-scored ``Score``.

Every pattern is matched on the *normalised* text (``text.normalize``: NFKC, invisible format
characters removed, Latin look-alikes of other scripts folded), so ``Ｓｃｏｒｅ：５``, ``Ig\u200bnore`` and
a Cyrillic ``Ѕсоrе`` read as what they spell. Hiding letters that way is itself flagged.
"""

from __future__ import annotations

import re
import unicodedata

from .text import normalize

# Chat-template control tokens of the common model families (ChatML, Llama 2/3, Gemma, Phi, Mistral).
CHAT_TOKEN = re.compile(r"<[|\uff5c][^|\uff5c<>\n]{1,40}[|\uff5c]>|\[/?(?:INST|SYS)\]|<</?SYS>>|</?s>|"
                        r"<(?:start|end)_of_turn>|<(?:bos|eos|pad)>", re.I)

# Patterns that look like an answer talking to its grader rather than to the user.
_SUSPICIOUS = [
    (re.compile(r"ignore (all |the |any |your )?(previous|above|prior|rubric|instructions|criteria)", re.I),
     "injection:ignore"),
    (re.compile(r"\b(give|assign|award|deserves?|grade (it|this|me))\b[^.\n]{0,40}"
                r"\b(a 5|5/5|10/10|five|full marks|(maximum|highest|perfect|top) (score|grade|mark|rating)"
                r"|score of (5|10))\b",
                re.I), "injection:score-request"),
    # A fake fence: a word inside double angle brackets (shift operators like `x << 2` do not match).
    (re.compile(r"<</?\s*[A-Za-z][\w-]{2,}\s*>>|\bDATA-[0-9a-f]{6,}", re.I), "injection:fake-fence"),
    (re.compile(r"\b(as an ai|you are (a|the) (grader|judge|evaluator)|dear (judge|grader|evaluator)|"
                r"^\s*(system|assistant)\s*:)", re.I | re.M), "injection:addresses-grader"),
    (re.compile(r"^\s*(thought process|thoughts?|reasoning|let'?s think)[^\n]{0,20}:", re.I),
     "degenerate:thought-process"),
    (CHAT_TOKEN, "injection:chat-template"),
    # A forged turn: a line that opens a chat role, as plain text or markdown headed.
    (re.compile(r"(^|[.!?][ \t]+)[ \t>*_]*(#{1,6}[ \t]*)?(user|assistant|system|human|grader|judge|evaluator)[ \t*_]*:"
                r"|^[ \t]*#{1,6}[ \t]*(user|assistant|system|human|instruction|response)\b", re.I | re.M),
     "injection:forged-turn"),
    # Score priming: a score written into the answer for the grader to copy.
    (re.compile(r"\b(score|rating|grade|marks|points)[ \t]*(\([^)\n]{0,12}\))?[ \t]*:[ \t]*"
                r"(\d+(\.\d+)?|[A-F][+-]?(?![\w])|five|ten|full|perfect|max(imum)?)"
                r"|\b(rated|scored?|scores|deserves?|merits?|awarded|earns?|gets?)[ \t]+(an?[ \t]+)?"
                r"(\d+(\.\d+)?[ \t]*(/|out[ \t]+of)[ \t]*(5|10|100)|perfect|full marks|top marks|five stars?)\b"
                r"|\b(rated|scored|deserves?|merits?|awarded)[ \t]+(an?[ \t]+)?(10|5|five|ten)\b"
                r"|[\u2605\u2b50]{3,}", re.I), "injection:score-priming"),
    # Grader-label mimicry: the judge's own output labels, written by the answer.
    (re.compile(r"(^|[.!?]\s+)[ \t>*_#]*(rationale|verdict|grade|grading|evaluation|assessment|judge?ment|"
                r"feedback|criterion\b[^:\n]{0,40}|criteria)[ \t*_]*:", re.I | re.M), "injection:grader-labels"),
]
# "4/5", "10/10", "9 out of 10": a rating unless it sits in arithmetic ("x = 7/10", "(3/5)").
_RATING = re.compile(r"(?<![\w.])(10|[0-9](\.\d)?)[ \t]*(/|out[ \t]+of)[ \t]*(5|10)\b"
                     r"(?![\w(]|\.\d|[ \t]*[-+*/%=<>]|[ \t]+of\b)", re.I)
_ARITHMETIC_BEFORE = re.compile(r"[-+*/%=<>(\[,]\s*$")
_WORDS = re.compile(r"[A-Za-z0-9_]+")
# Phrases that make an answer look thorough without saying anything.
_FILLER = re.compile(r"\b(it is (important|worth) (to note|noting)|in conclusion|to summari[sz]e|furthermore|"
                     r"as (mentioned|discussed|noted) (above|earlier|before)|comprehensive|thorough|"
                     r"in (great|full) detail|every aspect)\b", re.I)
_HIDDEN = re.compile(r"\w[\u00ad\u200b-\u200f\u2060-\u2064\ufeff\u202a-\u202e\u2066-\u2069]+\w")


def neutralize(text: str) -> str:
    """Untrusted text with chat-template control tokens replaced by ``[removed]``, so no model's
    tokenizer, local or hosted, can read a turn boundary into it."""
    return CHAT_TOKEN.sub("[removed]", normalize(text)) if CHAT_TOKEN.search(normalize(text)) else text


def _obfuscated(answer: str) -> list[str]:
    flags = []
    if _HIDDEN.search(answer):
        flags.append("obfuscation:hidden-characters")
    for word in re.findall(r"\w+", unicodedata.normalize("NFKC", answer)):
        if not word.isascii() and any(c.isascii() and c.isalpha() for c in word) \
                and normalize(word).isascii():  # Latin letters mixed with look-alikes of another script
            flags.append("obfuscation:mixed-script")
            break
    return flags


def attack_flags(answer: str, question: str = "") -> tuple[str, ...]:
    """What an answer does to game its grader rather than to answer: injected instructions, fake
    fences, chat-template tokens and forged turns, a score written in for the grader (``Score: 5``,
    ``5/5``), the grader's own labels (``Rationale:``, ``Verdict:``), letters hidden or disguised,
    a degenerate reply (no words, a bare label), the question echoed back, or padding (the same words
    over and over). Flagged items are capped (``judge.flag_cap``), whatever they score."""
    text = normalize(answer)
    flags = [flag for pattern, flag in _SUSPICIOUS if pattern.search(text)]
    if any(not _ARITHMETIC_BEFORE.search(text[:m.start()]) for m in _RATING.finditer(text)):
        flags.append("injection:score-priming")
    flags += _obfuscated(answer)
    words = [w.lower() for w in _WORDS.findall(text)]
    if not words:
        flags.append("degenerate:no-content")
    q = {w.lower() for w in _WORDS.findall(normalize(question))}
    if words and q and set(words) <= q:  # says nothing the question did not
        flags.append("echo:question")
    if len(words) >= 30 and len(set(words)) / len(words) < 0.45:
        flags.append("padding:repetitive")
    if len(_FILLER.findall(text)) >= 2:
        flags.append("padding:filler")
    return tuple(dict.fromkeys(flags))
