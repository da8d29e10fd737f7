"""Open a page in a real headless Chromium and report what a reader's browser would see.

Chromium is driven over the DevTools protocol through `--remote-debugging-pipe` (the transport
Puppeteer and Playwright use): commands go in on file descriptor 3 and replies and events come
out on descriptor 4, as JSON messages ended by a NUL byte. That needs no websocket library and
no TCP port. The page's console messages, uncaught exceptions, network requests and JavaScript
dialogs are recorded while it loads; then its text is read and a screenshot is taken.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",  # tests run as root in containers, where the sandbox cannot start
    "--disable-gpu",
    "--disable-dev-shm-usage",  # small /dev/shm in containers crashes renderers
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",  # no update checks etc.: we count every request
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
    "--remote-debugging-pipe",
)


class BrowserError(RuntimeError):
    """Chromium could not be started or did not answer."""


def find_chromium() -> str | None:
    """Path of a Chromium executable ($CHROMIUM overrides), or None."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def ensure_chromium(timeout: float = 600.0) -> str:
    """A Chromium executable, installing Debian's `chromium` package when root can.

    Raises BrowserError with the reason when there is none and it cannot be installed.
    """
    path = find_chromium()
    if path:
        return path
    if os.environ.get("AIR_NO_BROWSER_INSTALL"):
        raise BrowserError("chromium not found and AIR_NO_BROWSER_INSTALL is set")
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BrowserError("chromium not found (install Debian's `chromium` package)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
    )
    for cmd in steps:
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise BrowserError(f"`{' '.join(cmd)}` failed: {err}") from err
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip()[-500:]
            raise BrowserError(f"`{' '.join(cmd)}` failed ({done.returncode}): {tail}")
    path = find_chromium()
    if not path:
        raise BrowserError("chromium was installed but is not on PATH")
    return path


@dataclass
class PageVisit:
    """What happened while a page loaded in the browser."""

    url: str
    console: list[dict[str, Any]] = field(default_factory=list)  # console API calls
    log_entries: list[dict[str, Any]] = field(default_factory=list)  # browser log (Log domain)
    exceptions: list[dict[str, Any]] = field(default_factory=list)  # uncaught JS exceptions
    requests: list[str] = field(default_factory=list)  # every URL the page requested
    dialogs: list[str] = field(default_factory=list)  # alert/confirm/prompt messages
    text: str = ""  # document.body.innerText after load
    screenshot: bytes = b""  # PNG of the viewport
    values: dict[str, Any] = field(default_factory=dict)  # results of `evaluate` expressions

    @property
    def errors(self) -> list[str]:
        """Console errors, error-level log entries and uncaught exceptions, as text."""
        out = [
            " ".join(str(a.get("value", a.get("description", ""))) for a in c.get("args", []))
            for c in self.console
            if c.get("type") in ("error", "assert")
        ]
        out += [e.get("text", "") for e in self.log_entries if e.get("level") == "error"]
        out += [
            e.get("exception", {}).get("description") or e.get("text", "") for e in self.exceptions
        ]
        return out

    @property
    def external_requests(self) -> list[str]:
        """Requested URLs that leave the machine (anything but file: and data: URLs)."""
        return [u for u in self.requests if not u.startswith(("file:", "data:", "about:"))]


class _Pipe:
    """The DevTools protocol over Chromium's debugging pipe."""

    def __init__(self, proc: subprocess.Popen, write_fd: int, read_fd: int) -> None:
        self.proc, self.write_fd, self.read_fd = proc, write_fd, read_fd
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None  # page session whose dialogs are dismissed at once

    def _post(self, method: str, params: dict | None, session: str | None) -> int:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.write_fd, json.dumps(msg).encode() + b"\0")
        return self.next_id

    def _event(self, msg: dict[str, Any]) -> None:
        self.events.append(msg)
        # An open alert() blocks the page's load event: record it, then dismiss it.
        if msg["method"] == "Page.javascriptDialogOpening" and self.session:
            self._post("Page.handleJavaScriptDialog", {"accept": True}, self.session)

    def send(
        self, method: str, params: dict | None = None, session: str | None = None, timeout=30.0
    ) -> dict[str, Any]:
        """Send one command and wait for its reply; events that arrive meanwhile are kept."""
        wanted = self._post(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply is None:
                raise BrowserError(f"no reply to {method} within {timeout} s")
            if reply.get("id") == wanted:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self._event(reply)

    def wait_for(self, method: str, timeout: float) -> bool:
        """Collect events until one named `method` arrives (True) or the time is up (False)."""
        deadline = time.monotonic() + timeout
        if any(e["method"] == method for e in self.events):
            return True
        while True:
            msg = self._read(deadline)
            if msg is None:
                return False
            if "method" in msg:
                self._event(msg)
                if msg["method"] == method:
                    return True

    def drain(self, seconds: float) -> None:
        """Keep collecting events for a moment (late console messages, late requests)."""
        deadline = time.monotonic() + seconds
        while (msg := self._read(deadline)) is not None:
            if "method" in msg:
                self._event(msg)

    def _read(self, deadline: float) -> dict[str, Any] | None:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise BrowserError(f"chromium closed the pipe (exit code {self.proc.poll()})")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)


def visit(
    path_or_url: str | Path,
    width: int = 1400,
    height: int = 2000,
    load_timeout: float = 30.0,
    settle: float = 0.5,
    evaluate: dict[str, str] | None = None,
) -> PageVisit:
    """Load a page in headless Chromium; record console, requests and dialogs; screenshot it.

    `evaluate` maps names to JavaScript expressions evaluated in the loaded page (through
    DevTools, so the page's own no-script policy does not stop them); their JSON-able results
    land in `PageVisit.values`, e.g. the layout boxes of elements.
    """
    exe = ensure_chromium()
    url = path_or_url if "://" in str(path_or_url) else Path(path_or_url).resolve().as_uri()
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()

    def place_pipes() -> None:  # runs in the child: Chromium expects fds 3 (in) and 4 (out)
        a, b = os.dup(to_browser_r), os.dup(from_browser_w)  # off 3 and 4 before dup2 over them
        os.dup2(a, 3)
        os.dup2(b, 4)
        # dup2(3, 3) is a no-op that leaves close-on-exec set (os.dup's default) when the dup
        # itself landed on 3 or 4: clear it explicitly so that both survive exec.
        os.set_inheritable(3, True)
        os.set_inheritable(4, True)

    with tempfile.TemporaryDirectory(prefix="air-chromium-") as profile:
        cmd = [exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]
        log = open(Path(profile) / "stderr.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            preexec_fn=place_pipes,  # noqa: PLW1509 - single-threaded test process
            # Keep fds 3 and 4 open across exec. Not pass_fds=(3, 4): that would fail with EBADF
            # when the parent has nothing open there. Python's own fds are non-inheritable, so
            # nothing else leaks.
            close_fds=False,
            start_new_session=True,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        pipe = _Pipe(proc, to_browser_w, from_browser_r)
        try:
            return _visit(pipe, url, width, height, load_timeout, settle, evaluate or {})
        except (BrowserError, OSError) as err:  # say why Chromium went away, if it did
            log.flush()
            tail = (Path(profile) / "stderr.log").read_bytes()[-1500:].decode(errors="replace")
            raise BrowserError(f"{err}; chromium exit code {proc.poll()}; stderr:\n{tail}") from err
        finally:
            log.close()
            with contextlib.suppress(BrowserError, OSError):  # it may be gone already
                pipe.send("Browser.close", timeout=5)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            os.close(to_browser_w)
            os.close(from_browser_r)


def _visit(
    pipe: _Pipe,
    url: str,
    width: int,
    height: int,
    load_timeout: float,
    settle: float,
    evaluate: dict[str, str],
) -> PageVisit:
    target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    pipe.session = session
    for domain in ("Page", "Runtime", "Log", "Network"):
        pipe.send(f"{domain}.enable", session=session)
    pipe.send(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        session=session,
    )
    pipe.events.clear()  # only what the page under test does
    nav = pipe.send("Page.navigate", {"url": url}, session=session)
    if nav.get("errorText"):
        raise BrowserError(f"cannot open {url}: {nav['errorText']}")
    if not pipe.wait_for("Page.loadEventFired", load_timeout):
        raise BrowserError(f"{url} did not finish loading within {load_timeout} s")
    pipe.drain(settle)
    page = PageVisit(url=url)
    for event in pipe.events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            page.console.append(params)
        elif method == "Log.entryAdded":
            page.log_entries.append(params.get("entry", {}))
        elif method == "Runtime.exceptionThrown":
            page.exceptions.append(params.get("exceptionDetails", {}))
        elif method == "Network.requestWillBeSent":
            page.requests.append(params.get("request", {}).get("url", ""))
        elif method == "Page.javascriptDialogOpening":
            page.dialogs.append(params.get("message", ""))
    text = pipe.send(
        "Runtime.evaluate",
        {"expression": "document.body ? document.body.innerText : ''", "returnByValue": True},
        session=session,
    )
    page.text = text.get("result", {}).get("value", "")
    for name, expression in evaluate.items():
        reply = pipe.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session
        )
        if "exceptionDetails" in reply:
            raise BrowserError(f"evaluating {name!r} failed: {reply['exceptionDetails']}")
        page.values[name] = reply.get("result", {}).get("value")
    shot = pipe.send("Page.captureScreenshot", {"format": "png"}, session=session, timeout=60)
    page.screenshot = base64.b64decode(shot["data"])
    return page


def blankness(png: bytes) -> tuple[float, float]:
    """(fraction of pixels that are not near-white, grey-level standard deviation) of a PNG."""
    import io

    import numpy as np
    from PIL import Image

    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    return float((grey < 235).mean()), float(grey.std())
