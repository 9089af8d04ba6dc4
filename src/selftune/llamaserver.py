"""The embedded GGUF behind an OpenAI-compatible endpoint on 127.0.0.1: llama-cpp-python's own server
(``python -m llama_cpp.server``), as a team would serve a model for selftune's ``openai/...`` roles.

Used by ``tests/test_served.py`` and ``selftune.servedbench``. The server demands ``key``; it runs in
its own session and is always torn down (terminate, then kill)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from . import lm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """``with LlamaServer(log, key) as base:`` -> ``http://127.0.0.1:<port>/v1``, once ``/models`` answers."""

    def __init__(self, log: Path, key: str, threads: int | None = None, n_ctx: int = lm.N_CTX,
                 start_timeout: float = 180.0):
        self.log, self.key, self.n_ctx, self.start_timeout = log, key, n_ctx, start_timeout
        self.threads = str(threads or min(2, os.cpu_count() or 1))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> str:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llama_cpp.server", "--model", str(lm.local_gguf_path()), "--host", "127.0.0.1",
                 "--port", str(self.port), "--n_threads", self.threads, "--n_threads_batch", self.threads,
                 "--n_ctx", str(self.n_ctx), "--seed", "0", "--api_key", self.key],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait()
        except BaseException:
            self.close()
            raise
        return self.base

    def _wait(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the llama.cpp server exited: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                req = urllib.request.Request(f"{self.base}/models", headers={"Authorization": f"Bearer {self.key}"})
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the llama.cpp server did not come up in {self.start_timeout:g} s: "
                                       f"{self.log.read_text(errors='replace')[-2000:]}") from None
                time.sleep(1)

    def close(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
