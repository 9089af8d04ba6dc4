"""Probe synthesis, quality filter, dedup and the frozen train / val / test split.

Answer-first synthesis: a sentence is sampled from a chunk and the generator writes the question it
answers. The sentence is the probe's extractive reference and its character span is the probe's
known source, so retrieval hits can be checked under any chunking and reference agreement is
measurable even when the generator is a 135M model.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from .checks import words
from .config import SplitSpec
from .errors import InputError, read_jsonl
from .lm import Role, ask_json
from .records import Chunk, Probe, Split

SPLITS: tuple[Split, ...] = ("train", "val", "test")
SYNTH_VERSION = 11  # part of the probe cache key: bump when synthesis changes
# A sentence may wrap over single line breaks (wrapped text), never over a blank line.
_SENT = re.compile(r"(?:[^.!?\n]|\n(?![ \t]*\n))+[.!?]")


QUESTION_SYSTEM = ("You write quiz questions. Given a sentence, write one question that the sentence answers. "
                   "Reply with JSON.")
# Shape, not content: the schema keeps a 135M model's output a single well-formed question.
QUESTION_SCHEMA = {"type": "object", "required": ["question"], "properties": {"question": {
    "type": "string", "pattern": "^(What|Which|How|When|Why|Where|Who|Does|Is|Can) [^?\\n]{10,120}[?]$"}}}
DEMOS = [  # written for this project, not taken from any corpus
    ("The pass statement is a null operation; nothing happens when it executes.",
     "What happens when the pass statement executes?"),
    ("A generator function returns an iterator known as a generator object.", "What does a generator function return?"),
]


def write_question(role: Role, sentence: str, persona: str | None = None) -> str:
    """The generator's question for ``sentence``; ``persona`` (a description) says who asks it."""
    turns: list[tuple[str, str]] = []
    for s, q in DEMOS:
        turns += [("user", f"Sentence: {s}"), ("assistant", json.dumps({"question": q}))]
    system = QUESTION_SYSTEM + (f" Write it as it would be asked by {persona}." if persona else "")
    obj, text = ask_json(role, system, [*turns, ("user", f"Sentence: {sentence}")], QUESTION_SCHEMA)
    return str(obj["question"]) if obj and "question" in obj else text


def candidate_sentences(chunk: Chunk) -> list[tuple[int, int, str]]:
    """(start, end, text) of prose sentences with 8-40 words, offsets relative to the document."""
    out = []
    for m in _SENT.finditer(chunk.text):
        raw = m.group(0).strip()
        s = " ".join(raw.split())  # wrapped lines joined; the span stays on the document's text
        n = len(s.split())
        letters = sum(ch.isalpha() or ch.isspace() for ch in s) / max(len(s), 1)
        if 8 <= n <= 40 and letters > 0.85 and s[0].isupper():
            start = chunk.start + m.start() + (len(m.group(0)) - len(m.group(0).lstrip()))
            out.append((start, start + len(raw), s))
    return out


def clean_question(raw: str) -> str | None:
    """First line, cut after the first '?'; None if it is not a plausible question."""
    q = raw.strip().splitlines()[0].strip() if raw.strip() else ""
    q = re.sub(r"^(question|q)\s*[:.-]\s*", "", q, flags=re.I).strip(" \"'*")
    if "?" not in q:
        return None
    q = q[: q.index("?") + 1]
    if not 4 <= len(q.split()) <= 30 or not q[0].isalpha():
        return None
    return q


_STOP = set("what which when where why who how does is are can the this that these those with from into for "
             "and but not its their there then than been being have has had will would should could about "
             "your more most such only also other some each used uses using".split())


def content_words(text: str) -> set[str]:
    return {w for w in words(text) if len(w) > 3 and w not in _STOP}


def on_topic(question: str, sentence: str, min_shared: int = 2) -> bool:
    """The question shares at least ``min_shared`` content words with the sentence it came from."""
    return len(content_words(question) & content_words(sentence)) >= min(min_shared, len(content_words(sentence)))


def _near_duplicate(q: str, seen: list[set[str]]) -> bool:
    w = set(words(q))
    return any(len(w & s) / max(len(w | s), 1) > 0.8 for s in seen)


def synthesize(chunks: list[Chunk], role: Role, count: int, seed: int, max_attempts: int,
               progress: Callable[[Iterable[int]], Iterable[int]] = iter) -> tuple[list[Probe], dict[str, int]]:
    """Up to ``count`` probes from sampled chunks; empty, malformed and duplicate questions are
    dropped and counted (returned stats), never silently.

    The generator's calls run ``role.concurrency`` at once, in batches no larger than the probes still
    missing (each attempt yields at most one), and are filtered in attempt order: the same probes,
    stats and calls as one at a time. A generator whose calls fail on more than its
    ``max_failed_share`` of at least 10 attempts stops the tune (``spend.TuneStopped``)."""
    from .parallel import run_ordered
    from .spend import TuneStopped

    rng = random.Random(seed)
    pool = [(c, s) for c in chunks for s in candidate_sentences(c)]
    if not pool:
        raise InputError("corpus", "corpus.path", "expected documents with prose sentences (8-40 words); found none")
    rng.shuffle(pool)
    stats = {"attempts": 0, "dropped_malformed": 0, "dropped_offtopic": 0, "dropped_duplicate": 0, "errors": 0}
    probes: list[Probe] = []
    seen: list[set[str]] = []
    workers = getattr(role, "concurrency", 1)
    share = getattr(role, "max_failed_share", 0.5)
    last_error = ""

    def ask(i: int) -> str | Exception:
        try:
            return write_question(role, pool[i][1][2])
        except Exception as err:
            return err

    n = min(max_attempts, len(pool))
    ticks = iter(progress(range(n)))
    i = 0
    while i < n and len(probes) < count:
        batch = list(range(i, min(n, i + max(1, min(workers, count - len(probes))))))
        for k, raw in zip(batch, run_ordered(ask, batch, workers)):
            next(ticks, None)
            chunk, (start, end, sentence) = pool[k]
            stats["attempts"] += 1
            if isinstance(raw, Exception):
                stats["errors"] += 1
                last_error = f"{type(raw).__name__}: {' '.join(str(raw).split())}"
                continue
            q = clean_question(str(raw))
            if q is None or q.lower().rstrip("?") in sentence.lower():
                stats["dropped_malformed"] += 1
                continue
            if not on_topic(q, sentence):
                stats["dropped_offtopic"] += 1
                continue
            if _near_duplicate(q, seen):
                stats["dropped_duplicate"] += 1
                continue
            seen.append(set(words(q)))
            pid = hashlib.sha256(f"{q}|{chunk.doc}|{start}".encode()).hexdigest()[:12]
            probes.append(Probe(id=pid, question=q, reference=sentence, source_doc=chunk.doc,
                                source_start=start, source_end=end, source_chunk_ids=(chunk.id,)))
        i = batch[-1] + 1
        if stats["attempts"] >= 10 and stats["errors"] > share * stats["attempts"]:
            raise TuneStopped(f"{role.name} calls failed on {stats['errors']} of {stats['attempts']} probe questions "
                              f"(more than max_failed_share {share:g}, after retries); last error: {last_error}"[:400])
    next(ticks, None)
    return probes, stats


def assign_splits(probes: list[Probe], spec: SplitSpec, seed: int) -> list[Probe]:
    """Shuffle by seed and cut by the split fractions; every split gets at least one probe."""
    if len(probes) < 3:
        raise ValueError(f"need at least 3 probes to split, got {len(probes)}")
    order = sorted(probes, key=lambda p: p.id)
    random.Random(seed).shuffle(order)
    total = spec.train + spec.val + spec.test
    n_val = max(1, round(len(order) * spec.val / total))
    n_test = max(1, round(len(order) * spec.test / total))
    n_train = len(order) - n_val - n_test
    if n_train < 1:
        raise ValueError("split fractions leave the train split empty")
    labels = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    return [p.model_copy(update={"split": s}) for p, s in zip(order, labels, strict=True)]


def load_user_probes(path: Path) -> list[Probe]:
    """A JSONL of ``{"question": ..., "reference": ..., "answerable": ...}`` lines: reference (a human's
    gold answer) optional; ``answerable: false`` marks a question the corpus does not answer."""
    out = []
    for n, row in read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
            raise InputError(path, f"line {n}.question", "expected a non-empty string")
        ref = row.get("reference")
        if ref is not None and not isinstance(ref, str):
            raise InputError(path, f"line {n}.reference", "expected a string or no key")
        answerable = row.get("answerable", True)
        if not isinstance(answerable, bool):
            raise InputError(path, f"line {n}.answerable", "expected true or false")
        unknown = sorted(set(row) - {"question", "reference", "answerable"})
        if unknown:
            raise InputError(path, f"line {n}.{unknown[0]}", "unknown key; expected question, reference, answerable")
        pid = hashlib.sha256(row["question"].encode()).hexdigest()[:12]
        out.append(Probe(id=pid, question=row["question"].strip(), reference=ref or None, reference_origin="human",
                         answerable=answerable, kind="single" if answerable else "unanswerable", persona="hand-written",
                         verified="" if answerable else f"hand-written in {path.name}"))
    return out


def digest(probes: list[Probe]) -> str:
    h = hashlib.sha256()
    for p in sorted(probes, key=lambda p: p.id):
        h.update(p.model_dump_json().encode())
    return h.hexdigest()[:16]


def save_jsonl(probes: list[Probe], path: Path) -> None:
    """Atomically (a temporary file renamed over ``path``): a process killed mid-write leaves no
    truncated probe set for the next run to load."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(p.model_dump_json() + "\n" for p in probes), encoding="utf-8")
    os.replace(tmp, path)


def load_jsonl(path: Path) -> list[Probe]:
    return [Probe.model_validate_json(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
