"""One command at a time per workdir, and a clean stop on SIGTERM.

A workdir holds one MLflow store, one chroma index, one response cache and ``best/``: two tunes on it
would race on the store's schema, build the same collections twice, pay every call twice and overwrite
each other's best params. ``tune`` and ``eval`` (both write the index) take an exclusive ``flock`` on
``<workdir>/selftune.lock``; a second one is refused at once. The kernel drops the lock when its
process dies, however it dies (SIGKILL, OOM, power), so there is never a stale lock to clear by hand.
``judge``, ``calibrate`` and ``ui`` take none: they build no index, and at most add a run of their
own to the MLflow store (whose writes the database serialises).

SIGTERM (``timeout``, systemd, Kubernetes, CI) is turned into ``Terminated``, a ``KeyboardInterrupt``,
so it takes the Ctrl-C path: the current round is abandoned, finished rounds stay in MLflow, the parent
run is marked KILLED and ``tune --resume`` continues it.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from .errors import InputError

LOCK_NAME = "selftune.lock"


class WorkdirLock:
    """An exclusive, non-blocking ``flock`` on ``<workdir>/selftune.lock`` held until ``release()`` or
    the process ends. The file names its holder (pid, command, start time) for the refusal message."""

    def __init__(self, workdir: Path, command: str):
        self.path = workdir / LOCK_NAME
        self.command = command
        self._fh: IO[str] | None = None

    def acquire(self) -> WorkdirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a+", encoding="utf-8")  # never truncated before the lock is ours
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise InputError(self.path.parent, "", f"in use by {holder}; one tune or eval per workdir at a time "
                                                   "(wait for it, stop it, or give this config another workdir)") \
                from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"selftune {self.command} (pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, like Ctrl-C's KeyboardInterrupt."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` (the previous handler is restored after). Off
    the main thread (a command called from a worker thread) signals cannot be handled: a no-op."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code(err: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process stopped by it."""
    return 128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)
