import logging
import os

import pytest

from selftune.corpus import OUTSIDE, chunk_text, load_corpus
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
    assert list(corpus.docs) == ["a.txt"] and corpus.skipped == (("b.txt", "not UTF-8 text"),)
    digest = corpus.digest
    (tmp_path / "a.txt").write_text("hello world!")
    assert load_corpus(tmp_path, ["*.txt"]).digest != digest
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="corpus.path"):
        load_corpus(empty, ["*.txt"], "cfg.yaml")


def _linked_corpus(tmp_path):
    """A corpus holding a link to a file outside it, a link to a folder outside it (which links back
    to itself: a cycle), and links to a file and a folder inside it."""
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "passwd.txt").write_text("root:x:0:0:root:/root:/bin/bash")
    (outside / "sub" / "deep.md").write_text("a secret deeper down")
    (outside / "loop").symlink_to(outside, target_is_directory=True)
    root = tmp_path / "corpus"
    (root / "inner").mkdir(parents=True)
    (root / "a.txt").write_text("hello world")
    (root / "inner" / "b.md").write_text("an inner document")
    (root / "passwd.txt").symlink_to(outside / "passwd.txt")
    (root / "elsewhere").symlink_to(outside, target_is_directory=True)
    (root / "same.txt").symlink_to(root / "a.txt")
    (root / "again").symlink_to(root / "inner", target_is_directory=True)
    return root


def test_links_out_of_the_corpus_are_left_out_and_reported(tmp_path, caplog):
    root = _linked_corpus(tmp_path)
    with caplog.at_level(logging.WARNING, logger="selftune.corpus"):
        corpus = load_corpus(root, ["**/*.txt", "**/*.md"])
    assert list(corpus.docs) == ["a.txt", "inner/b.md", "same.txt"]  # links inside are fine, read once
    assert sorted(corpus.skipped) == [("elsewhere/", OUTSIDE), ("passwd.txt", OUTSIDE)]
    assert corpus.skipped_summary() == "2 files skipped: link outside the corpus folder"
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "elsewhere/, passwd.txt" in warning[0] and "corpus.follow_symlinks" in warning[0]
    # a glob that could not reach into the linked folder does not report it
    assert load_corpus(root, ["*.txt"]).skipped == (("passwd.txt", OUTSIDE),)


def test_links_are_followed_when_asked(tmp_path):
    corpus = load_corpus(_linked_corpus(tmp_path), ["**/*.txt", "**/*.md"], follow_symlinks=True)
    assert list(corpus.docs) == ["a.txt", "elsewhere/passwd.txt", "elsewhere/sub/deep.md", "inner/b.md",
                                 "passwd.txt", "same.txt"]  # the cycle elsewhere/loop is walked once
    assert corpus.skipped == () and corpus.docs["passwd.txt"].startswith("root:")


def test_size_limit_is_a_key_and_says_what_it_did(tmp_path):
    (tmp_path / "big.txt").write_text("word " * 400)
    (tmp_path / "small.txt").write_text("a small document")
    corpus = load_corpus(tmp_path, ["*.txt"], max_file_mb=0.001)
    assert list(corpus.docs) == ["small.txt"] and corpus.skipped == (("big.txt", "over the 0.001 MB limit"),)
    (tmp_path / "small.txt").unlink()
    with open(tmp_path / "huge.txt", "wb") as fh:  # sparse: 21 MB on paper, nothing on disk
        fh.truncate(21_000_000)
    with pytest.raises(InputError, match=r"found none in .*; 1 file skipped: over the 20 MB limit$"):
        load_corpus(tmp_path, ["huge.txt"], "cfg.yaml")
    with pytest.raises(InputError, match=r"2 files skipped: over the 0.001 MB limit$"):
        load_corpus(tmp_path, ["*.txt"], "cfg.yaml", max_file_mb=0.001)


def test_special_files_are_skipped_not_read(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    os.mkfifo(tmp_path / "pipe.txt")  # reading it would block for ever
    assert load_corpus(tmp_path, ["*.txt"]).skipped == (("pipe.txt", "not a regular file"),)


def test_crlf_is_read_as_text_mode_would(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"one\r\ntwo\rthree\n")
    assert load_corpus(tmp_path, ["*.txt"]).docs["a.txt"] == "one\ntwo\nthree\n"
