"""
Real headless chromium (Debian's) driven over the Chrome DevTools Protocol, for the dashboard's
end-to-end test: navigate, evaluate JavaScript in the page, collect console errors, exceptions
and failed loads, and take screenshots.  Loopback only; the sandbox is off (the tests run as
root); the profile is a temporary directory removed at close.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import urllib.request
from typing import Any

from websockets.sync.client import connect

from support import stop_process, wait_for, which


class BrowserError(AssertionError):
    pass


class Browser:
    def __init__(self, width: int = 1400, height: int = 1100) -> None:
        self.profile = tempfile.mkdtemp(prefix="gw-chromium-")
        self.proc = subprocess.Popen(
            [which("chromium"), "--headless=new", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--disable-background-networking", "--disable-sync", "--disable-component-update",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        active = os.path.join(self.profile, "DevToolsActivePort")

        def port() -> int | None:
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self.proc.returncode}")
            try:
                with open(active) as f:
                    first = f.readline().strip()
                return int(first) if first else None
            except (OSError, ValueError):
                return None
        self.port = wait_for(port, 30, what="chromium's DevTools port")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t.get("type") == "page"]
        # Entered as a context manager (what websockets asks for), left in close().
        self._ws_context = connect(pages[0]["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024)
        self.ws = self._ws_context.__enter__()
        self._ids = itertools.count(1)
        self._replies: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    def _read(self) -> None:
        try:
            while True:
                doc = json.loads(self.ws.recv())
                if "id" in doc:
                    with self._lock:
                        q = self._replies.get(doc["id"])
                    if q is not None:
                        q.put(doc)
                else:
                    self.events.append(doc)
        except Exception:  # noqa: BLE001 - the socket closed at teardown
            return

    def call(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        q: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            self._replies[ident] = q
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        try:
            reply = q.get(timeout=timeout)
        except queue.Empty:
            raise BrowserError(f"no answer to {method} within {timeout}s") from None
        finally:
            with self._lock:
                self._replies.pop(ident, None)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def navigate(self, url: str, timeout: float = 20) -> None:
        self.call("Page.navigate", url=url)
        wait_for(lambda: self.evaluate("document.readyState") == "complete", timeout,
                 what=f"{url} loaded")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen so far."""
        out = []
        for e in list(self.events):
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                  for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                out.append(f"log: {entry.get('text')} {entry.get('url', '')}")
            elif method == "Network.loadingFailed":
                out.append(f"network: {params.get('errorText')} {params.get('blockedReason', '')}")
        return out

    def requested_urls(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in list(self.events)
                if e.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, path: str) -> None:
        result = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(result["data"]))

    def close(self) -> None:
        try:
            self._ws_context.__exit__(None, None, None)
        except Exception:  # noqa: BLE001 - already gone
            pass
        stop_process(self.proc)
        self._reader.join(5)
        shutil.rmtree(self.profile, ignore_errors=True)
