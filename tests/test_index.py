from selftune.corpus import load_corpus
from selftune.index import Embedder, Index


def test_build_once_then_reuse_without_embedding(tmp_path, corpus_dir):
    corpus = load_corpus(corpus_dir, ["*.txt"])
    emb = Embedder()
    index = Index(corpus, emb, tmp_path / "chroma")
    hits = index.search("What does the pass statement do?", 2, 200, 20)
    assert hits[0].doc == "pass.txt" and len(hits) == 2
    assert 0.0 < hits[1].score <= hits[0].score <= 1.0  # cosine similarity, best first
    assert index.built and emb.encoded > 2

    emb2 = Embedder()
    again = Index(corpus, emb2, tmp_path / "chroma")  # a new process would see the same folder
    hits2 = again.search("What does the pass statement do?", 2, 200, 20)
    assert [h.id for h in hits2] == [h.id for h in hits]
    assert again.built == [] and emb2.encoded == 1  # only the query was embedded

    other = again.search("generator", 1, 120, 0)  # a new chunking is its own collection
    assert again.built == [again.collection_name(120, 0)] and other[0].end - other[0].start <= 120


def test_changed_corpus_gets_a_new_collection(tmp_path, corpus_dir):
    a = Index(load_corpus(corpus_dir, ["*.txt"]), Embedder(), tmp_path / "c")
    (corpus_dir / "pass.txt").write_text("The pass statement does nothing at all, by design.")
    b = Index(load_corpus(corpus_dir, ["*.txt"]), Embedder(), tmp_path / "c")
    assert a.collection_name(200, 20) != b.collection_name(200, 20)


def test_interrupted_build_is_rebuilt(tmp_path, corpus_dir):
    corpus = load_corpus(corpus_dir, ["*.txt"])
    index = Index(corpus, Embedder(), tmp_path / "c")
    name = index.collection_name(200, 20)
    partial = index.client.get_or_create_collection(name)  # a build that died before `complete`
    partial.add(ids=["x"], documents=["x"], embeddings=[[0.0] * 384], metadatas=[{"doc": "x", "start": 0, "end": 1}])
    fresh = Index(corpus, Embedder(), tmp_path / "c")
    assert fresh.search("pass", 1, 200, 20)[0].id != "x" and fresh.built == [name]
