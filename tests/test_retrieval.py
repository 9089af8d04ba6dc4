"""Hybrid retrieval (BM25 fused with the dense ranking) and the retrieval-only objective, on a real
chromadb, the real embedder and real bm25s indexes under tmp_path."""

import json

import pytest

from selftune.corpus import load_corpus
from selftune.index import Embedder, Index
from selftune.records import Chunk, Probe
from selftune.retrieval import Ranking, fuse, retrieval_scores

KITCHEN = ("Bake the bread for forty minutes and keep the oven door closed while it rises. "
           "The recipe card is filed under the label qv7xk in the kitchen drawer.")
# Means "break" to the embedder; its only word found in the corpus is the kitchen label.
KEYWORD_QUERY = "Terminating iteration prematurely: qv7xk?"
QUESTIONS = ["What does the pass statement do?", "When is AssertionError raised?",
             "What does a generator function return?", KEYWORD_QUERY]


@pytest.fixture
def docs(corpus_dir):
    (corpus_dir / "kitchen.txt").write_text(KITCHEN, encoding="utf-8")
    return corpus_dir


def make_index(docs, tmp_path, emb=None):
    return Index(load_corpus(docs, ["*.txt"]), emb or Embedder(), tmp_path / "chroma")


def test_weight_zero_is_the_dense_ranking(docs, tmp_path):
    index = make_index(docs, tmp_path)
    col = index.collection(200, 20)
    for q in QUESTIONS:
        raw = col.query(query_embeddings=index.embedder.encode([q]), n_results=3)["ids"][0]  # today's query
        assert [c.id for c in index.search(q, 3, 200, 20)] == raw
        assert [c.id for c in index.search(q, 3, 200, 20, weight=0.0)] == raw
        assert [c.id for c in index.rankings([q], 200, 20)[0].top(3, 0.0)] == raw  # what the screen sees


def test_weight_one_ranks_a_keyword_only_match_first(docs, tmp_path):
    index = make_index(docs, tmp_path)
    ranking = index.rankings([KEYWORD_QUERY], 200, 20)[0]
    kitchen = "kitchen.txt#0-148"
    assert ranking.dense[0].startswith("break.txt") and ranking.lexical == (kitchen,)  # the premise
    assert index.search(KEYWORD_QUERY, 2, 200, 20, weight=0.0)[0].doc == "break.txt"
    top = index.search(KEYWORD_QUERY, 3, 200, 20, weight=1.0)
    assert top[0].id == kitchen
    # chunks with no query term follow in dense order
    assert [c.id for c in top[1:]] == [c for c in ranking.dense if c != kitchen][:2]
    # on the way between, the fused list holds both
    assert {c.doc for c in index.search(KEYWORD_QUERY, 2, 200, 20, weight=0.5)} == {"kitchen.txt", "break.txt"}


def test_fuse_by_hand():
    dense, lexical = ("a", "b", "c"), ("c", "d")
    assert fuse(dense, lexical, 0.0, 3) == ["a", "b", "c"]
    assert fuse(dense, lexical, 1.0, 4) == ["c", "d", "a", "b"]
    # at 0.5 (halved): c = 1/63 + 1/61 > a = 1/61 > b = 1/62 = d, a tie broken by dense rank
    assert fuse(dense, lexical, 0.5, 4) == ["c", "a", "b", "d"]
    with pytest.raises(ValueError, match="weight"):
        fuse(dense, lexical, 1.5, 2)


def test_bm25_index_is_built_once_and_reused_from_disk(docs, tmp_path):
    first = make_index(docs, tmp_path)
    hits = [c.id for c in first.search(KEYWORD_QUERY, 3, 200, 20, weight=0.7)]
    name = first.bm25.name(first.corpus.digest, 200, 20)
    assert first.bm25.built == [name] and (tmp_path / "bm25" / name / "selftune.json").is_file()
    assert not [p for p in (tmp_path / "bm25").iterdir() if p.name.startswith(".")]  # no leftover temp folder

    emb = Embedder()
    again = make_index(docs, tmp_path, emb)  # a new process sees only the folders
    assert [c.id for c in again.search(KEYWORD_QUERY, 3, 200, 20, weight=0.7)] == hits
    assert again.bm25.built == [] and again.built == [] and emb.encoded == 1

    again.search(KEYWORD_QUERY, 3, 120, 0, weight=0.7)  # another chunking is its own index
    assert again.bm25.built == [again.bm25.name(again.corpus.digest, 120, 0)]


def test_bm25_index_whose_chunks_changed_is_rebuilt(docs, tmp_path):
    index = make_index(docs, tmp_path)
    index.search(KEYWORD_QUERY, 2, 200, 20, weight=1.0)
    meta = tmp_path / "bm25" / index.bm25.name(index.corpus.digest, 200, 20) / "selftune.json"
    meta.write_text(json.dumps({"ids": "something else", "chunks": 1}))  # e.g. chunking code changed
    fresh = make_index(docs, tmp_path)
    assert fresh.search(KEYWORD_QUERY, 1, 200, 20, weight=1.0)[0].doc == "kitchen.txt"
    assert len(fresh.bm25.built) == 1


def chunk(cid: str) -> Chunk:
    doc, span = cid.split("#")
    start, end = (int(x) for x in span.split("-"))
    return Chunk(id=cid, doc=doc, start=start, end=end, text="x")


class FixedIndex:
    """Rankings given by hand: the objective's arithmetic can be checked exactly."""

    def __init__(self, table: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]):
        self.table, self.calls = table, []

    def rankings(self, questions, size, overlap, depth=20):
        self.calls.append((tuple(questions), size, overlap, depth))
        return [Ranking(dense=self.table[q][0], lexical=self.table[q][1],
                        chunks={c: chunk(c) for c in self.table[q][0] + self.table[q][1]}, depth=depth)
                for q in questions]


def probe(pid: str, doc: str = "", start: int = 0, end: int = 0) -> Probe:
    return Probe(id=pid, question=pid, source_doc=doc, source_start=start, source_end=end)


def test_retrieval_scores_by_hand():
    table = {"q1": (("a#0-10", "b#0-10", "c#0-10"), ("c#0-10",)),   # source b: dense rank 2
             "q2": (("d#0-10", "e#0-10", "f#0-10"), ("f#0-10", "e#0-10")),  # source f: dense 3, lexical 1
             "q3": (("g#0-10", "h#0-10", "i#0-10"), ()),               # source g: dense 1
             "q4": (("x#0-10",), ())}
    probes = [probe("q1", "b", 3, 5), probe("q2", "f", 8, 12), probe("q3", "g", 0, 1), probe("q4", "y", 0, 4),
              probe("no-source")]  # a probe without a known source is not counted
    index = FixedIndex(table)
    base = {"chunk_size": 100, "chunk_overlap": 0}
    s = retrieval_scores(index, probes, {**base, "top_k": 1})
    assert s == {"hit": pytest.approx(1 / 4), "mrr": pytest.approx(1 / 4), "n": 4}
    s = retrieval_scores(index, probes, {**base, "top_k": 2})
    assert s["hit"] == pytest.approx(2 / 4) and s["mrr"] == pytest.approx((1 / 2 + 1) / 4)
    s = retrieval_scores(index, probes, {**base, "top_k": 3})
    assert s["hit"] == pytest.approx(3 / 4) and s["mrr"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 4)
    # BM25 only: q1 -> c, a, b (no-term chunks in dense order), q2 -> f, e, q3 -> g, h (dense order)
    s = retrieval_scores(index, probes, {**base, "top_k": 2, "hybrid_weight": 1.0})
    assert s["hit"] == pytest.approx(2 / 4) and s["mrr"] == pytest.approx((1 + 1) / 4)
    s = retrieval_scores(index, probes, {**base, "top_k": 3, "hybrid_weight": 1.0})
    assert s["hit"] == pytest.approx(3 / 4) and s["mrr"] == pytest.approx((1 / 3 + 1 + 1) / 4)
    assert retrieval_scores(index, [probe("no-source")], {**base, "top_k": 2}) == {"hit": None, "mrr": None, "n": 0}
    assert index.calls[0] == (("q1", "q2", "q3", "q4"), 100, 0, 20)  # one batch, at the fixed depth


def test_retrieval_scores_agree_with_search_and_query_each_question_once(docs, tmp_path):
    emb = Embedder()
    index = make_index(docs, tmp_path, emb)
    index.collection(200, 20), index.collection(120, 0)
    embedded_chunks = emb.encoded
    corpus = index.corpus
    probes = []
    for i, (q, doc, phrase) in enumerate([
            ("What does the pass statement do?", "pass.txt", "null operation"),
            ("When is AssertionError raised?", "assert.txt", "raises AssertionError"),
            ("What does a generator function return?", "yield.txt", "returns an iterator"),
            (KEYWORD_QUERY, "kitchen.txt", "qv7xk"),
            ("Which clause runs when break leaves a try statement?", "break.txt", "finally clause")]):
        start = corpus.docs[doc].index(phrase)
        probes.append(Probe(id=f"p{i}", question=q, source_doc=doc, source_start=start, source_end=start + len(phrase)))
    for k in (1, 2, 3):
        for size, overlap in ((200, 20), (120, 0)):
            for w in (0.0, 0.5, 1.0):
                s = retrieval_scores(index, probes, {"top_k": k, "chunk_size": size, "chunk_overlap": overlap,
                                                     "hybrid_weight": w})
                ranks = []
                for p in probes:
                    found = [i for i, c in enumerate(index.search(p.question, k, size, overlap, weight=w))
                             if c.overlaps(p.source_doc, p.source_start, p.source_end)]
                    ranks.append(1 / (found[0] + 1) if found else 0.0)
                assert s["n"] == 5 and s["hit"] == pytest.approx(sum(r > 0 for r in ranks) / 5)
                assert s["mrr"] == pytest.approx(sum(ranks) / 5)
    assert emb.encoded - embedded_chunks == len(probes)  # each question embedded once, whatever the setting
