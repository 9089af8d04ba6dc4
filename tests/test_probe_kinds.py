"""Probe kinds on real Language Reference topics with a scripted generator (no model): each kind's
question shape and its known evidence, the mix, personas, dedup and the cross-split check."""

import json
import random

import pytest

from conftest import ROOT, fake_role
from selftune import probe_kinds as K
from selftune.config import load_config
from selftune.corpus import chunk_corpus, load_corpus
from selftune.demo_corpus import materialize
from selftune.errors import InputError
from selftune.probes import content_words
from selftune.records import Probe

TOPICS = ["assert", "pass", "break", "continue", "del", "return", "global", "raise", "with", "for"]
ALL = {k: 1.0 for k in ("single", "multi", "comparison", "procedural", "unanswerable", "vague", "misspelled",
                        "keyword")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("pyref")
    materialize(d, TOPICS)
    c = load_corpus(d, ["*.txt"])
    return c, chunk_corpus(c, 500, 100)


def generator(persona_seen=None):
    def reply(m):
        if persona_seen is not None:
            persona_seen.append(m[0]["content"])
        kw = sorted(content_words(m[-1]["content"].removeprefix("Sentence: ")))
        if "how to do something" in m[0]["content"]:  # the procedural fallback's schema asks for "How do I"
            return json.dumps({"question": f"How do I use {kw[0]} with {kw[1]}?"})
        return json.dumps({"question": f"What is said about {kw[0]} and {kw[1]} and {kw[-1]}?"})
    return fake_role(reply)


def test_plan_shares_the_count_by_the_mix():
    assert K.plan({"single": 0.4, "multi": 0.2, "unanswerable": 0.4}, 10) == {"single": 4, "multi": 2,
                                                                                "unanswerable": 4}
    got = K.plan(ALL, 20)
    assert sum(got.values()) == 20 and set(got.values()) <= {2, 3}
    assert K.plan({"single": 1, "keyword": 0}, 7) == {"single": 7}


def test_every_kind_is_made_with_its_own_evidence(corpus):
    c, chunks = corpus
    personas = [type("P", (), {"name": "novice", "description": "a beginner"})()]
    probes, stats = K.make_probes(chunks, c.docs, generator(), ALL, 24, seed=1, max_attempts=400,
                                  personas=personas)
    by = {}
    for p in probes:
        by.setdefault(p.kind, []).append(p)
    assert set(by) == set(ALL), stats
    assert all(p.persona == "novice" for p in probes)
    for p in probes:
        spans = ([(p.source_doc, p.source_start, p.source_end)] if p.source_doc else []) + \
            [(s.doc, s.start, s.end) for s in p.more_sources]
        assert spans, p
        for doc, a, b in spans:  # every recorded source is a real span of the corpus
            assert " ".join(c.docs[doc][a:b].split())
        if p.kind in ("multi", "comparison"):
            assert len(spans) == 2 and len(p.source_chunk_ids) == 2
            for doc, a, b in spans:
                assert " ".join(c.docs[doc][a:b].split()) in p.reference
        elif p.kind == "unanswerable":
            assert not p.answerable and p.reference is None and "no sentence mentioning" in p.verified
        else:
            assert p.answerable and p.reference == " ".join(c.docs[p.source_doc][p.source_start:p.source_end].split())
    assert all(p.question.startswith(("How does", "What is the difference")) for p in by["comparison"])
    assert all(", and " in p.question for p in by["multi"])
    assert all(p.question.startswith("How do I ") for p in by["procedural"])
    assert all("?" not in p.question for p in by["keyword"])
    assert all(p.section.lower() in p.question.lower() or '"' in p.question for p in by["vague"])
    assert all(p.question == p.question.lower() and "?" not in p.question for p in by["misspelled"])
    assert stats["kind/single/made"] == len(by["single"]) and stats["attempts"] <= 400
    assert stats.get("procedural_generated", 0) + stats.get("procedural_extracted", 0) == len(by["procedural"])
    assert len({p.id for p in probes}) == len(probes)


def test_the_persona_reaches_the_generator(corpus):
    c, chunks = corpus
    seen = []
    personas = [type("P", (), {"name": "sre", "description": "an on-call engineer in a hurry"})()]
    K.make_probes(chunks, c.docs, generator(seen), {"single": 1}, 2, seed=0, max_attempts=10, personas=personas)
    assert seen and all("an on-call engineer in a hurry" in s for s in seen)


def test_procedural_extraction_and_user_style_rewrites():
    assert K.procedure("Assert statements are a convenient way to insert debugging assertions into a program.") \
        == "How do I insert debugging assertions into a program?"
    assert K.procedure("The for statement is used to iterate over the elements of a sequence.") \
        == "How do I iterate over the elements of a sequence?"
    assert K.procedure("The pass statement is a null operation.") is None
    assert K.keywords('What does the "assert" statement raise when the expression is false?') \
        == "assert statement raise expression false"
    q = "What happens when the interpreter executes the statement?"
    typo = K.typos(q, random.Random(0))
    assert typo != q.lower().rstrip("?") and len(typo.split()) == len(q.split())


def test_procedural_questions_are_cut_at_a_clause_boundary():
    long = ("The with statement is used to wrap the execution of a block of code with methods defined by a "
            "context manager so that common try and finally usage patterns can be encapsulated for reuse.")
    q = K.procedure(long)
    assert q == "How do I wrap the execution of a block of code with methods defined by a context manager?"
    assert len(q) - len("How do I ?") <= K.MAX_VP
    # no clause boundary within the limit: no question rather than one cut mid-clause
    assert K.procedure("The statement is used to " + " ".join(["frobnicate"] * 12) + " and more.") is None
    # from the demo corpus: "otherwise" is no clause boundary; a phrase a quoted name stopped loses its dangling words
    assert K.procedure("The yield statement can be used to omit the parentheses that would otherwise be required "
                       "in the equivalent yield expression statement.") == "How do I omit the parentheses?"
    assert K.procedure('The following methods are used to override the default behavior of the "isinstance()" '
                       'built-in function.') == "How do I override the default behavior?"
    assert K.clause_cut("delete names when they are bound", 20) == "delete names"
    assert K.clause_cut("delete the names bound in a block when they leave it", 20) is None


def test_multi_questions_whose_halves_repeat_are_dropped(corpus, monkeypatch):
    assert K.same_question("What does the pass statement do?", "What does the pass statement do?")
    assert K.same_question("What does the pass statement do?", "What does a pass statement do?")
    assert not K.same_question("What does the pass statement do?", "When is the break statement executed?")
    c, chunks = corpus
    probes, _ = K.make_probes(chunks, c.docs, generator(), {"multi": 1}, 3, seed=0, max_attempts=12)
    assert probes
    for p in probes:
        a, b = p.question.split(", and ")
        assert not K.same_question(a + "?", b)
    # a generator that writes one question whatever the sentence: every pair repeats itself
    monkeypatch.setattr(K, "_ask", lambda ctx, sentence, persona: "What does the statement do?")
    probes, stats = K.make_probes(chunks, c.docs, generator(), {"multi": 1}, 3, seed=0, max_attempts=12)
    assert probes == [] and stats["dropped_repeat"] == 12


def test_unanswerable_verification_drops_what_the_corpus_answers(corpus):
    c, _ = corpus
    sents = K.verify_sentences(c.docs)
    proposed = next(cue for t, cue in K.UNANSWERABLE if "proposed" in t)
    companies = next(cue for t, cue in K.UNANSWERABLE if "companies" in t)
    # the with topic names its PEP ("PEP 343 - The "with" statement"): who proposed it is answered
    assert K.answered_in(sents, "with", proposed) is not None
    assert K.answered_in(sents, "__debug__", companies) is None


def test_unanswerable_verification_reads_only_sentences_that_mention_the_name():
    year = next(cue for t, cue in K.UNANSWERABLE if "year" in t)
    docs = {"a.txt": "The frobnicate() helper swaps two names.  The walrus form was added in version 3.8.\n\n"
                     "A bypass of the cache was added in version 3.2.\n",
            "b.txt": "The spam_eggs function was added in version 3.4.\n"}
    sents = K.verify_sentences(docs)
    # a cue in the next sentence (a window of characters around the mention would see it) is about something else
    assert K.answered_in(sents, "frobnicate()", year) is None
    assert K.answered_in(sents, "pass", year) is None  # "bypass" does not mention pass
    assert K.answered_in(sents, "spam_eggs", year) == "b.txt@0"
    assert K.answered_in(sents, "walrus", year) is not None
    # cues the hand check found answering nothing: a change note is not when a thing came or went, the
    # constructor that creates an object did not propose it, the bytes type is no memory size
    cue = {t.split(" {x}")[0]: c for t, c in K.UNANSWERABLE}
    note = K.verify_sentences({"r.txt": 'Changed in version 3.3: "None" is now permitted as "Y" in "raise X from Y".'
                                        '  They are created by the built-in "bytearray()" constructor.  The '
                                        '"__hash__()" values of str and bytes objects are salted.  A "__slots__" '
                                        'entry saves 48 bytes per instance.'})
    assert K.answered_in(note, "None", cue["In which Python version was"]) is None
    assert K.answered_in(note, "None", cue["In which year was"]) is None
    assert K.answered_in(note, "bytearray()", cue["Who first proposed"]) is None
    assert K.answered_in(note, "__hash__()", cue["How many bytes of memory does"]) is None
    assert K.answered_in(note, "__slots__", cue["How many bytes of memory does"]) is not None
    # a callable is mentioned with or without its parentheses
    dep = K.verify_sentences({"c.txt": 'Chaining "@classmethod" descriptors is deprecated since version 3.11.'})
    assert K.answered_in(dep, "classmethod()", cue["In which Python version was"]) is not None
    assert K.mentions("len()").search("call len on it") and not K.mentions("len()").search("the length")


def test_unanswerable_probes_prefer_near_miss_templates(corpus):
    c, chunks = corpus
    probes, stats = K.make_probes(chunks, c.docs, None, {"unanswerable": 1}, 12, seed=3, max_attempts=200)
    assert len(probes) == 12 and stats["unanswerable_near"] + stats.get("unanswerable_far", 0) == 12
    sents = K.verify_sentences(c.docs)
    near = [t for t, _ in K.UNANSWERABLE[:K.NEAR_MISS]]
    for p in probes:
        name = p.question.split('"')[1]
        template = p.question.replace(f'"{name}"', "{x}")
        assert K.answered_in(sents, name, dict(K.UNANSWERABLE)[template]) is None
        if template not in near:  # a far one only when every near-miss template is answered for the name
            assert all(K.answered_in(sents, name, cue) is not None for _, cue in K.UNANSWERABLE[:K.NEAR_MISS])
    assert stats["unanswerable_near"] > stats.get("unanswerable_far", 0)


def test_mix_keys_are_checked_and_change_the_probe_cache_key(tmp_path, corpus_dir):
    from conftest import write_config

    bad = write_config(tmp_path, corpus_dir, probes="{count: 9, mix: {single: 1, riddle: 1}}")
    with pytest.raises(InputError, match=r"probes\.mix.*unknown probe kind 'riddle'"):
        load_config(bad)
    bad = write_config(tmp_path, corpus_dir, probes="{count: 9, personas: [{name: a}]}")
    with pytest.raises(InputError, match=r"probes\.personas\[0\]\.description"):
        load_config(bad)


def test_embedding_dedup_and_the_cross_split_check():
    vec = {"a": [1.0, 0.0], "a2": [0.99, 0.141], "b": [0.0, 1.0], "c": [0.6, 0.8]}

    def embed(texts):
        return [vec[t] for t in texts]

    ps = [Probe(id=k, question=k) for k in ("a", "a2", "b", "c")]
    kept, dropped = K.embedding_dedup(ps, embed, 0.95)
    assert [p.id for p in kept] == ["a", "b", "c"] and dropped[0][:2] == ("a2", "a")
    split = [Probe(id="a", question="a", split="test"), Probe(id="a2", question="a2", split="train"),
             Probe(id="b", question="b", split="val")]
    left, check = K.cross_split(split, embed, 0.95)
    assert [p.id for p in left] == ["a", "b"]
    assert check["split_check/dropped"] == 1 and check["split_check/compared"] == 2
    assert check["split_check/max_similarity"] == pytest.approx(0.0)


def test_coverage_counts_documents_and_sections_per_kind(corpus):
    c, _ = corpus
    doc = "assert.txt"
    at = c.docs[doc].index("The simple form")
    ps = [Probe(id="1", question="q", source_doc=doc, source_start=at, source_end=at + 5, kind="single"),
          Probe(id="2", question="q", source_doc="pass.txt", source_start=0, source_end=5, kind="multi",
                more_sources=(K.Span(doc=doc, start=at, end=at + 3),))]
    cov = K.coverage(ps, c.docs)
    assert cov["coverage/docs_total"] == len(TOPICS)
    assert cov["coverage/all/docs"] == 2 and cov["coverage/all/sections"] == 2
    assert cov["coverage/single/docs"] == 1 and cov["coverage/multi/docs"] == 2
    assert K.section_of(c.docs[doc], at) == 'The "assert" statement'


def test_default_config_mix_is_valid():
    cfg = load_config(ROOT / "configs/rag.yaml") if (ROOT / "datasets/pyref").is_dir() else None
    if cfg is not None:
        assert sum(K.plan(cfg.probes.mix, cfg.probes.count).values()) == cfg.probes.count


def test_a_tune_reports_kinds_the_split_check_coverage_and_mines_failures(tmp_path, corpus_dir):
    from mlflow import MlflowClient

    from conftest import FakeModels, no_progress, write_config
    from selftune.loop import Session, tune
    from selftune.tracking import MlflowTracker

    path = write_config(tmp_path, corpus_dir, probes="{count: 12, mix: {single: 2, procedural: 1, keyword: 1, "
                                                     "misspelled: 1, unanswerable: 1}, mine: 2, "
                                                     "personas: [{name: novice, description: a beginner}]}")
    cfg = load_config(path)
    session = Session(cfg, models=FakeModels())
    tracker = MlflowTracker(cfg)
    result = tune(session, 2, tracker, no_progress)
    st = result.stats
    frozen_val = [j.answer.probe.id for j in result.rounds[0].val.judgments]
    for r in result.rounds[1:]:
        assert [j.answer.probe.id for j in r.val.judgments] == frozen_val[:len(r.val.judgments)]
    assert st["mined/probes"] >= 1 and st["mined"] and all(p.split == "train" and p.mined_from for p in st["mined"])
    assert not {p.id for p in st["mined"]} & {j.answer.probe.id for j in result.test_baseline.judgments}
    text = tracker.report_dir.joinpath("report.md").read_text()
    for needle in ("## Scores per probe kind", "## Scores per probe persona", "- cross-split check:",
                   "- coverage (of 4 documents", "- probes with a human reference: 0", "- failure mining:"):
        assert needle in text, needle
    client = MlflowClient(cfg.tracking_uri())
    m = client.get_run(tracker.parent_id).data.metrics
    assert "kind/single/val_baseline" in m and "persona/novice/test_best" in m
    assert {"split_check/dropped", "coverage/all/docs", "mined/probes"} <= set(m)
    arts = {a.path for a in client.list_artifacts(tracker.parent_id, "probes")}
    assert "probes/mined.jsonl" in arts
    table = json.loads(open(client.download_artifacts(tracker.parent_id, "tables/test_baseline.json")).read())
    assert {"kind", "persona", "reference_origin"} <= set(table["columns"])
    # the same config reuses its probe set; a different mix makes a new one
    again, _ = Session(cfg, models=FakeModels()).probes(no_progress)
    assert {p.id for p in again} == {j.answer.probe.id for r in (result.rounds[0].val, result.test_baseline)
                                     for j in r.judgments} | {p.id for p in again if p.split == "train"}
    # what this tune mined comes back, as train probes only, in the next tune of the same probe set
    mined = {p.id for p in st["mined"]}
    assert mined <= {p.id for p in again if p.split == "train"}
    tracker2 = MlflowTracker(cfg)
    second = tune(Session(cfg, models=FakeModels()), 1, tracker2, no_progress)
    assert second.stats["mined/reused"] == len(mined)
    assert not mined & {j.answer.probe.id for ev in (second.rounds[0].val, second.test_baseline) for j in ev.judgments}
    assert f"- mined probes reused: {len(mined)} train probes" in tracker2.report_dir.joinpath("report.md").read_text()
    other = load_config(write_config(tmp_path, corpus_dir, probes="{count: 12, mix: {single: 1}}"))
    Session(other, models=FakeModels()).probes(no_progress)
    assert len(list((cfg.workdir / "probes").glob("*.jsonl"))) == 2
