import pytest

from selftune.checks import run_check, token_f1
from selftune.records import Answer, Chunk, Probe
from selftune.rubric import CitesContext, ReferenceMatch, Regex, RetrievalHit, WordBounds

PROBE = Probe(id="p", question="What does pass do?", reference="The pass statement is a null operation.",
              source_doc="pass.txt", source_start=10, source_end=50)


def ans(text, contexts=()):
    return Answer(probe=PROBE, text=text, contexts=tuple(contexts))


def chunk(doc, start, end, text="x"):
    return Chunk(id=f"{doc}#{start}", doc=doc, start=start, end=end, text=text)


def test_token_f1_hand_computed():
    # pred: a b c d ; ref: a b e -> common 2, p=2/4, r=2/3, f1=2*(.5*.667)/(1.167)=0.5714
    assert token_f1("a b c d", "a b e") == pytest.approx(4 / 7)
    assert token_f1("", "a") == 0.0 and token_f1("x y", "x y") == 1.0


def test_word_bounds():
    spec = WordBounds(type="word_bounds", min=2, max=4)
    assert run_check(spec, ans("one two three")).value == 1.0
    assert run_check(spec, ans("one")).value == 0.0
    assert run_check(spec, ans("a b c d e")).value == 0.0


def test_regex_must_and_must_not():
    assert run_check(Regex(type="regex", must=r"\bpass\b"), ans("use pass here")).value == 1.0
    assert run_check(Regex(type="regex", must=r"\bpass\b"), ans("nothing")).value == 0.0
    assert run_check(Regex(type="regex", must_not="(?i)ignore"), ans("IGNORE the rubric")).value == 0.0
    with pytest.raises(ValueError):
        Regex(type="regex")


def test_retrieval_hit_by_span_overlap_not_chunk_id():
    spec = RetrievalHit(type="retrieval_hit")
    hit = run_check(spec, ans("x", [chunk("other.txt", 0, 100), chunk("pass.txt", 40, 90)]))
    assert hit.value == 1.0 and hit.raw == 2
    miss = run_check(spec, ans("x", [chunk("pass.txt", 50, 90), chunk("other.txt", 10, 50)]))
    assert miss.value == 0.0
    na = run_check(spec, Answer(probe=Probe(id="q", question="q?"), text="x"))
    assert na.status == "n/a"


def test_reference_match():
    f1 = run_check(ReferenceMatch(type="reference_match", method="f1"), ans("pass is a null operation"))
    assert 0.5 < f1.value < 1.0
    contains = ReferenceMatch(type="reference_match", method="contains")
    assert run_check(contains, ans("Indeed: the pass statement is a null operation!")).value == 1.0
    assert run_check(contains, ans("pass does nothing")).value == 0.0
    assert run_check(contains, Answer(probe=Probe(id="q", question="q?"), text="x")).status == "n/a"


def test_cites_context():
    spec = CitesContext(type="cites_context", min_words=3)
    ctx = [chunk("pass.txt", 0, 10, "The pass statement is a null operation")]
    assert run_check(spec, ans("It says: pass statement is useful", ctx)).value == 1.0
    assert run_check(spec, ans("pass is useless", ctx)).value == 0.0


SOURCE = ("pass is a null operation; nothing happens when it runs. It is useful as a placeholder when a statement "
          "is required but no code needs to run. The continue statement may only occur nested in a loop.")
SPAN = Probe(id="s", question="What does pass do?", reference="pass is a null operation; nothing happens when it runs.",
             source_doc="pass.txt", source_start=0, source_end=SOURCE.index(" It is"))


def quotes(text, probe=SPAN, start=0):
    ctx = (Chunk(id="c", doc="pass.txt", start=start, end=start + len(SOURCE), text=SOURCE),)
    return run_check(CitesContext(type="cites_context", min_words=4), Answer(probe=probe, text=text, contexts=ctx))


def test_cites_context_counts_only_quotes_of_the_source_span():
    assert quotes("As documented, pass is a null operation.").value == 1.0
    off = quotes("pass skips the loop. It is useful as a placeholder when a statement is required.")
    assert off.value == 0.0 and "none that answer" in off.rationale
    # the same words, but the chunk sits elsewhere in the document: not the source span
    assert quotes("pass is a null operation.", start=5000).value == 0.0
    # with no known source span, a quote counts when it is mostly the reference's words
    unknown = SPAN.model_copy(update={"source_doc": "", "source_start": 0, "source_end": 0})
    assert quotes("pass is a null operation.", probe=unknown).value == 1.0
    assert quotes("It is useful as a placeholder when a statement is required.", probe=unknown).value == 0.0
    # echoing the question is not quoting, even when the question's words are the source's
    echo = SPAN.model_copy(update={"question": "What does pass is a null operation mean?"})
    assert quotes("pass is a null operation", probe=echo).value == 0.0


def test_cites_context_charges_copied_volume_and_contradiction():
    honest = quotes("pass is a null operation; nothing happens when it runs.")
    stuffed = quotes(SOURCE)  # the whole chunk: the source sentence and everything around it
    assert honest.value == 1.0 and 0.0 < stuffed.value < 0.5
    wrong_plus_quotes = quotes("pass skips the loop. " + SOURCE[SOURCE.index("It is"):])
    assert wrong_plus_quotes.value == 0.0
    negated = quotes("pass is not a null operation; something happens when it runs.")
    assert negated.value == 0.0 and "contradicts" in negated.rationale


def test_cites_context_reads_through_hidden_characters():
    assert quotes("pass is a nu\u200bll operation; nothing happens.").value == 1.0


def test_reference_match_consistent():
    spec = ReferenceMatch(type="reference_match")  # the default method
    assert spec.method == "consistent"
    assert run_check(spec, ans("The pass statement is a null operation.")).value == 1.0
    negated = run_check(spec, ans("The pass statement is not a null operation."))
    assert negated.value == 0.0 and "contradicts" in negated.rationale
    rule = ReferenceMatch(type="reference_match", method="no_contradiction")
    assert run_check(rule, ans("The pass statement is not a null operation.")).value == 0.0
    assert run_check(rule, ans("pass does nothing at all")).value == 1.0
    assert run_check(rule, Answer(probe=Probe(id="q", question="q?"), text="x")).status == "n/a"


def test_reference_match_gives_no_credit_for_pasted_context():
    wrong = "pass skips the rest of the loop."
    spec = ReferenceMatch(type="reference_match")
    alone = run_check(spec, Answer(probe=SPAN, text=wrong)).value
    pasted = Answer(probe=SPAN, text=f"{wrong} {SOURCE}",
                    contexts=(Chunk(id="c", doc="pass.txt", start=0, end=len(SOURCE), text=SOURCE),))
    assert run_check(spec, pasted).value <= alone
    assert token_f1(pasted.text, SPAN.reference) > token_f1(wrong, SPAN.reference)  # what F1 paid for it


def test_abstains_only_when_unanswerable():
    from selftune.rubric import Abstains

    spec = Abstains(type="abstains")
    unanswerable = PROBE.model_copy(update={"answerable": False, "reference": None})
    say = lambda text, probe=PROBE: run_check(spec, Answer(probe=probe, text=text)).value  # noqa: E731
    assert say("I don't know; the context does not say.", unanswerable) == 1.0
    assert say("The context does not mention the capital of Australia.", unanswerable) == 1.0
    assert say("Canberra is the capital.", unanswerable) == 0.0
    assert say("pass is a null operation.") == 1.0
    assert say("I do not know.") == 0.0  # abstaining on an answerable probe is wrong too
    cites = run_check(CitesContext(type="cites_context"), Answer(probe=unanswerable, text="I don't know"))
    assert cites.status == "n/a"


def test_user_probes_may_be_marked_unanswerable(tmp_path):
    from selftune.errors import InputError
    from selftune.probes import load_user_probes

    f = tmp_path / "p.jsonl"
    f.write_text('{"question": "Who designed the Eiffel Tower?", "answerable": false}\n'
                 '{"question": "q?", "reference": "r"}\n')
    a, b = load_user_probes(f)
    assert a.answerable is False and a.reference is None and b.answerable is True and b.reference == "r"
    f.write_text('{"question": "q?", "answerable": "no"}\n')
    with pytest.raises(InputError, match=r"line 1\.answerable: expected true or false"):
        load_user_probes(f)
    f.write_text('{"question": "q?", "answr": "x"}\n')
    with pytest.raises(InputError, match=r"line 1\.answr: unknown key"):
        load_user_probes(f)


def test_own_words_charges_pasted_context_whether_or_not_it_quotes():
    from selftune.rubric import OwnWords

    spec = OwnWords(type="own_words", min_words=4)
    ctx = (Chunk(id="c", doc="pass.txt", start=0, end=len(SOURCE), text=SOURCE),)
    value = lambda text: run_check(spec, Answer(probe=SPAN, text=text, contexts=ctx)).value  # noqa: E731
    assert value("pass skips the loop.") == 1.0  # nothing pasted
    assert value("pass is a null operation; nothing happens when it runs.") == 1.0  # the source, as needed
    assert value("pass does nothing: it is useful as a placeholder.") == 1.0  # an incidental phrase is free
    pasted = value(
        "pass skips the loop. It is useful as a placeholder when a statement is required but no code "
        "needs to run. The continue statement may only occur nested in a loop."
    )
    assert pasted < 0.4  # most of it is context that does not answer the question
    assert value(SOURCE) < 1.0  # the whole chunk: more of it than the answer needs
    echo = value("What does pass do? pass skips the loop.")  # the question, pasted back
    assert echo < value("pass skips the loop.")
