"""Loading documents safely, hashing them, and chunking them into character spans."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections import Counter
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from .errors import InputError
from .records import Chunk

log = logging.getLogger(__name__)

DEFAULT_MAX_FILE_MB = 20.0
OUTSIDE = "link outside the corpus folder"
NOT_UTF8 = "not UTF-8 text"
NOT_REGULAR = "not a regular file"


@dataclass(frozen=True)
class Corpus:
    root: Path
    docs: dict[str, str]  # relative path -> text, sorted by path
    # (relative path, reason) per file left out: a link outside the folder, over the size limit, not UTF-8...
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for name, text in self.docs.items():
            h.update(name.encode() + b"\0" + text.encode() + b"\0")
        return h.hexdigest()[:16]

    def skipped_summary(self) -> str:
        """e.g. "1 file skipped: over the 20 MB limit"; "" if none were."""
        return _summary(list(self.skipped))


def load_corpus(root: Path, globs: list[str], source: str | Path = "config", follow_symlinks: bool = False,
                max_file_mb: float = DEFAULT_MAX_FILE_MB) -> Corpus:
    """Every regular file under ``root`` whose relative path matches any glob (``**`` spans folders),
    decoded as UTF-8, sorted by path.

    A symlink (to a file or a folder) that resolves outside ``root`` is not read unless
    ``follow_symlinks``; links to folders inside ``root`` are not descended (their files are read
    where they are). Files over ``max_file_mb``, not UTF-8 or unreadable are skipped too. Skipped
    files are reported in ``Corpus.skipped`` and one warning line per reason. A corpus left with no
    non-empty document is an InputError naming ``corpus.path`` and saying what was skipped and why.
    """
    real_root = root.resolve()
    limit = int(max_file_mb * 1_000_000)
    too_big = f"over the {max_file_mb:g} MB limit"
    docs: dict[str, str] = {}
    skipped: list[tuple[str, str]] = []
    for rel, path in _walk(root, real_root, globs, follow_symlinks, skipped):
        if not follow_symlinks and not _inside(path.resolve(), real_root):
            skipped.append((rel, OUTSIDE))
            continue
        try:
            if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or device would block or never end
                skipped.append((rel, NOT_REGULAR))
                continue
            with path.open("rb") as fh:
                data = fh.read(limit + 1)  # bounded even if the file grows or lies about its size
        except OSError as err:
            skipped.append((rel, f"unreadable ({err.strerror or err})"))
            continue
        if len(data) > limit:
            skipped.append((rel, too_big))
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append((rel, NOT_UTF8))
            continue
        text = text.replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads it
        if text.strip():
            docs[rel] = text
    if not docs:
        why = f"; {_summary(skipped)}" if skipped else ""
        raise InputError(source, "corpus.path",
                         f"expected a folder with non-empty text files matching {globs}, found none in {root}{why}")
    _warn(skipped, too_big)
    return Corpus(root=root, docs=docs, skipped=tuple(skipped))


def _walk(root: Path, real_root: Path, globs: list[str], follow: bool,
          skipped: list[tuple[str, str]]) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every file matching a glob, sorted. A link to a folder inside
    ``root`` is not descended (its files are read where they are); one outside is descended only
    when ``follow`` (each real folder once, so a link cycle ends), else it is added to ``skipped``
    if a glob could reach into it. Unreadable folders are added to ``skipped``."""
    patterns = [[s for s in g.split("/") if s not in ("", ".")] for g in globs]
    out: list[tuple[str, Path]] = []
    seen = {str(real_root)}

    def unreadable(err: OSError) -> None:
        rel = os.path.relpath(err.filename, root) if err.filename else "."
        skipped.append((Path(rel).as_posix() + "/", f"unreadable folder ({err.strerror or err})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=follow):
        here = Path(dirpath)
        base = here.relative_to(root).parts
        keep = []
        for d in sorted(dirnames):
            parts, real = (*base, d), os.path.realpath(here / d)
            if (here / d).is_symlink():
                if _inside(Path(real), real_root):
                    continue
                if not follow:
                    if any(_could_match_below(parts, p) for p in patterns):
                        skipped.append(("/".join(parts) + "/", OUTSIDE))
                    continue
            if real not in seen:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            parts = (*base, f)
            if any(_match(parts, p) for p in patterns):
                out.append(("/".join(parts), here / f))
    return sorted(out)


def _match(parts: tuple[str, ...], pat: list[str]) -> bool:
    """pathlib glob semantics on path segments: ``**`` is zero or more folders, ``*`` stays in one."""
    if not pat:
        return not parts
    if pat[0] == "**":
        return any(_match(parts[i:], pat[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pat[0]) and _match(parts[1:], pat[1:])


def _could_match_below(parts: tuple[str, ...], pat: list[str]) -> bool:
    """Whether some file below the folder ``parts`` could match ``pat``."""
    if not parts:
        return bool(pat)
    if not pat:
        return False
    if pat[0] == "**":
        return True
    return fnmatchcase(parts[0], pat[0]) and _could_match_below(parts[1:], pat[1:])


def _inside(real: Path, real_root: Path) -> bool:
    return real == real_root or real_root in real.parents


def _summary(skipped: list[tuple[str, str]]) -> str:
    """e.g. "1 file skipped: over the 20 MB limit", "3 files skipped: not UTF-8 text (2), ... (1)"."""
    if not skipped:
        return ""
    counts = Counter(reason for _, reason in skipped)
    n = len(skipped)
    reasons = ", ".join(f"{r} ({k})" for r, k in sorted(counts.items())) if len(counts) > 1 else next(iter(counts))
    return f"{n} file{'s' * (n != 1)} skipped: {reasons}"


def _warn(skipped: list[tuple[str, str]], too_big: str) -> None:
    """One warning line per reason, naming up to 5 files and the config key that changes it."""
    hints = {OUTSIDE: " (set corpus.follow_symlinks: true to read them)",
             too_big: " (raise corpus.max_file_mb to read them)"}
    by_reason: dict[str, list[str]] = {}
    for rel, reason in skipped:
        by_reason.setdefault(reason, []).append(rel)
    for reason, rels in sorted(by_reason.items()):
        more = f" and {len(rels) - 5} more" if len(rels) > 5 else ""
        log.warning("corpus: skipped %d file%s, %s%s: %s%s", len(rels), "s" * (len(rels) != 1), reason,
                    hints.get(reason, ""), ", ".join(rels[:5]), more)


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
