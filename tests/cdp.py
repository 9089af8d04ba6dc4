"""A small Chrome DevTools Protocol client for the browser tests: headless Debian ``chromium``,
driven over one page's websocket (``websocket-client``), no browser download.

``Browser(tmp)`` starts chromium with a private profile in ``tmp`` and an OS-chosen debugging port;
``open(url)`` navigates; ``wait_text(needles)`` polls the rendered page's text until every needle shows
(or fails naming the ones missing, with the page's text); ``screenshot(path)`` writes a PNG.
``close()`` ends the browser it started and only that one.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any


def chromium() -> str | None:
    return next((p for n in ("chromium", "chromium-browser") if (p := shutil.which(n))), None)


class Browser:
    def __init__(self, tmp: Path, width: int = 1400, height: int = 1000):
        import websocket

        exe = chromium()
        assert exe, "chromium is not installed"
        import tempfile

        profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=tmp))  # a fresh profile: no other browser's lock
        self.ws: Any = None
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--disable-extensions", "--disable-background-networking", "--disable-breakpad",
             "--disable-crash-reporter", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "TMPDIR": str(profile)})  # its shared-memory files stay in the test's folder
        try:
            port_file = profile / "DevToolsActivePort"
            deadline = time.monotonic() + 60
            while not (port_file.is_file() and port_file.read_text().strip()):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("chromium did not open its DevTools port")
                time.sleep(0.2)
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                page = next(t for t in json.load(r) if t["type"] == "page")
            self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
            self._id = 0
            self.call("Page.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
        except BaseException:
            self.close()
            raise

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        res = self.call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                        returnByValue=True)
        return str(res.get("result", {}).get("value", ""))

    def wait_text(self, needles: list[str], timeout: float = 90.0) -> str:
        """The page's text once every needle is in it; AssertionError naming the missing ones otherwise."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.text()
            if all(n in text for n in needles):
                return text
            time.sleep(0.5)
        missing = [n for n in needles if n not in text]
        raise AssertionError(f"not on the page after {timeout:.0f}s: {missing}\n--- page text ---\n{text[:3000]}")

    def click(self, css: str) -> bool:
        """Click the first visible element matching ``css``; False when there is none."""
        js = (f"(() => {{ const e = [...document.querySelectorAll({json.dumps(css)})]"
              ".find(e => e.offsetParent !== null); if (!e) return false; e.click(); return true; })()")
        return bool(self.call("Runtime.evaluate", expression=js, returnByValue=True)["result"].get("value"))

    def click_all(self, css: str) -> int:
        """Click every visible element matching ``css``; how many were clicked."""
        js = (f"(() => {{ const es = [...document.querySelectorAll({json.dumps(css)})]"
              ".filter(e => e.offsetParent !== null); es.forEach(e => e.click()); return es.length; })()")
        return int(self.call("Runtime.evaluate", expression=js, returnByValue=True)["result"].get("value") or 0)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        """End the browser started here: its process group (renderers, zygote), nothing else."""
        if self.ws is not None:
            try:
                self.call("Browser.close")  # a clean exit removes chromium's own temporary files
                self.proc.wait(timeout=15)
            except Exception:  # noqa: BLE001 -- then it is stopped below
                pass
            self.ws.close()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
