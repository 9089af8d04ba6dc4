"""The scripted OpenAI-compatible endpoint: a real HTTP server on 127.0.0.1 that tests and ``make bench``
talk to through the real ``ServedEngine`` / ``dspy.LM`` path (sockets, HTTP, JSON), never a mock.

It answers ``POST /v1/chat/completions`` (and ``GET /v1/models``) from a stdlib ``ThreadingHTTPServer``:
one thread per connection, so concurrent requests overlap the way they do on a hosted provider.

**Latency** is produced by ``time.sleep(latency)`` in the request's own handler thread before the reply
is written: every call takes at least ``latency`` seconds of wall time whatever the CPU load, and
sleeping threads do not compete for the CPU, so a timing against it (the concurrency speed-up, the
1- vs 2-worker bench) measures how much of that wait a client overlaps, not this machine's load.

**Replies** are deterministic functions of the request body, ``reply(body) -> str`` (pluggable):

- ``default_reply`` (by the request's shape): for a JSON request, a judgment fitting its JSON schema
  (scores a hash of the prompt); for a probe-question request, a question on the sentence; else the
  first words of the last user message's ``Context`` block (a RAG answer);
- ``role_reply`` (by the request's ``model`` name, the replies of ``conftest.FakeModels``):
  ``generator``/``gen`` a JSON question about the passage, ``sut`` the first context passage,
  ``judge...`` a JSON rationale and score 4, anything else (``optimizer``/``opt``) a fixed rewrite.

**Faults** (``faults``, a list consumed one per request, or ``fault_every`` for a repeating pattern):
``429`` (with ``Retry-After: <retry_after>``), ``500``, ``503``, ``slow`` (sleeps ``slow_seconds``
before answering, beyond a client's timeout), ``badjson`` (HTTP 200 with a body that is not JSON),
``prose`` (HTTP 200, a well-formed completion whose content is prose where JSON was asked for),
``drop`` (closes the connection without a reply).

**Hold/release**: ``hold(model, after)`` makes the next request for ``model`` (once a request for
``after`` has come) wait until ``release()``; ``holding`` is set while it waits, so a test knows the
client is inside that call (e.g. to kill it there); ``held`` is that request's index in ``bodies``.

**Recording**: ``bodies`` every request body, in arrival order (``canonical(start)`` as canonical JSON,
for spotting a call paid twice); ``requests`` their number; ``hits`` requests by outcome; ``stamps``
each outcome's time (to check a Retry-After was honoured); ``max_inflight`` the most requests handled
at once (proof that a client overlapped them).

    with ScriptedServer(latency=0.2) as server:
        ...  # server.base == "http://127.0.0.1:<port>/v1"

``python -m selftune.scripted --port P --latency 0.2 [--reply role|default]`` serves it alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("429", "500", "503", "slow", "badjson", "prose", "drop")
Reply = Callable[[dict[str, Any]], str]


def _text(content: Any) -> str:
    return content if isinstance(content, str) else " ".join(
        p.get("text", "") for p in content or [] if isinstance(p, dict))


def _schema(body: dict[str, Any]) -> dict[str, Any] | None:
    rf = body.get("response_format") or {}
    if rf.get("type") not in ("json_object", "json_schema"):
        return None
    return rf.get("schema") or (rf.get("json_schema") or {}).get("schema") or {}


def _judgment(schema: dict[str, Any], seed: str) -> dict[str, Any]:
    """A reply that fits ``schema`` (one score, or one per criterion of a group), its scores a hash of ``seed``."""
    props = schema.get("properties") or {}
    if "winner" in props:
        return {"rationale": "stub comparison", "winner": "AB"[int(hashlib.sha256(seed.encode()).hexdigest(), 16) % 2]}
    if props and "score" not in props:
        return {name: _judgment(sub, f"{seed}|{name}") for name, sub in props.items()}
    levels = ((props.get("score") or {}).get("enum")) or [1, 2, 3, 4, 5]
    level = levels[int(hashlib.sha256(seed.encode()).hexdigest(), 16) % len(levels)]
    return {"rationale": f"stub rationale {level}", "score": level}


def default_reply(body: dict[str, Any]) -> str:
    """Deterministic, from the request's shape alone (module docstring)."""
    messages = body.get("messages") or []
    system = next((_text(m.get("content")) for m in messages if m.get("role") == "system"), "")
    last = next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    schema = _schema(body)
    if "quiz questions" in system:
        words = last.split("Sentence:", 1)[-1].split()
        return json.dumps({"question": f"What is said about {' '.join(words[2:6])}?"})
    if schema is not None:
        return json.dumps(_judgment(schema, json.dumps(messages, sort_keys=True)))
    context = last.split("Context:", 1)[-1].split("\n\n")[0]
    return " ".join(re.sub(r"^\s*\[\d+\] \([^)]*\) ", "", context).split()[:30]) or "I do not know."


def _field(text: str, title: str) -> str:
    """The value of a ``Title:\\nvalue`` block (LeanAdapter's format)."""
    m = re.search(rf"^{title}:\n(.*?)(?:\n\n[A-Z][a-z ]+:\n|\Z)", text, re.S | re.M)
    return m.group(1) if m else ""


def role_of(model: str) -> str:
    """The role a request's ``model`` name stands for: generator, sut, judge or optimizer."""
    name = model.rsplit("/", 1)[-1]
    if name.startswith("gen"):
        return "generator"
    if name.startswith("sut"):
        return "sut"
    return "judge" if name.startswith("judge") else "optimizer"


def role_reply(body: dict[str, Any]) -> str:
    """The reply of the role named by the request's ``model`` (module docstring; ``conftest.FakeModels``)."""
    messages = body.get("messages") or []
    last = _text(messages[-1].get("content")) if messages else ""
    role = role_of(str(body.get("model", "")))
    if role == "generator":
        return json.dumps({"question": f"What is said about {' '.join(last.split()[2:5]) or 'this'}?"})
    if role == "sut":
        ctx = _field(last, "Context")
        return re.sub(r"^\[\d+\] \([^)]*\) ", "", ctx.split("\n\n")[0])[:200] or "I do not know."
    if role == "judge":
        return json.dumps({"rationale": "looks grounded", "score": 4})
    return "Quote the single most relevant sentence of the context."


REPLIES: dict[str, Reply] = {"default": default_reply, "role": role_reply}


class ScriptedServer:
    """The endpoint (module docstring). Started by ``start()`` or ``with``; stopped by ``close()``."""

    def __init__(self, latency: float = 0.0, reply: Reply = default_reply, faults: list[str] | None = None,
                 fault_every: list[str] | None = None, retry_after: float = 1.0, slow_seconds: float = 5.0,
                 api_key: str | None = None, port: int = 0,
                 models: tuple[str, ...] = ("stub", "generator", "sut", "judge", "optimizer")):
        self.latency, self.reply, self.retry_after, self.slow_seconds = latency, reply, retry_after, slow_seconds
        self.faults = list(faults or [])
        self.fault_every = list(fault_every or [])
        self.api_key, self.models = api_key, models
        self.hits: dict[str, int] = {}
        self.stamps: list[tuple[float, str]] = []
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._n = 0
        self.inflight = self.max_inflight = 0  # requests being handled now / at most at once
        self._hold: str | None = None
        self._after: str | None = None
        self.holding = threading.Event()  # set while a held request waits
        self.held = -1  # the index (in ``bodies``) of the request held last
        self._go = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}/v1"
        self._thread: threading.Thread | None = None

    def start(self) -> ScriptedServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                            daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self.release()  # a held request must not keep its handler thread waiting
        if self._thread is not None:
            self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def requests(self) -> int:
        """Requests received (every body recorded, whatever its outcome)."""
        return len(self.bodies)

    def canonical(self, start: int = 0) -> list[str]:
        """Each recorded request from ``start`` on, as canonical JSON (for spotting a call paid twice)."""
        with self._lock:
            return [json.dumps(b, sort_keys=True) for b in self.bodies[start:]]

    def hold(self, model: str, after: str | None = None) -> None:
        """Hold the next request for ``model`` (once one for ``after`` has come) until ``release()``."""
        self.holding.clear()
        self._go.clear()
        with self._lock:
            self._hold, self._after = model, after

    def release(self) -> None:
        self._go.set()

    def _next_fault(self) -> str | None:
        with self._lock:
            self._n += 1
            if self.faults:
                return self.faults.pop(0) or None
            if self.fault_every:
                return self.fault_every[(self._n - 1) % len(self.fault_every)] or None
            return None

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.hits[outcome] = self.hits.get(outcome, 0) + 1
            self.stamps.append((time.monotonic(), outcome))

    def _arrive(self, body: dict[str, Any]) -> bool:
        """Record ``body``; True when it is the request to hold."""
        model = str(body.get("model", ""))
        with self._lock:
            self.bodies.append(body)
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            if model == self._after:
                self._after = None
            held = self._hold is not None and model == self._hold and self._after is None
            if held:
                self._hold = None
                self.held = len(self.bodies) - 1
        return held

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
                      kind: str = "application/json") -> None:
                self._done()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client went away (killed while its reply was held)
                    self.close_connection = True

            def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
                kind = {429: "rate_limit_error", 401: "authentication_error"}.get(status, "server_error")
                self._send(status, json.dumps({"error": {"message": message, "type": kind}}).encode(), headers)

            def do_GET(self) -> None:  # noqa: N802 -- http.server's name
                if self.path.rstrip("/").endswith("/models"):
                    data = [{"id": m, "object": "model"} for m in server.models]
                    self._send(200, json.dumps({"object": "list", "data": data}).encode())
                else:
                    self._error(404, "not found")

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._error(404, "not found")
                    return
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    server._count("401")
                    self._error(401, "invalid api key")
                    return
                body = json.loads(raw or b"{}")
                self._busy = True
                held = server._arrive(body)
                try:
                    if held:
                        server.holding.set()
                        server._go.wait()
                    self._complete(body)
                finally:
                    self._done()

            def _done(self) -> None:
                """No longer in flight: counted before the reply is written (a client may send its next request
                the moment it has read this reply)."""
                if getattr(self, "_busy", False):
                    self._busy = False
                    with server._lock:
                        server.inflight -= 1

            def _complete(self, body: dict[str, Any]) -> None:
                fault = server._next_fault()
                if fault in ("429", "500", "503"):
                    server._count(fault)
                    headers = {"Retry-After": f"{server.retry_after:g}"} if fault == "429" else None
                    self._error(int(fault), f"injected {fault}", headers)
                    return
                if fault == "drop":
                    self._done()
                    server._count("drop")
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                time.sleep(server.slow_seconds if fault == "slow" else server.latency)  # the latency (docstring)
                if fault == "badjson":
                    server._count("badjson")
                    self._send(200, b"<html>upstream proxy error</html>", kind="text/html")
                    return
                text = "I think it is a good answer overall." if fault == "prose" else server.reply(body)
                server._count(fault or "ok")
                prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or [])
                completion_tokens = len(text.split())
                reply = {"id": f"scripted-{server._n}", "object": "chat.completion", "created": int(time.time()),
                         "model": body.get("model", "stub"),
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}],
                         "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                   "total_tokens": prompt_tokens + completion_tokens}}
                self._send(200, json.dumps(reply).encode())

        return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--latency", type=float, default=0.2, help="seconds each call sleeps")
    ap.add_argument("--reply", choices=sorted(REPLIES), default="role",
                    help="by the model's name, or the request's shape")
    a = ap.parse_args()
    server = ScriptedServer(latency=a.latency, reply=REPLIES[a.reply], port=a.port).start()
    print(f"scripted endpoint on {server.base} ({a.latency:g} s per call)", flush=True)
    try:
        assert server._thread is not None
        server._thread.join()
    except KeyboardInterrupt:
        server.close()


if __name__ == "__main__":
    main()
