"""Open built book pages in headless Chromium and report what a reader's browser sees.

For each page: how many formulas MathJax typeset (``mjx-container`` elements in the live DOM),
every ``<img>`` with whether it loaded (``complete`` and a non-zero ``naturalWidth``), the
console errors, uncaught exceptions and failed loads, and a screenshot.

Chromium is driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``: the
browser reads commands on file descriptor 3 and writes replies on 4, as NUL-terminated JSON), so
no port, no extra package and no network are needed. The pages are served from a local HTTP
server on 127.0.0.1, as GitHub Pages would serve them, so that scripts behave as they do online.

Usage::

    python .ci/browser_check.py _build/html book/intro.html book/02_priors.html --screenshots DIR

prints one JSON report per page and exits 1 when a page has no typeset math, a broken image or
a console error. ``tests/test_book.py`` imports :func:`check_pages`.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import functools
import http.server
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")

# The flags of a quiet, offline, throw-away browser.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
)

# Run in the page after it loaded: wait for MathJax to finish, then describe math and images.
_PAGE_REPORT_JS = """
(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
  }
  const images = [...document.images].map(img => ({
    src: img.getAttribute('src'), url: img.currentSrc || img.src,
    complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
  }));
  return {
    title: document.title,
    mathjax_loaded: !!(window.MathJax && MathJax.startup),
    mjx_containers: document.querySelectorAll('mjx-container').length,
    math_source_nodes: document.querySelectorAll('.math').length,
    images: images,
    body_height: document.documentElement.scrollHeight,
  };
})()
"""


class ChromiumError(RuntimeError):
    """Chromium could not be started or did not answer in time."""


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable on PATH, or ``None``."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class _DevToolsPipe:
    """A minimal DevTools-protocol client over Chromium's ``--remote-debugging-pipe``."""

    def __init__(self, executable: str, timeout: float) -> None:
        self.timeout = timeout
        self.events: list[dict] = []
        self._next_id = 0
        self._buffer = b""
        self._profile = tempfile.mkdtemp(prefix="bclib-chromium-")
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        # Move the browser's ends above fd 9 so that placing them on 3 and 4 cannot clobber them.
        to_browser_read, from_browser_write = (_move_above_9(fd) for fd in (to_browser_read, from_browser_write))
        # The browser expects its command pipe on fd 3 and its reply pipe on fd 4.
        command = (
            f'exec "$@" 3<&{to_browser_read} 4>&{from_browser_write} '
            f"{to_browser_read}<&- {from_browser_write}>&-"
        )
        self._process = subprocess.Popen(
            ["bash", "-c", command, "bash", executable, *CHROMIUM_FLAGS, "--remote-debugging-pipe",
             f"--user-data-dir={self._profile}", "about:blank"],
            pass_fds=(to_browser_read, from_browser_write),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command and wait for its reply; events that arrive meanwhile are kept."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            for reply in self._read(deadline):
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise ChromiumError(f"{method} failed: {reply['error']}")
                    return reply.get("result", {})
                self.events.append(reply)

    def wait_for_event(self, method: str, session: str | None = None) -> dict:
        """Wait until an event named ``method`` arrives (or has arrived) and return it."""
        deadline = time.monotonic() + self.timeout
        while True:
            for event in self.events:
                if event.get("method") == method and event.get("sessionId") == session:
                    return event
            self.events.extend(self._read(deadline))

    def _read(self, deadline: float) -> list[dict]:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or self._process.poll() is not None:
            raise ChromiumError("Chromium did not answer in time" if remaining <= 0 else "Chromium exited")
        ready, _, _ = select.select([self._from_browser], [], [], remaining)
        if not ready:
            return []
        chunk = os.read(self._from_browser, 1 << 20)
        if not chunk:
            raise ChromiumError("Chromium closed its DevTools pipe")
        self._buffer += chunk
        *complete, self._buffer = self._buffer.split(b"\0")
        return [json.loads(part) for part in complete if part]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            os.write(self._to_browser, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self._profile, ignore_errors=True)


def _move_above_9(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


@contextlib.contextmanager
def _serve(root: Path):
    """Serve ``root`` on an ephemeral port of 127.0.0.1; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


def _console_problems(events: list[dict], session: str) -> list[str]:
    """Console errors, uncaught exceptions and failed loads among the DevTools events."""
    problems = []
    for event in events:
        if event.get("sessionId") != session:
            continue
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", []))
            problems.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            description = details.get("exception", {}).get("description") or details.get("text")
            problems.append(f"uncaught exception: {description} ({details.get('url', '')}:{details.get('lineNumber')})")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            # The browser asks every server for /favicon.ico on its own; the page did not.
            if entry.get("url", "").endswith("/favicon.ico"):
                continue
            problems.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
    return problems


def check_pages(html_root, pages, screenshot_dir=None, *, width: int = 1280, height: int = 900,
                full_page: bool = False, timeout: float = 60.0) -> list[dict]:
    """Open each page of a built book in headless Chromium and report what it rendered.

    Args:
        html_root: the built HTML folder (``_build/html``), served over HTTP on 127.0.0.1.
        pages: page paths relative to ``html_root`` (``"book/intro.html"``).
        screenshot_dir: folder for one PNG per page (``book_intro.png``); ``None`` for no screenshots.
        width, height: the browser window in CSS pixels.
        full_page: screenshot the whole page instead of the first window.
        timeout: seconds to wait for any one step.

    Returns:
        One dict per page: ``page``, ``title``, ``mjx_containers`` (typeset formulas),
        ``math_source_nodes`` (formulas in the HTML source), ``images`` (``src``, ``complete``,
        ``width``, ``height``), ``broken_images`` (their ``src``), ``console_errors`` and
        ``screenshot`` (path or ``None``).

    Raises:
        FileNotFoundError: no Chromium on PATH, or a page is missing.
        ChromiumError: the browser failed or timed out.
    """
    html_root = Path(html_root)
    executable = find_chromium()
    if executable is None:
        raise FileNotFoundError(f"no Chromium found on PATH (looked for {', '.join(CHROMIUM_NAMES)})")
    for page in pages:
        if not (html_root / page).is_file():
            raise FileNotFoundError(f"page {page!r} not found under {html_root}")
    if screenshot_dir is not None:
        Path(screenshot_dir).mkdir(parents=True, exist_ok=True)
    reports = []
    with _serve(html_root) as base_url:
        browser = _DevToolsPipe(executable, timeout)
        try:
            for page in pages:
                reports.append(_check_one(browser, base_url, page, screenshot_dir, width, height, full_page))
        finally:
            browser.close()
    return reports


def _check_one(browser: _DevToolsPipe, base_url: str, page: str, screenshot_dir, width, height, full_page) -> dict:
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log"):
        browser.send(f"{domain}.enable", session=session)
    browser.send("Emulation.setDeviceMetricsOverride",
                 {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
    browser.events.clear()
    browser.send("Page.navigate", {"url": base_url + page}, session=session)
    browser.wait_for_event("Page.loadEventFired", session=session)
    result = browser.send("Runtime.evaluate", {"expression": _PAGE_REPORT_JS, "awaitPromise": True,
                                               "returnByValue": True}, session=session)
    if "exceptionDetails" in result:
        raise ChromiumError(f"page report script failed on {page}: {result['exceptionDetails']}")
    report = {"page": page, **result["result"]["value"]}
    report["broken_images"] = [img["src"] for img in report["images"] if not img["complete"] or img["width"] == 0]
    report["screenshot"] = None
    if screenshot_dir is not None:
        if full_page:
            # A window as tall as the page (Chromium caps textures at 16384 px) keeps the layout
            # of a normal window; capturing beyond the viewport would shift it.
            tall = min(report["body_height"], 16384)
            browser.send("Emulation.setDeviceMetricsOverride",
                         {"width": width, "height": tall, "deviceScaleFactor": 1, "mobile": False}, session=session)
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        path = Path(screenshot_dir) / (page.replace("/", "_").removesuffix(".html") + ".png")
        path.write_bytes(base64.b64decode(shot["data"]))
        report["screenshot"] = str(path)
    # Errors logged up to now, the screenshot included (late scripts have run by then).
    report["console_errors"] = _console_problems(browser.events, session)
    browser.send("Target.closeTarget", {"targetId": target})
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html_root", help="the built HTML folder, e.g. _build/html")
    parser.add_argument("pages", nargs="+", help="pages relative to html_root, e.g. book/intro.html")
    parser.add_argument("--screenshots", help="folder for the screenshots (none when omitted)")
    parser.add_argument("--full-page", action="store_true", help="screenshot whole pages")
    args = parser.parse_args(argv)
    reports = check_pages(args.html_root, args.pages, args.screenshots, full_page=args.full_page)
    failed = False
    for report in reports:
        print(json.dumps({k: v for k, v in report.items() if k != "images"}, indent=1))
        failed |= report["mjx_containers"] == 0 or bool(report["broken_images"]) or bool(report["console_errors"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
