from conftest import DOCS, fake_role, field
from selftune.config import SplitSpec
from selftune.corpus import chunk_text
from selftune.probes import assign_splits, candidate_sentences, clean_question, digest, load_user_probes, synthesize
from selftune.records import Probe


def chunks():
    return [c for name, text in DOCS.items() for c in chunk_text(name, text, 400, 0)]


def test_clean_question():
    assert clean_question("Question: What does pass do? It does nothing.") == "What does pass do?"
    assert clean_question("  \n") is None
    assert clean_question("No question mark here") is None
    assert clean_question("Why?") is None  # too short
    assert clean_question("* 123 what?") is None


def test_candidate_sentences_have_document_offsets():
    c = chunk_text("assert.txt", DOCS["assert.txt"], 1000, 0)[0]
    for start, end, s in candidate_sentences(c):
        assert DOCS["assert.txt"][start:end] == s


def test_synthesize_drops_malformed_and_duplicates_and_keeps_source():
    replies = iter(["", "What does the statement do?", "What does the statement do?", "not a question",
                    *[f"Which rule number {i} applies here?" for i in range(40)]])
    role = fake_role(lambda m: next(replies))
    probes, stats = synthesize(chunks(), role, count=4, seed=3, max_attempts=20)
    assert len(probes) == 4
    # the empty reply is refused by DSPy itself (counted as an error), the other two are filtered here
    assert stats["errors"] == 1 and stats["dropped_malformed"] == 1 and stats["dropped_duplicate"] == 1
    for p in probes:
        assert p.reference and DOCS[p.source_doc][p.source_start:p.source_end] == p.reference
        assert p.source_chunk_ids


def test_generator_sees_the_sentence():
    role = fake_role(lambda m: f"What is meant by: {field(m, 'Sentence')[:30]}?")
    probes, _ = synthesize(chunks(), role, count=2, seed=0, max_attempts=5)
    assert all(p.reference[:20] in p.question for p in probes)


def test_splits_are_seeded_disjoint_and_complete():
    probes = [Probe(id=f"{i:03d}", question=f"q{i}?") for i in range(30)]
    a = assign_splits(probes, SplitSpec(), seed=1)
    b = assign_splits(list(reversed(probes)), SplitSpec(), seed=1)
    assert {p.id: p.split for p in a} == {p.id: p.split for p in b}
    counts = {s: sum(p.split == s for p in a) for s in ("train", "val", "test")}
    assert counts == {"train": 12, "val": 9, "test": 9}
    assert digest(a) == digest(b) and digest(a) != digest(assign_splits(probes, SplitSpec(), seed=2))


def test_user_probes_jsonl(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text('{"question": "What is pass?", "reference": "A null operation."}\n\n{"question": "Why?"}\n')
    got = load_user_probes(p)
    assert [g.reference_origin for g in got] == ["human", "human"] and got[1].reference is None
    p.write_text('{"question": ""}\n')
    import pytest

    from selftune.errors import InputError
    with pytest.raises(InputError, match="line 1.question"):
        load_user_probes(p)
