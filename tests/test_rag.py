"""The built-in RAG's levers with a scripted LM: generation settings reach the engine, demos reach
the prompt (never the probe itself), and hybrid_weight reaches retrieval. Real chromadb + embedder."""

import threading
from types import SimpleNamespace

import pytest

from conftest import fake_role
from selftune.corpus import load_corpus
from selftune.index import Embedder, Index
from selftune.lm import LlamaCppEngine
from selftune.rag import RAG, Demo, make_demos
from selftune.records import Answer, Chunk, Judgment, Probe

BASE = {"instructions": "Answer from the context.", "top_k": 2, "chunk_size": 200, "chunk_overlap": 20}


@pytest.fixture
def index(tmp_path, corpus_dir):
    return Index(load_corpus(corpus_dir, ["*.txt"]), Embedder(), tmp_path / "chroma")


def recording_role(local=False):
    role = fake_role(lambda m: "It does nothing.", local=local)
    seen = []
    inner = role.engine.complete

    def complete(request):
        seen.append(request.config)
        return inner(request)

    role.engine.complete = complete
    role.seen = seen
    return role


def probe(pid="p1", question="What does the pass statement do?", split="train"):
    return Probe(id=pid, question=question, split=split)


def test_default_params_send_what_they_sent_before(index):
    role = recording_role()
    a = RAG(index, role).answer(probe(), BASE)
    assert a.error is None and a.text == "It does nothing."
    cfg = role.seen[-1]
    # the role's own settings (fake_role: 64 tokens, temperature 0), no penalty, no extension
    assert (cfg.max_tokens, cfg.temperature, cfg.frequency_penalty, cfg.presence_penalty, cfg.extensions) == \
        (64, 0.0, None, None, None)
    assert len(role.engine.calls[-1]["messages"]) == 2  # system + the question: no demos


def test_generation_params_reach_the_engine(index):
    role = recording_role(local=True)
    rag = RAG(index, role)
    params = {**BASE, "max_tokens": 32, "temperature": 0.4, "frequency_penalty": 0.5, "presence_penalty": 0.25,
              "repeat_penalty": 1.3}
    assert rag.answer(probe(), params).error is None
    cfg = role.seen[-1]
    assert (cfg.max_tokens, cfg.temperature, cfg.frequency_penalty, cfg.presence_penalty) == (32, 0.4, 0.5, 0.25)
    assert cfg.extensions == {"repeat_penalty": 1.3}
    rag.answer(probe(), {**params, "repeat_penalty": 1.0})  # llama.cpp's default: the role's own LM
    assert role.seen[-1].extensions is None


def test_repeat_penalty_on_a_hosted_model_fails_the_item(index):
    a = RAG(index, recording_role(local=False)).answer(probe(), {**BASE, "repeat_penalty": 1.3})
    assert a.error and "frequency_penalty" in a.error


class FakeLlama:
    """What LlamaCppEngine needs of llama_cpp.Llama; records create_completion's arguments."""

    def __init__(self):
        self.kwargs = None

    def tokenize(self, data, add_bos=False, special=True):
        return list(data)

    def create_completion(self, prompt, **kwargs):
        self.kwargs = kwargs
        return {"choices": [{"text": "ok", "finish_reason": "stop"}], "usage": {}}


def fake_engine() -> LlamaCppEngine:
    engine = LlamaCppEngine.__new__(LlamaCppEngine)
    engine.llama, engine.eos_text, engine.seed = FakeLlama(), "</s>", 0
    engine.formatter = lambda messages: SimpleNamespace(prompt="\n".join(m["content"] for m in messages))
    engine._lock, engine._grammars = threading.Lock(), {}
    return engine


def test_llama_cpp_engine_passes_sampling_settings_to_llama_cpp():
    import dspy

    from selftune.lm import with_extensions

    engine = fake_engine()
    lm = dspy.LM("local/x", engine=engine, cache=False, num_retries=0, max_tokens=48, temperature=0.0)
    lm("hello")
    kw = engine.llama.kwargs
    assert (kw["max_tokens"], kw["temperature"], kw["repeat_penalty"], kw["frequency_penalty"],
            kw["presence_penalty"]) == (48, 0.0, 1.0, 0.0, 0.0)  # llama.cpp's own defaults: today's behaviour
    with_extensions(lm, repeat_penalty=1.3)("hello", max_tokens=32, frequency_penalty=0.2)
    kw = engine.llama.kwargs
    assert (kw["max_tokens"], kw["repeat_penalty"], kw["frequency_penalty"]) == (32, 1.3, 0.2)


def judgment(p: Probe, text: str, overall: float | None, contexts=(), flags=(), error=None) -> Judgment:
    return Judgment(answer=Answer(probe=p, text=text, contexts=tuple(contexts), error=error), scores={},
                    overall=overall, flags=tuple(flags))


def test_make_demos_picks_the_best_clean_train_items_with_short_contexts():
    text = ("Filler words come first here. " * 20) + "The pass statement is a null operation. " + ("More after. " * 20)
    start = text.index("The pass")
    src = Probe(id="a", question="What is pass?", split="train", source_doc="pass.txt", source_start=start,
                source_end=start + 39)
    big = Chunk(id="pass.txt#0-1000", doc="pass.txt", start=0, end=len(text), text=text)
    other = Chunk(id="x.txt#0-5", doc="x.txt", start=0, end=5, text="other")
    js = [judgment(src, "Nothing happens.", 0.9, [other, big]),
          judgment(probe("b", "Q b?"), "B.", 1.0, [other], flags=["padding:repetitive"]),  # flagged
          judgment(probe("c", "Q c?", split="val"), "C.", 1.0, [other]),  # not train
          judgment(probe("d", "Q d?"), "", None, [other], error="boom"),  # failed
          judgment(probe("e", "Q e?"), "E.", 0.5, [other]),
          judgment(probe("f", "What is pass?"), "F.", 0.8, [other]),  # same question as a
          judgment(probe("g", "Q g?"), "G.", 0.7, [other])]
    demos = make_demos(js, lambda j: j.overall, 3, max_context_chars=120)
    assert [d.probe_id for d in demos] == ["a", "g", "e"]
    assert demos[0].context.startswith("[1] (pass.txt) ")
    assert "The pass statement is a null operation." in demos[0].context
    assert len(demos[0].context) <= 120 + len("[1] (pass.txt) ")
    assert demos[1].context == "[1] (x.txt) other"


def test_demos_reach_the_prompt_and_never_show_the_probe_itself(index):
    role = recording_role()
    rag = RAG(index, role)
    pool = [
        Demo(
            probe_id=f"d{i}",
            split="train",
            question=f"Demo question {i}?",
            context=f"[1] (x.txt) ctx {i}",
            answer=f"Demo answer {i}.",
        )
        for i in range(3)
    ]
    rag.set_demos(pool)
    assert rag.answer(probe("p9", "What does pass do?"), {**BASE, "demos": 2}).error is None
    msgs = role.engine.calls[-1]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "Demo question 0?" in msgs[1]["content"] and "ctx 0" in msgs[1]["content"]
    assert msgs[2]["content"] == "Demo answer 0." and "Demo question 1?" in msgs[3]["content"]
    assert "What does pass do?" in msgs[-1]["content"]
    # a probe that is itself in the pool gets the next demos instead (by id, or by the same question)
    for p in (probe("d0", "Demo question 0?"), probe("zz", "Demo question 0?")):
        rag.answer(p, {**BASE, "demos": 2})
        shown = " ".join(m["content"] for m in role.engine.calls[-1]["messages"][1:-1])
        assert "Demo question 0?" not in shown and "Demo question 1?" in shown and "Demo question 2?" in shown
    # more demos than the pool can give: the item fails (recorded), it is not answered with fewer
    a = rag.answer(probe("d0", "Demo question 0?"), {**BASE, "demos": 3})
    assert a.error and "demo pool" in a.error


def test_demos_must_come_from_train(index):
    rag = RAG(index, recording_role())
    with pytest.raises(ValueError, match="train"):
        rag.set_demos([Demo(probe_id="v", split="val", question="Q?", context="c", answer="a")])


def test_hybrid_weight_reaches_retrieval(index, corpus_dir):
    rag = RAG(index, recording_role())
    q = "Which statement is a null operation?"
    dense = rag.answer(probe(question=q), BASE).contexts
    assert [c.id for c in dense] == [c.id for c in index.search(q, 2, 200, 20)]
    lexical = rag.answer(probe(question=q), {**BASE, "hybrid_weight": 1.0}).contexts
    assert [c.id for c in lexical] == [c.id for c in index.search(q, 2, 200, 20, weight=1.0)]
    assert [c.id for c in lexical] != [c.id for c in dense]  # this question ranks differently by words
