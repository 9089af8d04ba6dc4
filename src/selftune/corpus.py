"""Loading documents safely, hashing them, and chunking them into character spans."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .records import Chunk

log = logging.getLogger(__name__)

MAX_DOC_BYTES = 20_000_000


@dataclass(frozen=True)
class Corpus:
    root: Path
    docs: dict[str, str]  # relative path -> text, sorted by path
    skipped: tuple[str, ...]  # files that could not be read as text

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for name, text in self.docs.items():
            h.update(name.encode() + b"\0" + text.encode() + b"\0")
        return h.hexdigest()[:16]


def load_corpus(root: Path, globs: list[str], source: str | Path = "config") -> Corpus:
    """Every file under ``root`` matching any glob, decoded as UTF-8; unreadable files are skipped
    and reported. An empty corpus is an InputError naming ``corpus.path``."""
    files = sorted({p for g in globs for p in root.glob(g) if p.is_file()})
    docs: dict[str, str] = {}
    skipped: list[str] = []
    for p in files:
        rel = p.relative_to(root).as_posix()
        try:
            if p.stat().st_size > MAX_DOC_BYTES:
                raise ValueError("too large")
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, ValueError, OSError) as err:
            skipped.append(rel)
            log.warning("skipping %s: %s", rel, err)
            continue
        if text.strip():
            docs[rel] = text
    if not docs:
        raise InputError(source, "corpus.path",
                         f"expected a folder with non-empty text files matching {globs}, found none in {root}")
    return Corpus(root=root, docs=docs, skipped=tuple(skipped))


def chunk_text(doc: str, text: str, size: int, overlap: int) -> list[Chunk]:
    """Split into windows of about ``size`` characters, ``overlap`` characters shared between
    neighbours. Window ends move back to the last whitespace so words stay whole."""
    if not 0 <= overlap < size:
        raise ValueError(f"`0 <= overlap < size` must hold, but got (overlap={overlap}, size={size})")
    chunks: list[Chunk] = []
    start, n = 0, len(text)
    while start < n:
        end = min(start + size, n)
        if end < n:
            cut = text.rfind(" ", start + size // 2, end)
            cut = max(cut, text.rfind("\n", start + size // 2, end))
            end = cut if cut > start else end
        body = text[start:end]
        if body.strip():
            chunks.append(Chunk(id=f"{doc}#{start}-{end}", doc=doc, start=start, end=end, text=body))
        if end >= n:
            break
        start = max(end - overlap, start + 1)
    return chunks


def chunk_corpus(corpus: Corpus, size: int, overlap: int) -> list[Chunk]:
    return [c for name, text in corpus.docs.items() for c in chunk_text(name, text, size, overlap)]
