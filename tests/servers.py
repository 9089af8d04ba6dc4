"""Real servers on 127.0.0.1 for the tests: a PostgreSQL cluster of its own (Debian's binaries, initdb into a
temp folder, run by the unprivileged ``postgres`` user when the tests run as root, a unix socket in that
folder and a free TCP port), an ``mlflow server`` and a ``chroma run``. Each is a context manager that
always stops what it started (by its own process id) and yields what a config needs to reach it."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selftune.ui import free_port, server_command, server_env, stop, wait_healthy


def postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL bin folder with initdb and pg_ctl, if any is installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _as_owner() -> dict:
    """initdb and postgres refuse to run as root: then run them as the ``postgres`` user."""
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam("postgres")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


@contextmanager
def postgres(databases: tuple[str, ...] = ("optuna", "mlflow")) -> Iterator[dict]:
    """A throw-away PostgreSQL cluster; yields {"port", "url": {db: SQLAlchemy URL}}."""
    bin_ = postgres_bin()
    assert bin_ is not None, "no PostgreSQL binaries (the caller skips first)"
    tmp = Path(tempfile.mkdtemp(prefix="selftune-pg-"))  # not under pytest's root-only tmp: postgres must enter it
    owner = _as_owner()
    if owner:
        os.chown(tmp, owner["user"], owner["group"])
    data, port = tmp / "data", free_port()
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    run = dict(env=env, cwd=tmp, check=True, capture_output=True, text=True, **owner)
    try:
        subprocess.run([str(bin_ / "initdb"), "-D", str(data), "-U", "selftune", "--auth=trust", "-E", "UTF8"], **run)
        subprocess.run([str(bin_ / "pg_ctl"), "-D", str(data), "-l", str(tmp / "server.log"), "-w", "-t", "60",
                        "-o", f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1", "start"], **run)
        for db in databases:
            subprocess.run([str(bin_ / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "selftune", db], **run)
        yield {"port": port, "dir": tmp,
               "url": {db: f"postgresql+psycopg2://selftune@127.0.0.1:{port}/{db}" for db in databases}}
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"{err.cmd[0]} failed: {err.stderr or err.stdout}") from err
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([str(bin_ / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], env=env, cwd=tmp,
                           capture_output=True, **owner)
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def mlflow_server(backend: str, artifacts: Path, log: Path) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 over ``backend``, serving artifacts from ``artifacts``; yields its URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        cmd = server_command(backend, "127.0.0.1", port) + ["--artifacts-destination", str(artifacts)]
        proc = subprocess.Popen(cmd, env=server_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(base, proc, 240, log)
            yield base
        finally:
            stop(proc)


def chroma_bin() -> str:
    """The ``chroma`` CLI of the venv running the tests (chromadb's own server)."""
    here = Path(sys.executable).parent / "chroma"
    return str(here) if here.exists() else (shutil.which("chroma") or "chroma")


@contextmanager
def chroma_server(path: Path, log: Path) -> Iterator[str]:
    """``chroma run`` on 127.0.0.1 with its store in ``path``; yields http://127.0.0.1:PORT."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen([chroma_bin(), "run", "--path", str(path), "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, f"chroma run exited: {log.read_text()[-2000:]}"
                try:
                    with urllib.request.urlopen(f"{base}/api/v2/heartbeat", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    assert time.monotonic() < deadline, f"chroma run did not answer: {log.read_text()[-2000:]}"
                    time.sleep(0.3)
            yield base
        finally:
            stop(proc)
