import pytest

from selftune.corpus import chunk_text, load_corpus
from selftune.errors import InputError


def test_chunks_cover_text_with_overlap():
    text = " ".join(f"word{i}" for i in range(400))
    chunks = chunk_text("d", text, size=200, overlap=50)
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    for a, b in zip(chunks, chunks[1:]):
        assert b.start < a.end  # overlapping neighbours: nothing falls between chunks
        assert a.end - b.start <= 50 + 1
        assert len(a.text) <= 200
    for c in chunks:
        assert text[c.start:c.end] == c.text
        assert c.text == c.text.strip() or c.end == len(text) or text[c.end] in " \n"


def test_no_overlap_partitions():
    text = "abc def ghi jkl mno pqr stu vwx yz " * 20
    chunks = chunk_text("d", text, size=60, overlap=0)
    assert "".join(text[c.start:c.end] for c in chunks).strip() == text.strip()


def test_bad_overlap():
    with pytest.raises(ValueError, match="overlap < size"):
        chunk_text("d", "text", size=10, overlap=10)


def test_load_skips_binary_and_reports_empty(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00binary")
    (tmp_path / "c.md").write_text("   ")
    corpus = load_corpus(tmp_path, ["*.txt", "*.md"])
    assert list(corpus.docs) == ["a.txt"] and corpus.skipped == ("b.txt",)
    digest = corpus.digest
    (tmp_path / "a.txt").write_text("hello world!")
    assert load_corpus(tmp_path, ["*.txt"]).digest != digest
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="corpus.path"):
        load_corpus(empty, ["*.txt"], "cfg.yaml")
