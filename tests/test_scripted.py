"""``selftune.scripted``: the one scripted OpenAI-compatible endpoint does everything its users need from one
server: a fixed latency (a sleep in the handler thread, so calls overlap), injected faults, replies by role
or by the request's shape, a request held until released, every request recorded."""

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from selftune.scripted import ScriptedServer, default_reply, role_of, role_reply


def post(server, model, content="Question:\nWhat?\n\nContext:\n[1] (a.txt) The pass statement does nothing.",
         **extra):
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}], **extra}).encode()
    req = urllib.request.Request(f"{server.base}/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())["choices"][0]["message"]["content"]


def test_one_server_has_latency_faults_role_replies_hold_and_records(tmp_path):
    with ScriptedServer(latency=0.3, reply=role_reply, faults=["503"]) as server:
        with pytest.raises(urllib.error.HTTPError) as err:
            post(server, "sut")
        assert err.value.code == 503 and server.hits == {"503": 1}
        # concurrent calls each sleep the latency in their own thread: they overlap
        out: dict[str, str] = {}
        t0 = time.monotonic()
        threads = [threading.Thread(target=lambda m=m: out.__setitem__(m, post(server, m)))
                   for m in ("generator", "sut", "judge", "optimizer")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.monotonic() - t0
        assert 0.3 <= took < 1.0 and server.max_inflight >= 2
        assert out["sut"] == "The pass statement does nothing."
        assert json.loads(out["judge"]) == {"rationale": "looks grounded", "score": 4}
        assert json.loads(out["generator"])["question"].startswith("What is said about")
        assert out["optimizer"] == "Quote the single most relevant sentence of the context."
        # a request held until released; the client is known to be inside that call
        server.latency = 0.0
        server.hold("sut", after="judge")
        assert post(server, "sut") and not server.holding.is_set()  # not before a judge request came
        post(server, "judge")
        held = threading.Thread(target=lambda: out.__setitem__("held", post(server, "sut", "Context:\n[1] (b) Held.")))
        held.start()
        assert server.holding.wait(10) and held.is_alive() and server.inflight == 1
        server.release()
        held.join(10)
        assert out["held"] == "Held." and server.bodies[server.held]["messages"][0]["content"].endswith("Held.")
        # every request recorded, whatever its outcome
        assert server.requests == 8 == len(server.canonical()) and server.hits["ok"] == 7
        assert [b["model"] for b in server.bodies[-3:]] == ["sut", "judge", "sut"]


def test_replies_by_shape_and_by_role_name():
    assert [role_of(m) for m in ("generator", "gen", "openai/sut", "judge2", "opt", "optimizer")] == \
        ["generator", "generator", "sut", "judge", "optimizer", "optimizer"]
    schema = {"type": "json_schema", "json_schema": {"schema": {"properties": {"score": {"enum": [1, 2, 3]}}}}}
    body = {"model": "stub", "messages": [{"role": "user", "content": "x"}], "response_format": schema}
    assert json.loads(default_reply(body))["score"] in (1, 2, 3) and default_reply(body) == default_reply(body)
