"""Probe kinds: each with its own generation and its own known evidence, mixed by ``probes.mix``.

The embedded generator is SmolLM2-135M: it can turn one sentence into the question it answers (with a
schema and two demos), and little more. So only the *single* kind (and the base question of the
user-style kinds) asks the model; every other kind is built by extraction or a template around what
the corpus says, so its evidence is known by construction:

- ``single``: the generator writes the question one sentence answers (``probes.synthesize``'s way);
  reference: that sentence, source: its span.
- ``multi``: two sentences from two passages (the same document, another chunk, or the document whose
  text shares most words with it); the generator writes one question per sentence and a template joins
  them ("..., and ...?"); two halves asking the same thing are dropped (``same_question``). Reference:
  both sentences; sources: both spans (``more_sources``).
- ``comparison``: two documents whose opening sentences are nearest by embedding; template "How does
  <topic A> differ from <topic B>?" (topics from the documents' first headings). Reference: both
  opening sentences; sources: both spans.
- ``procedural``: extraction. A sentence saying "X is a way to V", "is used to V", "To V, ...",
  "allows you to V" becomes "How do I V?" (a verb phrase over 90 characters cut at a clause boundary,
  ``clause_cut``); reference and source: that sentence. Where no sentence
  matches, the generator is asked for a "How do I ...?" question under a schema (counted apart).
- ``unanswerable``: a near-miss, by template. A name the corpus mentions (a quoted name or identifier)
  is asked an attribute the corpus does not state for it. Near-miss templates are tried first (an
  attribute a language reference states for some things: time complexity, deprecation, thread safety,
  the version it came in), then far ones (who proposed it, memory, speed, who uses it). Verification, by
  sentence: every sentence of every document that mentions the name (as a whole word) is searched for
  the answer type's cues ("O(", "complexity"; "deprecated", "version 3"; "thread", "atomic"; a year or
  "added in version"; a PEP number or "proposed by"; "bytes"/"memory"; "faster"...); a cue in any of
  them rejects the template. Sentences that do not mention the name are not read (a window of
  characters around each mention, as before, rejected probes the corpus does not answer). It reads cue
  words, not meaning: the closing note measures it by hand.
- ``vague``, ``misspelled``, ``keyword``: user-style phrasings of a single-fact probe (the base question
  is written by the generator, then rewritten deterministically and seeded: a vague template around
  its main term; typos in one or two long words; its content words only). Reference and source: the
  base probe's; the base question itself is not kept (it would be a near-duplicate).

Personas (``probes.personas``) are drawn per probe by seed; the generator is told to write as the
persona where it writes at all. A 135M model honours that weakly; the persona is recorded either way.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import probes as P
from .lm import Role, ask_json
from .records import KINDS, Chunk, Probe, Span

Embed = Callable[[list[str]], list[list[float]]]
STYLE = ("vague", "misspelled", "keyword")
# The unanswerable templates: the question, and the cues whose presence in a sentence mentioning the name
# would answer it. Near-miss templates come first: they ask an attribute a language reference states for
# some things (complexity, deprecation, thread safety, the version a feature came in), so the question looks
# answerable; the far ones ask what a reference never states (who proposed it, memory, speed, companies).
UNANSWERABLE = (
    ("What is the time complexity of {x}?", r"\bO\(|\bcomplexity\b|\b(?:linear|constant|quadratic|logarithmic) time\b"
                                            r"|\bamortized\b"),
    ("In which Python version was {x} deprecated?", r"\bdeprecat|\bremoved in\b|\bno longer (?:supported|available)\b"),
    ("Is {x} thread-safe?", r"\bthread|\block(?:s|ed|ing)?\b|\batomic|\bconcurren|\bGIL\b"),
    ("In which year was {x} added to Python?", r"\b(?:19|20)\d\d\b|\b(?:new|added) in (?:version|python)\b"
                                               r"|\bintroduced in\b|\bsince (?:version|python)\b"),
    ("Who first proposed {x} for Python?", r"\bPEP\s*\d+|\bproposed by\b|\b(?:designed|invented) by\b"
                                            r"|\bGuido\b|\bauthor"),
    ("How many bytes of memory does {x} use?", r"\b\d+\s*(?:bytes?|[KMG]i?B)\b|\bmemory\b|getsizeof|\boverhead\b"),
    ("How much faster is {x} than the alternatives?", r"\bfaster\b|\bslower\b|\bspeed-?up\b|\bbenchmark"
                                                      r"|\b\d+(?:\.\d+)?\s*(?:x|times) (?:as )?(?:fast|slow)"),
    ("Which companies use {x} in production?", r"\bcompan(?:y|ies)\b|\bin production\b|\bindustry\b"),
)
NEAR_MISS = 4  # the first four templates are near misses
# A sentence for verification: up to . ! ? followed by space, or a paragraph's end (code lines and
# lists without a full stop count too, unlike the 8-40-word prose sentences questions are written from).
_VERIFY_SENT = re.compile(r"(?:[^.!?\n]|[.!?](?=\S)|\n(?![ \t]*\n))+(?:[.!?]+|(?=\n[ \t]*\n)|$)")
_PROCEDURE = (  # the verb phrase runs to the next punctuation; ``procedure`` cuts it at a clause boundary
    re.compile(r"\b(?:a|the|one) (?:\w+ )?way to (?P<vp>[a-z][^,;:.()\"]{8,})"),
    re.compile(r"\b(?:is|are|can be|may be) used to (?P<vp>[a-z][^,;:.()\"]{8,})"),
    re.compile(r"^To (?P<vp>[a-z][^,;:.()\"]{8,}),"),
    re.compile(r"\b(?:allows?|lets?|enables?) (?:you|the user|the programmer|programs?) to (?P<vp>[a-z][^,;:.()\"]"
               r"{8,})"),
)
MAX_VP = 90  # characters of the "How do I ...?" verb phrase
# where a clause ends inside a verb phrase: before a conjunction or a relative/subordinating word
_CLAUSE_WORDS = (r"(?:and|or|but|which|that|who|whose|where|when|whenever|while|if|unless|because|so|since|as|"
                 r"although|though|whereas|until|before|after)")  # not "then", "otherwise": adverbs as often
_CLAUSE = re.compile(r"\s+(?=" + _CLAUSE_WORDS + r"\b)")
_CLAUSE_TAIL = re.compile(r"(?:\s+" + _CLAUSE_WORDS + r")+$")  # "so" of "so that", "and" of "and when"
HOW_SCHEMA = {"type": "object", "required": ["question"], "properties": {"question": {
    "type": "string", "pattern": "^How (do|can) I [^?\\n]{10,100}[?]$"}}}
HOW_DEMOS = (("The with statement is used to wrap the execution of a block with methods defined by a context "
              "manager.", "How do I wrap a block with a context manager?"),
             ("A list is sorted in place by calling its sort method.", "How do I sort a list in place?"))
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*$|^(\S[^\n]{1,100})\n[*=~^\-#]{3,}\s*$", re.M)
_NAME = re.compile(r"\"([A-Za-z_][\w.]{1,30}(?:\(\))?)\"|`([A-Za-z_][\w.]{1,30}(?:\(\))?)`"
                   r"|\b([a-z]+_[\w]+|__\w+__|[A-Z][a-z]+[A-Z]\w+)\b")
_VAGUE = ("what's the deal with {x}?", "{x}, how does that work?", "can you explain {x}?", "help with {x}")


def plan(mix: dict[str, float], count: int) -> dict[str, int]:
    """Probes per kind: ``count`` shared by the mix's weights (largest remainder, ties in KINDS order)."""
    total = sum(mix.values())
    exact = {k: count * w / total for k, w in mix.items() if w > 0}
    out = {k: int(v) for k, v in exact.items()}
    rest = count - sum(out.values())
    for k in sorted(exact, key=lambda k: (-(exact[k] - out[k]), KINDS.index(k)))[:rest]:
        out[k] += 1
    return {k: out[k] for k in KINDS if k in out}


def sections(text: str) -> list[tuple[int, str]]:
    """(offset, title) of each heading: a Markdown ``#`` line or a line underlined with ``***``/``===``."""
    return [(m.start(), (m.group(2) or m.group(3)).strip()) for m in _HEADING.finditer(text)]


def section_of(text: str, pos: int, heads: list[tuple[int, str]] | None = None) -> str:
    title = "(top)"
    for at, t in heads if heads is not None else sections(text):
        if at > pos:
            break
        title = t
    return title


def topic(doc: str, text: str) -> str:
    """What a document is about, for a template: its first heading, else its file name."""
    heads = sections(text)
    if heads:
        t = heads[0][1]
        return t[0].lower() + t[1:] if t[:4] in ("The ", "The\t") else t
    return re.sub(r"[_-]+", " ", doc.rsplit("/", 1)[-1].rsplit(".", 1)[0])


def names_in(sentence: str) -> list[str]:
    return [next(g for g in m.groups() if g) for m in _NAME.finditer(sentence)]


def typos(text: str, rng: random.Random) -> str:
    """One or two long words misspelled (adjacent letters swapped, one dropped, or one doubled), in lower case."""
    words = text.lower().rstrip("?").split()
    long = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    for i in rng.sample(long, min(len(long), 2 if len(long) > 3 else 1)):
        w, k = words[i], rng.randrange(1, len(words[i]) - 2)
        words[i] = rng.choice([w[:k] + w[k + 1] + w[k] + w[k + 2:], w[:k] + w[k + 1:], w[:k] + w[k] + w[k:]])
    return " ".join(words)


def keywords(question: str, limit: int = 6) -> str:
    """The question's content words in order (names kept as written), at most ``limit``."""
    out: list[str] = []
    for tok in re.findall(r"[\"`]?[A-Za-z_][\w.]*(?:\(\))?[\"`]?", question):
        t = tok.strip("\"`")
        if t.lower() in P._STOP or len(t) <= 2 or t.lower() in out:
            continue
        out.append(t if ("_" in t or "(" in t or t[1:] != t[1:].lower()) else t.lower())
    return " ".join(out[:limit])


def _main_term(question: str, section: str) -> str:
    """What a vague question is about: a name the question uses, else the section's title (what a person
    knows they are reading about, without the specifics), else the question's keywords."""
    names = names_in(question)
    if names:
        return f'"{names[0]}"'
    if section and section != "(top)":
        return section[0].lower() + section[1:] if section.startswith("The ") else section
    return keywords(question, 2)


@dataclass
class Context:
    """What every kind's generator draws on: the chunks, the corpus text, the model, the seed."""

    chunks: list[Chunk]
    docs: dict[str, str]
    role: Role | None
    rng: random.Random
    personas: list[Any] = field(default_factory=list)
    embed: Embed | None = None
    used: set[tuple[str, int]] = field(default_factory=set)  # sentences already behind a probe
    seen: list[set[str]] = field(default_factory=list)  # word sets of kept questions (cheap duplicate check)
    stats: dict[str, int] = field(default_factory=dict)
    _heads: dict[str, list[tuple[int, str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pool = [(c, s) for c in self.chunks for s in P.candidate_sentences(c)]
        self.rng.shuffle(self.pool)

    def count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def section(self, doc: str, pos: int) -> str:
        if doc not in self._heads:
            self._heads[doc] = sections(self.docs.get(doc, ""))
        return section_of(self.docs.get(doc, ""), pos, self._heads[doc])

    def persona(self) -> Any:
        return self.rng.choice(self.personas) if self.personas else None

    def fresh(self) -> Iterator[tuple[Chunk, tuple[int, int, str]]]:
        """The shuffled sentences not yet behind a probe."""
        for chunk, sent in self.pool:
            if (chunk.doc, sent[0]) not in self.used:
                yield chunk, sent

    def duplicate(self, q: str) -> bool:
        return P._near_duplicate(q, self.seen)


def _probe(ctx: Context, kind: str, persona: Any, q: str, ref: str | None, chunk: Chunk | None,
           sent: tuple[int, int, str] | None, more: tuple[Span, ...] = (), more_chunks: tuple[str, ...] = (),
           **kw: Any) -> Probe:
    doc = chunk.doc if chunk is not None and sent is not None else ""
    start, end = (sent[0], sent[1]) if sent is not None else (0, 0)
    anchor = (doc, start) if doc else ((more[0].doc, more[0].start) if more else ("", 0))
    pid = hashlib.sha256(f"{kind}|{q}|{anchor[0]}|{anchor[1]}".encode()).hexdigest()[:12]
    ctx.seen.append(set(P.words(q)))
    return Probe(id=pid, question=q, reference=ref, extractive_reference=ref, source_doc=doc, source_start=start,
                 source_end=end, source_chunk_ids=((chunk.id,) if chunk is not None and doc else ()) + more_chunks,
                 kind=kind, persona=persona.name if persona is not None else "", more_sources=more,
                 section=ctx.section(*anchor) if anchor[0] else "", **kw)  # type: ignore[arg-type]


def _ask(ctx: Context, sentence: str, persona: Any) -> str | None:
    """The generator's question for one sentence (None: it failed or wrote no usable question)."""
    assert ctx.role is not None
    try:
        raw = P.write_question(ctx.role, sentence, persona.description if persona is not None else None)
    except Exception:  # noqa: BLE001 -- counted: a failed generation is one dropped attempt
        ctx.count("errors")
        return None
    q = P.clean_question(str(raw))
    if q is None or q.lower().rstrip("?") in sentence.lower():
        ctx.count("dropped_malformed")
        return None
    if not P.on_topic(q, sentence):
        ctx.count("dropped_offtopic")
        return None
    return q


def gen_single(ctx: Context) -> Iterator[Probe | None]:
    for chunk, sent in ctx.fresh():
        persona = ctx.persona()
        q = _ask(ctx, sent[2], persona)
        if q is not None and ctx.duplicate(q):
            ctx.count("dropped_duplicate")
            q = None
        if q is None:
            yield None
            continue
        ctx.used.add((chunk.doc, sent[0]))
        yield _probe(ctx, "single", persona, q, sent[2], chunk, sent)


def gen_style(kind: str) -> Callable[[Context], Iterator[Probe | None]]:
    def gen(ctx: Context) -> Iterator[Probe | None]:
        for base in gen_single(ctx):
            if base is None:
                yield None
                continue
            ctx.seen.pop()  # the base question is not kept
            q = base.question
            if kind == "keyword":
                new = keywords(q)
            elif kind == "misspelled":
                new = typos(q, ctx.rng)
            else:
                new = ctx.rng.choice(_VAGUE).format(x=_main_term(q, base.section))
            if len(new.split()) < 2 or ctx.duplicate(new):
                ctx.count("dropped_duplicate")
                yield None
                continue
            ctx.seen.append(set(P.words(new)))
            pid = hashlib.sha256(f"{kind}|{new}|{base.source_doc}|{base.source_start}".encode()).hexdigest()[:12]
            yield base.model_copy(update={"id": pid, "question": new, "kind": kind})
    return gen


def _partner(ctx: Context, chunk: Chunk, sentence: str) -> tuple[Chunk, tuple[int, int, str]] | None:
    """A second passage for a multi-passage probe: a sentence of another chunk of the same document
    (one at least a chunk away), else of the document sharing most content words with the sentence."""
    words = P.content_words(sentence)
    best: tuple[float, Chunk, tuple[int, int, str]] | None = None
    for c, s in ctx.fresh():
        if c.id == chunk.id or abs(s[0] - chunk.start) < (chunk.end - chunk.start):
            continue
        score = (2.0 if c.doc == chunk.doc else 0.0) + len(words & P.content_words(c.text)) / max(len(words), 1)
        if best is None or score > best[0]:
            best = (score, c, s)
    return None if best is None else (best[1], best[2])


def same_question(a: str, b: str) -> bool:
    """The two questions ask the same thing: the same content words, or nearly the same words."""
    ca, cb = P.content_words(a), P.content_words(b)
    return (bool(ca) and ca == cb) or P._near_duplicate(a, [set(P.words(b))])


def gen_multi(ctx: Context) -> Iterator[Probe | None]:
    for chunk, sent in ctx.fresh():
        persona = ctx.persona()
        other = _partner(ctx, chunk, sent[2])
        q1 = _ask(ctx, sent[2], persona)
        q2 = _ask(ctx, other[1][2], persona) if other is not None and q1 is not None else None
        if q1 is None or q2 is None or other is None:
            yield None
            continue
        if same_question(q1, q2):  # two halves asking one thing: not a two-passage question
            ctx.count("dropped_repeat")
            yield None
            continue
        q = f"{q1[:-1].rstrip()}, and {q2[0].lower()}{q2[1:]}"
        if ctx.duplicate(q):
            ctx.count("dropped_duplicate")
            yield None
            continue
        c2, s2 = other
        ctx.used.update({(chunk.doc, sent[0]), (c2.doc, s2[0])})
        yield _probe(ctx, "multi", persona, q, f"{sent[2]} {s2[2]}", chunk, sent,
                     more=(Span(doc=c2.doc, start=s2[0], end=s2[1]),), more_chunks=(c2.id,))


def _openings(ctx: Context) -> dict[str, tuple[Chunk, tuple[int, int, str]]]:
    """Each document's first prose sentence (its definition, most often)."""
    out: dict[str, tuple[Chunk, tuple[int, int, str]]] = {}
    for c in sorted(ctx.chunks, key=lambda c: (c.doc, c.start)):
        if c.doc not in out:
            sents = P.candidate_sentences(c)
            if sents:
                out[c.doc] = (c, sents[0])
    return out


def gen_comparison(ctx: Context) -> Iterator[Probe | None]:
    opens = _openings(ctx)
    docs = sorted(opens)
    if len(docs) < 2:
        return
    if ctx.embed is not None:
        vecs = dict(zip(docs, ctx.embed([opens[d][1][2] for d in docs])))
        sim = lambda a, b: sum(x * y for x, y in zip(vecs[a], vecs[b]))  # noqa: E731 -- normalized vectors
    else:
        sim = lambda a, b: len(P.content_words(opens[a][1][2]) & P.content_words(opens[b][1][2]))  # noqa: E731
    order = docs[:]
    ctx.rng.shuffle(order)
    paired: set[str] = set()
    for a in order:
        rest = [d for d in docs if d != a and d not in paired]
        if a in paired or not rest:
            continue
        b = max(rest, key=lambda d: sim(a, d))
        paired.update({a, b})
        ta, tb = topic(a, ctx.docs.get(a, "")), topic(b, ctx.docs.get(b, ""))
        q = ctx.rng.choice(("How does {a} differ from {b}?", "What is the difference between {a} and {b}?")) \
            .format(a=ta, b=tb)
        if ctx.duplicate(q):
            ctx.count("dropped_duplicate")
            yield None
            continue
        (ca, sa), (cb, sb) = opens[a], opens[b]
        yield _probe(ctx, "comparison", ctx.persona(), q, f"{sa[2]} {sb[2]}", ca, sa,
                     more=(Span(doc=cb.doc, start=sb[0], end=sb[1]),), more_chunks=(cb.id,))


def clause_cut(vp: str, limit: int = MAX_VP) -> str | None:
    """``vp`` if it fits in ``limit`` characters, else its longest run of whole clauses that does (cut
    before "and", "which", "when"...); None if even its first clause is longer."""
    vp = vp.strip()
    if len(vp) <= limit:
        return vp
    cuts = [m.start() for m in _CLAUSE.finditer(vp) if 0 < m.start() <= limit]
    for cut in reversed(cuts):
        head = _CLAUSE_TAIL.sub("", vp[:cut].rstrip())
        if head:
            return head
    return None


def procedure(sentence: str) -> str | None:
    """"How do I V?" from a sentence that says how to V; None if it says no such thing. A long verb
    phrase is cut at a clause boundary (``clause_cut``), never inside a clause."""
    for pat in _PROCEDURE:
        m = pat.search(sentence)
        if m:
            vp = clause_cut(m.group("vp"))
            if vp is None:
                continue
            vp = re.sub(r"(?:\s+(?:the|a|an|and|or|of|to|in|with|that|which))+$", "", vp)  # "behavior of the"
            if len(vp.split()) >= 3:
                return f"How do I {vp}?"
    return None


def gen_procedural(ctx: Context) -> Iterator[Probe | None]:
    candidates = [(c, s, q) for c, s in ctx.fresh() if (q := procedure(s[2])) is not None]
    for chunk, sent, q in candidates:
        if (chunk.doc, sent[0]) in ctx.used or ctx.duplicate(q):
            ctx.count("dropped_duplicate")
            yield None
            continue
        ctx.used.add((chunk.doc, sent[0]))
        ctx.count("procedural_extracted")
        yield _probe(ctx, "procedural", ctx.persona(), q, sent[2], chunk, sent)
    if ctx.role is None:
        return
    for chunk, sent in ctx.fresh():  # no sentence says how to: ask the generator, under a schema
        persona = ctx.persona()
        turns: list[tuple[str, str]] = []
        for s, q in HOW_DEMOS:
            turns += [("user", f"Sentence: {s}"), ("assistant", f'{{"question": "{q}"}}')]
        try:
            obj, text = ask_json(ctx.role, P.QUESTION_SYSTEM + " The question asks how to do something.",
                                 [*turns, ("user", f"Sentence: {sent[2]}")], HOW_SCHEMA)
        except Exception:  # noqa: BLE001 -- counted
            ctx.count("errors")
            yield None
            continue
        q = P.clean_question(str(obj["question"]) if obj and "question" in obj else text)
        if q is None or not q.lower().startswith(("how do i", "how can i")) or not P.on_topic(q, sent[2]) \
                or ctx.duplicate(q):
            ctx.count("dropped_malformed")
            yield None
            continue
        ctx.used.add((chunk.doc, sent[0]))
        ctx.count("procedural_generated")
        yield _probe(ctx, "procedural", persona, q, sent[2], chunk, sent)


def mentions(name: str) -> re.Pattern[str]:
    """``name`` as a whole word or identifier (not inside a longer one: "pass" is not in "bypass"); a
    callable's name with or without its "()" ("classmethod()" is mentioned by "@classmethod")."""
    base = name[:-2] if name.endswith("()") else name
    return re.compile(r"(?<![\w.])" + re.escape(base) + r"(?:\(\))?(?![\w])", re.I)


def verify_sentences(docs: dict[str, str]) -> list[tuple[str, int, str]]:
    """(doc, offset, text) of every sentence of the corpus, for the unanswerable check."""
    return [(doc, m.start(), " ".join(m.group(0).split())) for doc, text in docs.items()
            for m in _VERIFY_SENT.finditer(text) if m.group(0).strip()]


def answered_in(sentences: list[tuple[str, int, str]], name: str, cue: str) -> str | None:
    """Where (``doc@offset``) a sentence that mentions ``name`` carries a cue of the answer type; None if
    none does. Only such sentences: a cue in the next sentence is about something else."""
    pat, cues = mentions(name), re.compile(cue, re.I)
    for doc, at, text in sentences:
        if pat.search(text) and cues.search(text):
            return f"{doc}@{at}"
    return None


def gen_unanswerable(ctx: Context) -> Iterator[Probe | None]:
    """A near-miss template when one is verified unanswerable for the name, else a far one; the first of
    each group tried is drawn by seed."""
    sentences = verify_sentences(ctx.docs)
    for chunk, sent in ctx.fresh():
        names = [n for n in names_in(sent[2]) if len(n.strip("_")) >= 3]
        if not names:
            continue
        name = ctx.rng.choice(names)
        about = [t for t in sentences if mentions(name).search(t[2])]
        near, far = list(range(NEAR_MISS)), list(range(NEAR_MISS, len(UNANSWERABLE)))
        ctx.rng.shuffle(near)
        ctx.rng.shuffle(far)
        chosen, answered = None, 0
        for i in near + far:
            template, cue = UNANSWERABLE[i]
            q = template.format(x=f'"{name}"')
            if ctx.duplicate(q):
                continue
            if answered_in(about, name, cue) is not None:
                answered += 1
                continue
            chosen = (i, q, cue)
            break
        ctx.count("unanswerable_rejected", answered)  # templates the corpus answers for the name
        if chosen is None:
            ctx.count("dropped_answerable" if answered else "dropped_duplicate")
            yield None
            continue
        i, q, cue = chosen
        ctx.count("unanswerable_near" if i < NEAR_MISS else "unanswerable_far")
        ctx.used.add((chunk.doc, sent[0]))
        yield _probe(ctx, "unanswerable", ctx.persona(), q, None, None, None,
                     more=(Span(doc=chunk.doc, start=sent[0], end=sent[1]),), answerable=False,
                     verified=f"no sentence mentioning {name!r} (every document) matches the answer cues /{cue}/"
                              f" ({'near miss' if i < NEAR_MISS else 'far miss'})")


GENERATORS: dict[str, Callable[[Context], Iterator[Probe | None]]] = {
    "single": gen_single, "multi": gen_multi, "comparison": gen_comparison, "procedural": gen_procedural,
    "unanswerable": gen_unanswerable, **{k: gen_style(k) for k in STYLE}}


def make_probes(chunks: list[Chunk], docs: dict[str, str], role: Role | None, mix: dict[str, float], count: int,
                seed: int, max_attempts: int, personas: list[Any] | None = None, embed: Embed | None = None,
                progress: Callable[[Iterable[int]], Iterable[int]] = iter) -> tuple[list[Probe], dict[str, Any]]:
    """Up to ``count`` probes in the mix's shares, within ``max_attempts`` attempts in all (kinds take
    turns, so a kind that cannot be made does not starve the others). Every drop is counted:
    ``stats["dropped_<why>"]`` and per kind ``kind/<k>/made``, ``kind/<k>/attempts``."""
    if not any(P.candidate_sentences(c) for c in chunks):
        from .errors import InputError

        raise InputError("corpus", "corpus.path", "expected documents with prose sentences (8-40 words); found none")
    want = plan(mix, count)
    ctx = Context(chunks=chunks, docs=docs, role=role, rng=random.Random(seed), personas=list(personas or []),
                  embed=embed)
    for k in ("attempts", "dropped_malformed", "dropped_offtopic", "dropped_duplicate", "errors"):
        ctx.stats[k] = 0
    gens = {k: GENERATORS[k](ctx) for k in want}
    made: dict[str, list[Probe]] = {k: [] for k in want}
    active = [k for k in want if want[k] > 0]
    for _ in progress(range(max_attempts)):
        active = [k for k in active if len(made[k]) < want[k]]
        if not active:
            break
        k = active[ctx.stats["attempts"] % len(active)]
        ctx.count("attempts")
        ctx.count(f"kind/{k}/attempts")
        got = next(gens[k], StopIteration)
        if got is StopIteration:  # this kind has nothing left to draw on
            active.remove(k)
            ctx.count(f"kind/{k}/exhausted")
            continue
        if got is not None:
            made[k].append(got)  # type: ignore[arg-type]
    probes = [p for k in want for p in made[k]]
    stats: dict[str, Any] = dict(ctx.stats)
    stats.update({f"kind/{k}/wanted": want[k] for k in want})
    stats.update({f"kind/{k}/made": len(made[k]) for k in want})
    return probes, stats


def embedding_dedup(probes: list[Probe], embed: Embed, threshold: float) -> tuple[list[Probe], list[tuple[str, str,
                                                                                                          float]]]:
    """Drop every probe whose question is at least ``threshold`` cosine-similar to an earlier kept one.
    Returns (kept, [(dropped id, kept id it duplicates, similarity)])."""
    if not probes:
        return [], []
    import numpy as np

    vecs = np.asarray(embed([p.question for p in probes]), dtype=float)
    kept: list[int] = []
    dropped = []
    for i in range(len(probes)):
        if kept:
            sims = vecs[kept] @ vecs[i]
            j = int(np.argmax(sims))
            if sims[j] >= threshold:
                dropped.append((probes[i].id, probes[kept[j]].id, float(sims[j])))
                continue
        kept.append(i)
    return [probes[i] for i in kept], dropped


def cross_split(probes: list[Probe], embed: Embed, threshold: float) -> tuple[list[Probe], dict[str, Any]]:
    """No near-duplicate of a test probe in train or validation: each train/val probe at least
    ``threshold`` similar to a test probe is dropped. Returns (probes kept, the check's figures)."""
    import numpy as np

    test = [p for p in probes if p.split == "test"]
    other = [p for p in probes if p.split != "test"]
    check: dict[str, Any] = {"split_check/threshold": threshold, "split_check/compared": len(other),
                             "split_check/test": len(test), "split_check/dropped": 0, "split_check/max_similarity": 0.0}
    if not test or not other:
        return probes, check
    t = np.asarray(embed([p.question for p in test]), dtype=float)
    o = np.asarray(embed([p.question for p in other]), dtype=float)
    sims = (o @ t.T).max(axis=1)
    bad = {other[i].id for i in range(len(other)) if sims[i] >= threshold}
    kept_sims = [float(s) for i, s in enumerate(sims) if other[i].id not in bad]
    check["split_check/dropped"] = len(bad)
    check["split_check/max_similarity"] = max(kept_sims, default=0.0)
    return [p for p in probes if p.id not in bad], check


def coverage(probes: list[Probe], docs: dict[str, str]) -> dict[str, Any]:
    """Documents and sections probed, over all and per kind: ``coverage/<kind>/docs`` etc., with the
    corpus totals ``coverage/docs_total`` and ``coverage/sections_total``."""
    total_sections = sum(max(1, len(sections(t))) for t in docs.values())
    out: dict[str, Any] = {"coverage/docs_total": len(docs), "coverage/sections_total": total_sections}

    def spans(p: Probe) -> list[tuple[str, str]]:
        where = [(p.source_doc, p.source_start)] if p.source_doc else []
        where += [(s.doc, s.start) for s in p.more_sources]
        return [(d, section_of(docs.get(d, ""), at)) for d, at in where]

    groups: dict[str, list[Probe]] = {"all": probes}
    for p in probes:
        groups.setdefault(p.kind, []).append(p)
    for name, ps in groups.items():
        hit = {s for p in ps for s in spans(p)}
        out[f"coverage/{name}/docs"] = len({d for d, _ in hit})
        out[f"coverage/{name}/sections"] = len(hit)
    return out
