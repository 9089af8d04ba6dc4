from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "ANONYMIZED_TELEMETRY": "False",
             "LITELLM_LOCAL_MODEL_COST_MAP": "True", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(k, v)

import dspy  # noqa: E402
from dspy.lm15 import Message, Response, TextPart, Usage  # noqa: E402

from selftune.lm import LeanAdapter, Role  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class ScriptedEngine:
    """A DSPy engine whose reply is ``script(messages)``; records every call."""

    def __init__(self, script: Callable[[list[dict[str, str]]], str]):
        self.script, self.calls = script, []

    def complete(self, request):
        msgs = []
        if request.system is not None:
            msgs.append({"role": "system", "content": request.system if isinstance(request.system, str)
                         else "".join(p.text for p in request.system)})
        msgs += [{"role": m.role, "content": m.text or ""} for m in request.messages]
        cfg = request.config
        self.calls.append({"messages": msgs, "stop": tuple(cfg.stop), "response_format": cfg.response_format,
                           "logprobs": cfg.logprobs, "extensions": cfg.extensions, "max_tokens": cfg.max_tokens})
        text = self.script(msgs)
        logprobs = None
        if cfg.logprobs is not None and cfg.max_tokens == 1:
            # the script answers "token:prob token:prob ..." for a next-token distribution
            import math

            from dspy.lm15 import TokenLogprob, TopLogprob
            pairs = [(t.rsplit(":", 1)[0], float(t.rsplit(":", 1)[1])) for t in text.split()]
            top = tuple(TopLogprob(token=t, logprob=math.log(p)) for t, p in pairs)
            logprobs = (TokenLogprob(token=top[0].token, logprob=top[0].logprob, top=top),)
            text = top[0].token
        return Response(id=None, model="fake", message=Message.assistant([TextPart(text)]), logprobs=logprobs,
                        finish_reason="stop", usage=Usage(input_tokens=1, output_tokens=1, total_tokens=2))

    def stream(self, request):
        from dspy.lm15 import response_to_events
        return response_to_events(self.complete(request))

    def close(self):
        pass


def fake_role(script: Callable[[list[dict[str, str]]], str], name: str = "fake", local: bool = False) -> Role:
    engine = ScriptedEngine(script)
    lm = dspy.LM(f"fake/{name}", engine=engine, cache=False, num_retries=0, max_tokens=64, temperature=0.0)
    role = Role(name, lm, LeanAdapter(), local=local)
    role.engine = engine  # type: ignore[attr-defined]
    return role


def field(messages: list[dict[str, str]], title: str) -> str:
    """The value of a ``Title:\\nvalue`` block in the last user message (LeanAdapter format)."""
    m = re.search(rf"^{title}:\n(.*?)(?:\n\n[A-Z][a-z ]+:\n|\Z)", messages[-1]["content"], re.S | re.M)
    return m.group(1) if m else ""


DOCS = {
    "assert.txt": "The assert statement is a convenient way to insert debugging assertions into a program. "
                  "Assertions are checked only when the interpreter runs without the optimize flag. "
                  "If the expression is false the statement raises AssertionError with the optional message.",
    "pass.txt": "The pass statement is a null operation and nothing happens when it executes. "
                "It is useful as a placeholder when a statement is required syntactically but no code needs to run. "
                "Programmers often write pass inside an empty class body or an empty function body.",
    "break.txt": "The break statement may only occur nested in a for or while loop in the program. "
                 "It terminates the nearest enclosing loop and skips the optional else clause of that loop. "
                 "When break passes control out of a try statement the finally clause runs before leaving the loop.",
    "yield.txt": "The yield expression is used when defining a generator function or an asynchronous generator. "
                 "Using a yield expression in a function body causes that function to become a generator function. "
                 "When a generator function is called it returns an iterator known as a generator object.",
}


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    for name, text in DOCS.items():
        (d / name).write_text(text, encoding="utf-8")
    return d


def write_config(tmp_path: Path, corpus: Path, **overrides: str) -> Path:
    rubric = tmp_path / "rubric.yaml"
    if not rubric.exists():
        rubric.write_text((ROOT / "configs/rubrics/taste.yaml").read_text(), encoding="utf-8")
    body = f"""
name: t
seed: 1
workdir: {tmp_path / 'work'}
corpus: {{path: {corpus}}}
rubric: {rubric}
probes: {{count: 9}}
sut:
  params:
    instructions: {{type: text, initial: "Answer from the context."}}
    top_k: {{type: int, low: 1, high: 3, initial: 2}}
    chunk_size: {{type: choice, choices: [120, 200], initial: 200}}
    chunk_overlap: {{type: choice, choices: [0, 20], initial: 20}}
optimizer: {{rounds: 2}}
gate: {{resamples: 200}}
"""
    for k, v in overrides.items():
        body += f"{k}: {v}\n"
    path = tmp_path / "cfg.yaml"
    path.write_text(body, encoding="utf-8")
    return path


class FakeModels:
    """Roles by name: generator asks about the sentence, the SUT quotes its first context line,
    the judge gives 4, the optimizer proposes a fixed rewrite."""

    def __init__(self):
        def sut(m):
            ctx = field(m, "Context")
            return re.sub(r"^\[\d+\] \([^)]*\) ", "", ctx.split("\n\n")[0])[:200]

        self.roles = {
            "generator": fake_role(lambda m: json.dumps(
                {"question": f"What is said about {' '.join(m[-1]['content'].split()[2:5])}?"})),
            "sut": fake_role(sut),
            "judge": fake_role(lambda m: json.dumps({"rationale": "looks grounded", "score": 4})),
            "optimizer": fake_role(lambda m: "Quote the single most relevant sentence of the context."),
        }

    def role(self, name):
        return self.roles[name]

    def judges(self):  # the panel: "judge", then "judge2", ... when a test adds them
        return [self.roles[n] for n in sorted(self.roles) if n.startswith("judge")]


def no_progress(it, **_):
    return it


def check_tune_record(work: Path, output: str, rounds: int):
    """What every finished tune leaves in MLflow (the store in ``work``) and prints (``output``): one
    finished parent run with the gains, the judge's measurements and trust table, a child run per
    round with per-criterion metrics and its judgments table, and best.yaml. Returns (client, parent)."""
    import yaml
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("selftune")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`selftune.kind` = 'tune'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.info.run_id in output and "held-out test" in output
    m = parent.data.metrics
    for key in ("gain/val", "gain/test", "test/baseline_overall", "test/best_overall", "stats/probes",
                "judge/valid_rate", "judge/retest/n"):
        assert key in m, key
    assert len(client.get_metric_history(parent.info.run_id, "candidate/val_overall")) == rounds + 1
    # the judge is measured on every tune: test-retest after the baseline, its verdict every round
    assert len(client.get_metric_history(parent.info.run_id, "judge/trusted")) == rounds + 1
    assert parent.data.tags["selftune.judge_state"] in ("trusted", "untrusted", "unproven")
    assert "judge reliability:" in output and "## Judge trust bar: " in output and "| test-retest flip rate |" in output
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == rounds + 1
    for child in children:
        for crit in ("grounded", "concise", "retrieval_hit", "correct", "quotes_source", "abstains"):
            assert f"val/{crit}" in child.data.metrics, crit
        table = json.loads(open(client.download_artifacts(child.info.run_id, "tables/val.json")).read())
        cols = table["columns"]
        assert {"question", "answer", "contexts", "grounded/rationale", "grounded/score"} <= set(cols)
        assert all(row[cols.index("answer")] or row[cols.index("error")] for row in table["data"])
    best = yaml.safe_load(open(client.download_artifacts(parent.info.run_id, "best.yaml")).read())
    assert set(best["params"]) >= {"instructions", "top_k", "chunk_size", "chunk_overlap"}
    return client, parent


def rounds_faced(client, children):
    """A tune's child runs (rounds) after the baseline, in round order: (round, its round.json record, the
    round of the incumbent it was gated against: the last promoted before it, 0 the baseline)."""
    import json as _json

    by_round = {}
    for c in children:
        rec = _json.loads(open(client.download_artifacts(c.info.run_id, "round.json")).read())
        by_round[int(c.data.tags["selftune.round"])] = (rec, c)
    for r in sorted(by_round)[1:]:
        faced = max(k for k in by_round if k < r and by_round[k][1].data.tags["selftune.promoted"] == "True")
        yield r, by_round[r][0], faced
