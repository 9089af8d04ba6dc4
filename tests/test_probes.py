import json

from conftest import DOCS, fake_role
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


def test_synthesize_drops_malformed_offtopic_and_duplicates_and_keeps_source():
    from selftune.probes import content_words
    script = iter(["", "What does the statement do?", "same", "same", "not a question"])

    def reply(m):
        sentence = m[-1]["content"].removeprefix("Sentence: ")
        kw = sorted(content_words(sentence))
        r = next(script, "topic")
        if r == "same":
            return f"What is said about {kw[0]} and {kw[1]}?"
        if r == "topic":
            return f"What does the text say of {kw[0]} and {kw[1]} and {kw[2]}?"
        return r

    role = fake_role(reply)
    probes, stats = synthesize(chunks(), role, count=4, seed=3, max_attempts=20)
    assert len(probes) == 4
    # "" and "not a question" are malformed; "What does the statement do?" shares too few words
    assert stats["errors"] == 0 and stats["dropped_malformed"] == 2 and stats["dropped_offtopic"] == 1
    for p in probes:
        assert p.reference and DOCS[p.source_doc][p.source_start:p.source_end] == p.reference
        assert p.source_chunk_ids


def test_near_duplicates_are_dropped(monkeypatch):
    import selftune.probes as P
    monkeypatch.setattr(P, "on_topic", lambda q, s: True)
    replies = iter(["What is said about the pass statement?", "What is said about the pass statement here?",
                    "What is said about the break statement?"])
    probes, stats = synthesize(chunks(), fake_role(lambda m: next(replies)), 3, 0, 3)
    assert [p.question for p in probes] == ["What is said about the pass statement?",
                                            "What is said about the break statement?"]
    assert stats["dropped_duplicate"] == 1


def test_generator_sees_the_sentence():
    role = fake_role(lambda m: json.dumps({"question": f"What is meant by: {m[-1]['content'][10:60]}?"}))
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


def test_local_generator_is_schema_constrained_with_demos():
    from selftune.probes import content_words

    def reply(m):
        kw = sorted(content_words(m[-1]["content"].removeprefix("Sentence: ")))
        return json.dumps({"question": f"What is said about {kw[0]} and {kw[1]}?"})
    role = fake_role(reply, local=True)
    probes, _ = synthesize(chunks(), role, count=1, seed=0, max_attempts=3)
    call = role.engine.calls[0]
    assert probes[0].question.startswith("What is said about")
    assert call["response_format"]["schema"]["properties"]["question"]["pattern"].endswith("[?]$")
    assert [m["role"] for m in call["messages"]] == ["system", "user", "assistant", "user", "assistant", "user"]


def test_off_topic_questions_are_dropped():
    from selftune.probes import on_topic
    s = "The pass statement is a null operation; nothing happens when it executes."
    assert on_topic("What happens when the pass statement executes?", s)
    assert not on_topic("What is the purpose of the built-in class def?", s)


def test_sentences_may_wrap_over_single_line_breaks():
    from selftune.probes import candidate_sentences
    from selftune.records import Chunk

    text = "The pass statement is a null operation; when it is\nexecuted, nothing happens at all here.\n\nNext one"
    (start, end, s), = candidate_sentences(Chunk(id="c", doc="d", start=100, end=100 + len(text), text=text))
    assert s == "The pass statement is a null operation; when it is executed, nothing happens at all here."
    assert text[start - 100:end - 100].endswith("here.") and start == 100
