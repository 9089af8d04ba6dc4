"""Bounded concurrency with sequential results: the one place selftune runs LM calls in threads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def run_ordered(fn: Callable[[Any], Any], jobs: list[Any], workers: int) -> list[Any]:
    """``[fn(j) for j in jobs]``, at most ``workers`` at once, results in the order of ``jobs``. Each job
    runs in a copy of the caller's context (DSPy's settings, e.g. the ledger as usage tracker, are
    context variables a plain worker thread would not see). One worker (or one job): run inline."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    if workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=min(workers, len(jobs)), thread_name_prefix="selftune") as pool:
        futures = [pool.submit(contextvars.copy_context().run, fn, j) for j in jobs]
        return [f.result() for f in futures]
