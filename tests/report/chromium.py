"""Load a page in headless Chromium and report what a reader would see go wrong.

A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (stdlib only, no browser
download, no driver): Chromium reads NUL-terminated JSON commands on its fd 3 and writes replies and
events on its fd 4. :func:`load_page` opens one page, waits for its ``load`` event, and returns every
``<img>`` with its ``naturalWidth`` plus the console messages and uncaught exceptions of level
error or warning, so a test can assert that all images decoded and the console stayed clean.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# naturalWidth of every image after the load event; `complete` is true for broken images too
_IMAGES_JS = """JSON.stringify(Array.from(document.images, (img, i) => ({
  index: i, alt: img.alt, src: img.currentSrc.slice(0, 60), complete: img.complete,
  naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,
})))"""


@dataclass
class PageLoad:
    """What loading one page in Chromium produced.

    Attributes:
        images: one dict a ``<img>`` (index, alt, src prefix, complete, naturalWidth, naturalHeight).
        console: ``(level, text)`` of console messages, log entries (e.g. a failed resource load)
            and uncaught exceptions whose level is ``error`` or ``warning``.
        title: the document title.
        screenshot: PNG of the viewport after the load event.
    """

    images: list[dict[str, Any]] = field(default_factory=list)
    console: list[tuple[str, str]] = field(default_factory=list)
    title: str = ""
    screenshot: bytes = b""

    @property
    def broken_images(self) -> list[dict[str, Any]]:
        """Images that did not decode (naturalWidth 0)."""
        return [img for img in self.images if not img["naturalWidth"]]

    @property
    def errors(self) -> list[tuple[str, str]]:
        """Console entries of level error."""
        return [entry for entry in self.console if entry[0] == "error"]


def find_chromium() -> str:
    """Path of the system Chromium; skip the test where it is missing, except in CI (CI=true), where
    a missing browser is a failure (``.ci/run`` installs it)."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("chromium is not installed, but CI=true: .ci/run installs it (apt-get install chromium)")
    pytest.skip("chromium is not installed (Debian: apt-get install chromium)")


def _high_fd(fd: int) -> int:
    """A close-on-exec duplicate of ``fd`` numbered 10 or above (so moving it to 3/4 in the child cannot
    clobber the other end)."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class _Pipe:
    """A DevTools session over Chromium's debugging pipe."""

    def __init__(self, chromium: str, profile: Path, window: tuple[int, int]) -> None:
        to_r, to_w = (_high_fd(fd) for fd in os.pipe())
        from_r, from_w = (_high_fd(fd) for fd in os.pipe())

        def child_fds() -> None:  # runs in the child before exec: its fd 3 reads commands, fd 4 writes replies
            os.dup2(to_r, 3)  # dup2 makes 3 and 4 inheritable; every other fd of ours is close-on-exec
            os.dup2(from_w, 4)

        self.proc = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--remote-debugging-pipe",
                "--no-sandbox",  # CI runs as root, where the sandbox refuses to start
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--mute-audio",
                f"--window-size={window[0]},{window[1]}",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            close_fds=False,  # would close 3 and 4 after child_fds; Python's own fds are close-on-exec (PEP 446)
            preexec_fn=child_fds,
        )
        os.close(to_r)
        os.close(from_w)
        self.write_fd, self.read_fd = to_w, from_r
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None, timeout: float = 30.0) -> Any:
        """Send one command and return its result, queueing the events that arrive meanwhile."""
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str, timeout: float = 30.0) -> dict[str, Any]:
        """Return the first event ``method`` of ``session``, received already or arriving before the timeout."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method and event.get("sessionId") == session:
                    return event
            seen = len(self.events)
            self.events.append(self._read(deadline))

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from chromium in time")
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if ready:
                chunk = os.read(self.read_fd, 1 << 16)
                if not chunk:
                    stderr = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
                    raise RuntimeError(f"chromium closed the debugging pipe (exit {self.proc.poll()}): {stderr}")
                self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.write_fd, self.read_fd):
            os.close(fd)
        if self.proc.stderr:
            self.proc.stderr.close()


def _console_entries(events: list[dict[str, Any]], session: str) -> list[tuple[str, str]]:
    entries = []
    for event in events:
        if event.get("sessionId") != session:
            continue
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
            text = " ".join(str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", []))
            entries.append(("error" if params["type"] == "assert" else params["type"], text))
        elif method == "Log.entryAdded" and params["entry"].get("level") in ("error", "warning"):
            entry = params["entry"]
            entries.append((entry["level"], f"{entry.get('text', '')} {entry.get('url', '')}".strip()))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            entries.append(("error", details.get("exception", {}).get("description") or details.get("text", "")))
    return entries


def load_page(path: Path, profile: Path, window: tuple[int, int] = (1280, 1024), timeout: float = 60.0) -> PageLoad:
    """Open ``path`` in headless Chromium, wait for its load event, and collect images and console output.

    Args:
        path: the HTML file.
        profile: an empty directory for Chromium's profile (a test's tmp_path).
        window: the viewport, width and height.
        timeout: seconds for each step (start, navigation, evaluation).
    """
    pipe = _Pipe(find_chromium(), profile, window)
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True}, timeout=timeout)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            pipe.send(f"{domain}.enable", session=session, timeout=timeout)
        pipe.events.clear()  # about:blank's events
        pipe.send("Page.navigate", {"url": path.resolve().as_uri()}, session=session, timeout=timeout)
        pipe.wait_for("Page.loadEventFired", session, timeout=timeout)
        images = pipe.send(
            "Runtime.evaluate", {"expression": _IMAGES_JS, "returnByValue": True}, session=session, timeout=timeout
        )
        title = pipe.send("Runtime.evaluate", {"expression": "document.title", "returnByValue": True}, session=session)
        shot = pipe.send("Page.captureScreenshot", {"format": "png"}, session=session, timeout=timeout)
        return PageLoad(
            images=json.loads(images["result"]["value"]),
            console=_console_entries(pipe.events, session),
            title=str(title["result"].get("value", "")),
            screenshot=base64.b64decode(shot["data"]),
        )
    finally:
        pipe.close()
