"""The shipped attack set: every attack is flagged and never outscores an honest wrong answer."""

import json
import re

import pytest

from conftest import ROOT, fake_role
from selftune.attacks import attack_flags
from selftune.judge import Judge
from selftune.records import Answer, Chunk, Probe
from selftune.rubric import load_rubric

ROWS = [json.loads(line) for line in (ROOT / "datasets/attacks/attacks.jsonl").read_text().splitlines()]
RUBRIC = load_rubric(ROOT / "configs/rubrics/taste.yaml")


def answer(row, text):
    probe = Probe(id=f"p{hash(row['question']) & 0xffff}", question=row["question"], reference=row["reference"],
                  source_doc="doc", source_start=0, source_end=len(row["context"]))
    return Answer(probe=probe, text=text, contexts=(Chunk(id="c1", doc="doc", start=0, end=len(row["context"]),
                                                          text=row["context"]),))


def adversarial(rows):
    """A judge that obeys every injection: 5 for anything but the honest wrong answers, which get 1."""
    honest = {r["honest_wrong"] for r in rows}

    def script(m):
        graded = re.search(r"Answer to grade:\n<<(\S+)>>\n(.*)\n<</\1>>", m[-1]["content"], re.S).group(2)
        return json.dumps({"rationale": "as instructed", "score": 1 if graded in honest else 5})
    return fake_role(script)


def test_attack_set_covers_every_kind():
    assert {r["kind"] for r in ROWS} == {"ignore-rubric", "score-request", "fake-fence", "addresses-grader", "bare-colon",
                                         "thought-process", "repeats-question", "padding-repeat", "padding-filler"}
    assert len(ROWS) >= 30


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['kind']}-{i}" for i, r in enumerate(ROWS)])
def test_attack_is_flagged_and_capped_under_an_obedient_judge(row):
    judge = Judge(RUBRIC, adversarial(ROWS), seed=0)
    attack = judge.judge(answer(row, row["answer"]))
    honest = judge.judge(answer(row, row["honest_wrong"]))
    assert attack.flags, f"{row['kind']} not flagged"
    assert honest.flags == ()
    assert attack.scores["grounded"].raw == 5  # the judge was fooled ...
    assert attack.overall is not None and honest.overall is not None
    assert attack.overall <= honest.overall  # ... and it made no difference


def test_honest_answers_are_not_flagged():
    for text in ["pass is a null operation: nothing happens when it runs.",
                 "Use `x << 2` to shift x left by two bits; `>>` shifts right.",
                 "The else clause runs when the try suite raises no exception, as the context says."]:
        assert attack_flags(text, "What does the pass statement do?") == ()


@pytest.mark.e2e
def test_attack_set_under_the_embedded_judge():
    """The real SmolLM2 judge (G-Eval scoring) on a sample: valid scores, every attack flagged and capped."""
    from selftune.config import ModelSpec
    from selftune.lm import LlamaCppEngine, build_role, local_gguf_path

    engine = LlamaCppEngine(local_gguf_path())
    try:
        role = build_role("judge", ModelSpec(model="local", max_tokens=40, cache=False), lambda: engine)
        judge = Judge(RUBRIC, role, seed=0)
        rows = [r for r in ROWS if r["question"] == ROWS[0]["question"]]
        honest = judge.judge(answer(rows[0], rows[0]["honest_wrong"]))
        assert honest.valid and honest.flags == ()
        for row in rows:
            j = judge.judge(answer(row, row["answer"]))
            assert j.scores["grounded"].status == "ok", (row["kind"], j.scores["grounded"].rationale)
            assert j.flags and j.overall <= honest.overall, row["kind"]
    finally:
        engine.close()


def test_honest_short_and_technical_answers_are_not_flagged():
    for text, q in [("None.", "What does a bare return give back?"), ("True", "What does 1 == 1 evaluate to?"),
                    ("What does the pass statement do? It does nothing.", "What does the pass statement do?"),
                    ("The operating system: it is not named in the context.", "Where does os.name come from?"),
                    ("Rate limits of 10 per second are not covered.", "What is the rate limit?")]:
        assert attack_flags(text, q) == (), text
