"""Bounded concurrency with sequential results: the one place selftune runs LM calls in threads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def run_ordered(fn: Callable[[Any], Any], jobs: list[Any], workers: int) -> list[Any]:
    """``[fn(j) for j in jobs]``, at most ``workers`` at once, results in the order of ``jobs`` (the first
    failing job's error, in job order, is raised once all have run). Each job runs in a copy of the
    caller's context (DSPy's settings, e.g. the ledger as usage tracker, are context variables a plain
    worker thread would not see). One worker (or one job): run inline.

    The threads are daemons and the caller waits on a semaphore, so Ctrl-C or SIGTERM stops the tune at
    once: a call still in flight (a server holding a request open) is abandoned, not waited for, as a
    ``ThreadPoolExecutor`` would at shutdown and again at interpreter exit."""
    import contextvars
    import threading

    if workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    contexts = [contextvars.copy_context() for _ in jobs]  # copied here, in the caller's thread
    results: list[Any] = [None] * len(jobs)
    errors: dict[int, BaseException] = {}
    todo = iter(range(len(jobs)))
    lock, finished = threading.Lock(), threading.Semaphore(0)

    def work() -> None:
        while True:
            with lock:
                k = next(todo, None)
            if k is None:
                return
            try:
                results[k] = contexts[k].run(fn, jobs[k])
            except BaseException as err:  # noqa: BLE001 -- handed to the caller, in job order
                errors[k] = err
            finished.release()

    for n in range(min(workers, len(jobs))):
        threading.Thread(target=work, name=f"selftune-{n}", daemon=True).start()
    for _ in jobs:
        finished.acquire()  # a signal in the caller's thread interrupts this wait
    if errors:
        raise errors[min(errors)]
    return results
