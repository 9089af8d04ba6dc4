"""A scripted OpenAI-compatible endpoint with a fixed latency per call, for the worker test and ``make bench``.

``python -m selftune.scripted --port P --latency 0.2`` serves ``POST /v1/chat/completions`` (and ``GET
/v1/models``) from a stdlib ``ThreadingHTTPServer`` on 127.0.0.1: every call sleeps ``latency`` seconds
(``time.sleep``: the wait a hosted model's network and queue add, spent without CPU, so a timing of
workers against it measures parallelism, not this machine's load) and answers by the request's
``model`` name: ``gen`` a JSON question about the passage, ``sut`` the first context passage,
``judge`` a JSON rationale and score 4, ``opt`` a fixed rewrite. Concurrent calls are served in
parallel (one thread each), as a hosted model serves them. No model, no randomness: the answers are a
function of the prompt.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _field(text: str, title: str) -> str:
    m = re.search(rf"^{title}:\n(.*?)(?:\n\n[A-Z][a-z ]+:\n|\Z)", text, re.S | re.M)
    return m.group(1) if m else ""


def reply(model: str, messages: list[dict[str, Any]]) -> str:
    """The scripted answer of ``model`` to ``messages`` (module docstring)."""
    last = str(messages[-1].get("content", "")) if messages else ""
    if model.endswith("gen"):
        return json.dumps({"question": f"What is said about {' '.join(last.split()[2:5]) or 'this'}?"})
    if model.endswith("sut"):
        ctx = _field(last, "Context")
        return re.sub(r"^\[\d+\] \([^)]*\) ", "", ctx.split("\n\n")[0])[:200] or "I do not know."
    if model.endswith("judge"):
        return json.dumps({"rationale": "looks grounded", "score": 4})
    return "Quote the single most relevant sentence of the context."


class Handler(BaseHTTPRequestHandler):
    latency = 0.0
    calls = 0
    lock = threading.Lock()

    def log_message(self, *_: Any) -> None:  # quiet
        pass

    def _send(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 -- http.server's name
        if self.path.rstrip("/").endswith("/models"):
            models = [{"id": m, "object": "model"} for m in ("gen", "sut", "judge", "opt")]
            self._send({"object": "list", "data": models})
        else:
            self._send({"calls": Handler.calls})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        time.sleep(self.latency)
        with Handler.lock:
            Handler.calls += 1
        text = reply(str(body.get("model", "")), body.get("messages", []))
        self._send({"id": f"scripted-{Handler.calls}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", ""),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


def serve(port: int, latency: float) -> ThreadingHTTPServer:
    Handler.latency = latency
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    return server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--latency", type=float, default=0.2, help="seconds each call sleeps")
    a = ap.parse_args()
    server = serve(a.port, a.latency)
    print(f"scripted endpoint on http://127.0.0.1:{a.port}/v1 ({a.latency:g} s per call)", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
