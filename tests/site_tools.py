"""Build the documentation site once, serve it on the loopback, drive headless Chromium.

Used by ``tests/test_site.py`` (the built HTML, and the pages as a browser renders them) and
``tests/test_docs.py`` (``mkdocs build --strict``), through the session fixture ``built_site``
of ``tests/conftest.py``: the site is built once per test session.

The browser is the system's Chromium (``apt-get install -y chromium``, which ``.ci/run``
does), started headless with a fresh profile and no network: every host name resolves to
nothing and every non-loopback connection goes to a dead proxy. It is driven through the
DevTools protocol over a pipe (``--remote-debugging-pipe``: JSON messages separated by NUL
bytes on file descriptors 3 and 4), so no Python or npm package is needed.
"""

from __future__ import annotations

import fcntl
import functools
import http.server
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC_PLUGINS = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "mkdocs_jupyter", "mathjax")


def require(condition: bool, reason: str) -> None:
    """Skip when a tool is missing on a developer's machine; in CI (``CI`` set) fail instead,
    so that a missing install step cannot turn a check into a silent skip."""
    import pytest

    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must install it: see .ci/run)", pytrace=False)
        pytest.skip(reason)


def missing_doc_plugins() -> list[str]:
    import importlib.util

    missing = []
    for name in DOC_PLUGINS:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    return missing


def build_site(site_dir: pathlib.Path, work_dir: pathlib.Path) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` of this checkout into ``site_dir`` (mkdocs-jupyter's cache
    lands in ``work_dir``)."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "--site-dir", str(site_dir)],
        cwd=work_dir, capture_output=True, text=True, timeout=600, env=env,
    )


def chromium_path() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


# --------------------------------------------------------------------------- static server
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        pass


class SiteServer:
    """``http.server`` on 127.0.0.1 (an ephemeral port) serving ``root`` from a thread."""

    def __init__(self, root: pathlib.Path):
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "SiteServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --------------------------------------------------------------------------- the browser
class BrowserError(RuntimeError):
    pass


class Chromium:
    """A headless Chromium with no network, driven over the DevTools pipe.

    ``browser.open(url, width)`` loads a page and records every request it makes,
    ``browser.resize(width)`` lays it out again, ``browser.evaluate(js)`` runs an expression
    (awaiting a promise) in it, ``browser.page_events(method)`` lists the events of that page.
    """

    FLAGS = (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
        "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars=false", "--mute-audio",
        # No network: names resolve to nothing and any connection off the loopback goes to a
        # closed port (loopback addresses bypass the proxy). The pages must still render fully.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:9",
    )

    def __init__(self, executable: str, timeout: float = 60.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="gf-chromium-")
        to_child_r, self._to_child_w = os.pipe()
        self._from_child_r, from_child_w = os.pipe()
        # The child reads commands on fd 3 and writes replies on fd 4. Its ends are first moved
        # to free descriptors >= 10 (close-on-exec), so that the two dup2 calls in the child
        # cannot clobber each other; fds 3 and 4 are the only extra ones Chromium inherits.
        hi_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD_CLOEXEC, 10)
        hi_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_child_r)
        os.close(from_child_w)

        def child_fds() -> None:
            os.dup2(hi_r, 3)  # inheritable copies
            os.dup2(hi_w, 4)

        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [executable, *self.FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr,
            close_fds=False, preexec_fn=child_fds,
        )
        os.close(hi_r)
        os.close(hi_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict] = []
        self.session: Optional[str] = None
        self.target: Optional[str] = None

    # protocol plumbing
    def _send(self, method: str, params: Optional[dict] = None, session: Optional[str] = None) -> int:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child_w, json.dumps(msg).encode() + b"\0")
        return self._next_id

    def _read_message(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("timed out waiting for Chromium")
            ready, _, _ = select.select([self._from_child_r], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._from_child_r, 1 << 20)
            if not chunk:
                self._stderr.seek(0)
                err = self._stderr.read().decode(errors="replace")
                raise BrowserError(f"Chromium exited (code {self.proc.poll()}):\n{err[-3000:]}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: Optional[dict] = None, session: Optional[str] = None, timeout: Optional[float] = None) -> dict:
        mid = self._send(method, params, session)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            msg = self._read_message(deadline)
            if msg.get("id") == mid:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_event(self, method: str, session: Optional[str], timeout: Optional[float] = None) -> dict:
        for i, ev in enumerate(self.events):
            if ev["method"] == method and ev.get("sessionId") == session:
                return self.events.pop(i)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            msg = self._read_message(deadline)
            if "method" in msg:
                if msg["method"] == method and msg.get("sessionId") == session:
                    return msg
                self.events.append(msg)

    # pages
    def open(self, url: str, width: int = 1280, height: int = 900) -> None:
        """Load ``url`` in the tab (created on first use) at ``width`` CSS pixels and wait for its
        load event; the events recorded so far are dropped."""
        if self.session is None:
            self.target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.call("Target.attachToTarget", {"targetId": self.target, "flatten": True})["sessionId"]
            for domain in ("Page", "Network", "Runtime", "Log"):
                self.call(f"{domain}.enable", {}, self.session)
        self.resize(width, height)
        self.events.clear()
        self.call("Page.navigate", {"url": url}, self.session)
        self.wait_event("Page.loadEventFired", self.session)

    def resize(self, width: int, height: int = 900) -> None:
        """Lay the current page out again at ``width`` CSS pixels (no reload)."""
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, self.session)

    def evaluate(self, expression: str, timeout: Optional[float] = None) -> Any:
        res = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True},
                        self.session, timeout=timeout)
        if "exceptionDetails" in res:
            raise BrowserError(f"page script failed: {json.dumps(res['exceptionDetails'])[:2000]}")
        return res["result"].get("value")

    def page_events(self, method: str) -> list[dict]:
        """Events of the current tab so far (after draining what the pipe holds)."""
        self.call("Runtime.evaluate", {"expression": "0"}, self.session)  # a round trip flushes pending events
        return [ev["params"] for ev in self.events if ev["method"] == method and ev.get("sessionId") == self.session]

    def close_tab(self) -> None:
        if self.target is not None:
            try:
                self.call("Target.closeTarget", {"targetId": self.target})
            except BrowserError:
                pass
            self.target = self.session = None

    def close(self) -> None:
        try:
            self.close_tab()
            self.call("Browser.close", timeout=10)
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child_w, self._from_child_r):
            try:
                os.close(fd)
            except OSError:
                pass
        self._stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
