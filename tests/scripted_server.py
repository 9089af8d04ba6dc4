"""A real OpenAI-compatible endpoint on 127.0.0.1 for tunes run as subprocesses: stdlib HTTP, the
replies of ``conftest.FakeModels`` chosen by the request's model name (``generator``, ``sut``,
``judge``, ``optimizer``), every request body recorded. ``hold(role, after)`` makes the next request of
``role`` (once a request of ``after`` has come) wait until ``release()``: the test then knows the tune
is inside that call."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from conftest import field


def _reply(role: str, messages: list[dict[str, str]]) -> str:
    if role == "generator":
        return json.dumps({"question": f"What is said about {' '.join(messages[-1]['content'].split()[2:5])}?"})
    if role == "sut":
        ctx = field(messages, "Context")
        return re.sub(r"^\[\d+\] \([^)]*\) ", "", ctx.split("\n\n")[0])[:200]
    if role.startswith("judge"):
        return json.dumps({"rationale": "looks grounded", "score": 4})
    return "Quote the single most relevant sentence of the context."


class ScriptedServer:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._hold: str | None = None
        self._after: str | None = None
        self.holding = threading.Event()  # set while a held request waits
        self.held = -1  # the index (in ``requests``) of the request held last
        self._go = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # /v1/models
                self._send({"object": "list", "data": [{"id": r, "object": "model"} for r in
                                                       ("generator", "sut", "judge", "optimizer")]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                role = body.get("model", "")
                with server._lock:
                    server.requests.append(body)
                    if role == server._after:
                        server._after = None
                    held = server._hold is not None and role == server._hold and server._after is None
                    if held:
                        server._hold = None
                        server.held = len(server.requests) - 1
                if held:
                    server.holding.set()
                    server._go.wait()
                text = _reply(role, body.get("messages", []))
                self._send({"id": f"c{len(server.requests)}", "object": "chat.completion", "created": 0,
                            "model": role, "choices": [{"index": 0, "finish_reason": "stop",
                                                        "message": {"role": "assistant", "content": text}}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _send(self, obj: dict[str, Any]) -> None:
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:  # the client was killed while this reply was held
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def hold(self, role: str, after: str | None = None) -> None:
        self.holding.clear()
        self._go.clear()
        with self._lock:
            self._hold, self._after = role, after

    def release(self) -> None:
        self._go.set()

    def bodies(self, start: int = 0) -> list[str]:
        """Each recorded request from ``start`` on, as canonical JSON (for spotting a call paid twice)."""
        with self._lock:
            return [json.dumps(b, sort_keys=True) for b in self.requests[start:]]

    def close(self) -> None:
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()
