"""Hybrid retrieval: a BM25 index per chunking (``bm25s``), fused with the dense ranking by weighted
reciprocal rank fusion, and the cheap retrieval objective the search screens settings with.

Fusion: ``score(c) = (1 - w) / (K + dense_rank(c)) + w / (K + bm25_rank(c))`` over both candidate
lists (ranks from 1; a chunk absent from a list gets nothing from it), ties broken by dense rank,
then BM25 rank. ``w = 0`` is the dense ranking exactly, ``w = 1`` the BM25 ranking exactly (chunks
with no query term follow in dense order). Rank fusion needs no score calibration between cosine
and BM25 scales, which is why it is the usual choice (Cormack et al. 2009, K = 60).

A ``Ranking`` holds one question's candidates under one chunking at a fixed depth, so every
``top_k <= depth`` and every weight are answered from it without another query.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .records import Chunk, Params, Probe

if TYPE_CHECKING:
    from .index import Index

log = logging.getLogger(__name__)

RRF_K = 60
DEPTH = 20  # candidates kept per list; fused results depend on it, so it is fixed, not derived from k
# Tokenizer settings (part of the cache key). No stopword list: on a programming-language corpus the
# English lists drop keywords that carry the meaning ("with", "is", "not", "for", "in"); BM25's IDF
# already gives words found in every chunk almost no weight.
TOKENIZER: dict[str, Any] = {"lower": True, "token_pattern": r"(?u)\b\w\w+\b", "stopwords": None, "stemmer": None}
BM25_PARAMS: dict[str, Any] = {"method": "lucene", "k1": 1.5, "b": 0.75}


def tokenize(texts: list[str]) -> list[list[str]]:
    import bm25s

    out = bm25s.tokenize(texts, lower=TOKENIZER["lower"], token_pattern=TOKENIZER["token_pattern"],
                         stopwords=TOKENIZER["stopwords"], stemmer=None, return_ids=False, show_progress=False)
    return [list(t) for t in out]  # type: ignore[union-attr]


def fuse(dense: Sequence[str], lexical: Sequence[str], weight: float, k: int) -> list[str]:
    """The ``k`` best ids under weighted reciprocal rank fusion (see the module docstring)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"`0 <= weight <= 1` must hold, but got weight={weight}")
    if weight == 0.0:
        return list(dense[:k])
    d = {cid: i for i, cid in enumerate(dense)}
    lx = {cid: i for i, cid in enumerate(lexical)}

    def key(cid: str) -> tuple[float, float, float, str]:
        score = ((1 - weight) / (RRF_K + d[cid] + 1) if cid in d else 0.0) + \
                (weight / (RRF_K + lx[cid] + 1) if cid in lx else 0.0)
        return (-score, d.get(cid, math.inf), lx.get(cid, math.inf), cid)

    return sorted(dict.fromkeys([*dense, *lexical]), key=key)[:k]


@dataclass(frozen=True)
class Ranking:
    """One question's candidates under one chunking: dense ids (nearest first), BM25 ids (best
    first, chunks sharing no term with the question left out), both cut at ``depth``."""

    dense: tuple[str, ...]
    lexical: tuple[str, ...]
    chunks: dict[str, Chunk] = field(repr=False)
    depth: int

    def top(self, k: int, weight: float = 0.0) -> list[Chunk]:
        if k > self.depth:
            raise ValueError(f"`k <= depth` must hold, but got (k={k}, depth={self.depth})")
        return [self.chunks[cid] for cid in fuse(self.dense, self.lexical, weight, k)]


class BM25Store:
    """BM25 indexes persisted under ``root``, one folder per (corpus digest, chunking, tokenizer,
    BM25 parameters). A folder appears only once complete (written aside, then renamed), and is
    rebuilt if its chunk ids do not match the chunking's; ``built`` names the ones this process made."""

    def __init__(self, root: Path):
        self.root = root
        self.built: list[str] = []
        self._loaded: dict[str, Any] = {}

    @staticmethod
    def name(digest: str, size: int, overlap: int) -> str:
        import bm25s

        key = json.dumps([digest, size, overlap, TOKENIZER, BM25_PARAMS, bm25s.__version__], sort_keys=True)
        return "bm25-" + hashlib.sha256(key.encode()).hexdigest()[:24]

    def get(self, name: str, chunks: list[Chunk]) -> Any:
        """The index for ``chunks`` (in this order): loaded if saved, else built and saved."""
        import bm25s

        if name in self._loaded:
            return self._loaded[name]
        folder = self.root / name
        ids_digest = hashlib.sha256("\n".join(c.id for c in chunks).encode()).hexdigest()
        meta_file = folder / "selftune.json"
        if meta_file.is_file() and json.loads(meta_file.read_text()).get("ids") == ids_digest:
            model = bm25s.BM25.load(str(folder), show_progress=False)
        else:
            log.info("building BM25 over %d chunks into %s", len(chunks), folder)
            model = bm25s.BM25(**BM25_PARAMS)
            model.index(tokenize([c.text for c in chunks]), show_progress=False)
            tmp = self.root / f".{name}.{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save(str(tmp), show_progress=False)
            (tmp / "selftune.json").write_text(json.dumps({"ids": ids_digest, "chunks": len(chunks)}))
            shutil.rmtree(folder, ignore_errors=True)  # a stale or partial index
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished the same index first: theirs is as good
                shutil.rmtree(tmp, ignore_errors=True)
            self.built.append(name)
        self._loaded[name] = model
        return model

    @staticmethod
    def ranked(model: Any, question: str, depth: int) -> list[int]:
        """Positions of the ``depth`` best-scoring chunks that share a term with ``question``."""
        import numpy as np

        ids = model.get_tokens_ids(tokenize([question])[0])
        if not ids:
            return []
        scores = np.asarray(model.get_scores_from_ids(ids))
        order = np.argsort(-scores, kind="stable")[:depth]  # stable: ties keep corpus order
        return [int(i) for i in order if scores[i] > 0]


def has_source(probe: Probe) -> bool:
    return bool(probe.source_doc) and probe.source_end > probe.source_start


def retrieval_scores(index: Index, probes: list[Probe], params: Params) -> dict[str, float | int | None]:
    """The retrieval-only objective of one setting, no LLM call: over the probes with a known source
    span, ``hit`` is the share whose top ``top_k`` chunks include one overlapping the span (hit@k),
    ``mrr`` the mean reciprocal rank of the first such chunk within the top ``top_k`` (0 when none:
    MRR@k), ``n`` the number of such probes (``hit``/``mrr`` are None when it is 0). Params read:
    ``top_k``, ``chunk_size``, ``chunk_overlap``, ``hybrid_weight`` (default 0). Pass train and
    validation probes only. Cheap after the first call per chunking: questions are embedded once per
    ``Index`` and each chunking is queried once per question (``Index.rankings`` caches both)."""
    known = [p for p in probes if has_source(p)]
    if not known:
        return {"hit": None, "mrr": None, "n": 0}
    k, weight = int(params["top_k"]), float(params.get("hybrid_weight", 0.0))
    rankings = index.rankings([p.question for p in known], int(params["chunk_size"]), int(params["chunk_overlap"]),
                              depth=max(k, DEPTH))
    hits, rr = 0, 0.0
    for p, ranking in zip(known, rankings, strict=True):
        for i, c in enumerate(ranking.top(k, weight)):
            if c.overlaps(p.source_doc, p.source_start, p.source_end):
                hits, rr = hits + 1, rr + 1 / (i + 1)
                break
    return {"hit": hits / len(known), "mrr": rr / len(known), "n": len(known)}
