"""A real OpenAI-compatible HTTP endpoint on 127.0.0.1 with a fixed latency and injectable faults.

It answers ``POST /v1/chat/completions`` (and ``GET /v1/models``) from a stdlib
``ThreadingHTTPServer``: one thread per connection, so concurrent requests overlap the way they do
on a hosted provider. It is what ``make bench`` measures concurrency against and what the fault
tests call through the real ``ServedEngine`` / ``dspy.LM`` path (sockets, HTTP, JSON), never a mock.

**Latency** is produced by ``time.sleep(latency)`` in the request's own handler thread before the
reply is written: every call takes at least ``latency`` seconds of wall time whatever the CPU load,
and sleeping threads do not compete for the CPU, so the measured speed-up of a concurrent client
does not depend on other jobs on the machine.

**Replies** are deterministic functions of the request body (``reply(body)``, default
``default_reply``: a judgment fitting the request's JSON schema, a probe question, or a RAG answer
quoting its context), so a sequential and a concurrent run can be compared item by item.

**Faults** (``StubServer.faults``, a list consumed one per request, or ``fault_every`` for a
repeating pattern): ``429`` (with ``Retry-After: <retry_after>``), ``500``, ``503``, ``slow`` (sleeps
``slow_seconds`` before answering, beyond a client's timeout), ``badjson`` (HTTP 200 with a body
that is not JSON), ``prose`` (HTTP 200, a well-formed completion whose content is prose where JSON
was asked for), ``drop`` (closes the connection without a reply). ``hits`` counts requests by
outcome; ``stamps`` keeps each reply's time (to check a Retry-After was honoured); ``bodies`` every
request body; ``max_inflight`` the most requests handled at once (proof that a client overlapped them).

    with StubServer(latency=0.2) as server:
        ...  # server.base == "http://127.0.0.1:<port>/v1"
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("429", "500", "503", "slow", "badjson", "prose", "drop")


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
    """Deterministic, from the request alone: for a JSON request, a judgment that fits its schema (scores
    a hash of the prompt); for a probe-question request (``probes.QUESTION_SYSTEM``), a question on the
    sentence; else the first words of the last user message's ``Context`` block (a RAG answer)."""
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


class StubServer:
    def __init__(self, latency: float = 0.0, reply: Callable[[dict[str, Any]], str] = default_reply,
                 faults: list[str] | None = None, fault_every: list[str] | None = None, retry_after: float = 1.0,
                 slow_seconds: float = 5.0, api_key: str | None = None):
        self.latency, self.reply, self.retry_after, self.slow_seconds = latency, reply, retry_after, slow_seconds
        self.faults = list(faults or [])
        self.fault_every = list(fault_every or [])
        self.api_key = api_key
        self.hits: dict[str, int] = {}
        self.stamps: list[tuple[float, str]] = []
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._n = 0
        self.inflight = self.max_inflight = 0  # requests being handled now / at most at once
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}/v1"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StubServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def requests(self) -> int:
        return sum(self.hits.values())

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

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
                      kind: str = "application/json") -> None:
                self._done()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
                kind = {429: "rate_limit_error", 401: "authentication_error"}.get(status, "server_error")
                self._send(status, json.dumps({"error": {"message": message, "type": kind}}).encode(), headers)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, json.dumps({"object": "list", "data": [{"id": "stub", "object": "model"}]})
                               .encode())
                else:
                    self._error(404, "not found")

            def do_POST(self) -> None:
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
                with server._lock:
                    server.bodies.append(body)
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                self._busy = True
                try:
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
                time.sleep(server.slow_seconds if fault == "slow" else server.latency)
                if fault == "badjson":
                    server._count("badjson")
                    self._send(200, b"<html>upstream proxy error</html>", kind="text/html")
                    return
                text = "I think it is a good answer overall." if fault == "prose" else server.reply(body)
                server._count(fault or "ok")
                prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or [])
                completion_tokens = len(text.split())
                reply = {"id": f"stub-{server._n}", "object": "chat.completion", "created": int(time.time()),
                         "model": body.get("model", "stub"),
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}],
                         "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                   "total_tokens": prompt_tokens + completion_tokens}}
                self._send(200, json.dumps(reply).encode())

        return Handler
