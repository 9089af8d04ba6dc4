"""``selftune ui [CONFIG]``: the MLflow UI on a config's tracking store, started so it cannot hang offline.

``mlflow ui`` started from a bare shell imports litellm, whose import fetches a remote model-cost map;
with no network that import never returns and the port stays blank. ``serve`` therefore starts
``mlflow server`` (one worker, bound to 127.0.0.1) in a subprocess whose environment carries
``runtime.OFFLINE_ENV`` (a variable the user set keeps its value), waits until ``/health`` answers, and
always stops the server when the caller is done. A config whose ``tracking.uri`` is already an
``http(s)`` server is not served again: its URL is used as it is.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .runtime import OFFLINE_ENV


@dataclass(frozen=True)
class Store:
    """A tracking store and the experiment selftune logs to."""

    uri: str
    experiment: str


def store_of(config: Path | None) -> Store:
    """The store of ``config`` (its ``tracking.uri``, else sqlite in its workdir); without a config,
    ./.selftune/mlflow.db and experiment ``selftune``. Bad input raises InputError."""
    if config is None:
        return Store(f"sqlite:///{(Path('.selftune') / 'mlflow.db').resolve()}", "selftune")
    from .config import load_config

    cfg = load_config(config)
    return Store(cfg.tracking_uri(), cfg.tracking.experiment)


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    for k, v in OFFLINE_ENV.items():
        env.setdefault(k, v)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def server_command(uri: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
            "--port", str(port), "--workers", "1"]


@contextmanager
def serve(uri: str, host: str = "127.0.0.1", port: int = 0, timeout: float = 180.0,
          log: Path | None = None) -> Iterator[str]:
    """Yield the base URL of a UI on ``uri``: ``uri`` itself if it is an http(s) server, else an
    ``mlflow server`` started here (``port`` 0: a free one), stopped on exit whatever happens.
    Raises RuntimeError naming the log when the server does not answer within ``timeout``."""
    if uri.startswith(("http://", "https://")):
        yield uri.rstrip("/")
        return
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    base = f"http://{host}:{port}"
    out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115 -- closed below
    proc = subprocess.Popen(server_command(uri, host, port), env=server_env(), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_die_with_parent)
    try:
        wait_healthy(base, proc, timeout, log)
        yield base
    finally:
        stop(proc)
        if log is not None:
            out.close()  # type: ignore[union-attr]


def _die_with_parent() -> None:
    """In the server's process, before exec: SIGTERM it when this process dies, however it dies (Linux's
    PR_SET_PDEATHSIG), so a `selftune ui` that is killed outright leaves no server behind (measured: a
    SIGKILLed `selftune ui` left its server and MLflow's job consumers running)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux: `stop` below is the only clean-up
        pass


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode}" + (f"; see {log}" if log else ""))
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not answer on {base} within {timeout:.0f}s"
                       + (f"; see {log}" if log else ""))


def stop(proc: subprocess.Popen) -> None:
    """Stop the server's whole process group (uvicorn spawns a worker), this one only."""
    import signal

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def last_tune(uri: str, experiment: str) -> tuple[str, str] | None:
    """(experiment id, run id) of the most recently started tune's parent run, or None."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`selftune.kind` = 'tune'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return (exp.experiment_id, runs[0].info.run_id) if runs else None


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def trace_url(base: str, experiment_id: str, trace_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/traces?selectedEvaluationId={trace_id}"


def open_ui(config: Path | None, port: int, say: Callable[[str], None]) -> None:
    """``selftune ui``: serve the store of ``config`` until Ctrl-C, saying its URL and the last tune's."""
    store = store_of(config)
    with serve(store.uri, port=port) as base:
        say(f"MLflow UI: {base}  (store {store.uri}, experiment '{store.experiment}')")
        last = last_tune(store.uri, store.experiment)
        say(f"last tune: {run_url(base, *last)}" if last else "no tune in this store yet")
        say("Ctrl-C stops the server")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            say("stopped")
