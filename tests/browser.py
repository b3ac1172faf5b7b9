"""A real browser for tests: Debian's headless Chromium, driven by Selenium.

Shared by every test that needs a page to run (the console, and later Server-Sent
Events and WebSocket compression seen from a browser). What it guarantees:

- **Nothing is downloaded at run time.** Chromium and chromedriver are the
  system's (``apt-get install chromium chromium-driver``; ``.ci/run`` does it),
  the Service is given the driver's path and ``SE_OFFLINE=true`` keeps Selenium
  Manager from looking for one. Any request to a host other than 127.0.0.1
  fails at once (``--host-resolver-rules``), and :meth:`Browser.foreign_requests`
  lists what the page tried to load from elsewhere.
- **Missing pieces skip, with the reason**, on a developer's machine; under CI
  (``TIDINGS_REQUIRE_BROWSER=1``, set by ``.ci/run``) they fail.
- **Waits are on the DOM, each with a timeout**: :meth:`Browser.wait_for`,
  :meth:`Browser.wait_text`, :meth:`Browser.wait_until`. Never a sleep.
- **Something to look at when it fails**: :meth:`Browser.screenshot` saves PNGs
  to one directory per run (printed at the end of the run, or
  ``TIDINGS_SCREENSHOT_DIR``), and :meth:`Browser.console_log` returns the page's
  console messages.

One browser per test module (the ``browser`` fixture, which ``conftest.py``
makes available to every module). Selenium blocks, so a Trio test calls it
through :func:`in_thread`, which keeps the test's own sockets (a WebSocket
client, say) served meanwhile.
:func:`tidings_serve` runs a real ``tidings serve`` process for the page to visit.
"""

from __future__ import annotations

import functools
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs
import pytest
import trio

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException, WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # browser_missing() says so, and the browser tests skip
    webdriver = None

T = TypeVar("T")

CHROMIUM = os.environ.get("TIDINGS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TIDINGS_CHROMEDRIVER", "/usr/bin/chromedriver")
REQUIRE_ENV = "TIDINGS_REQUIRE_BROWSER"
#: Seconds any single wait may take: generous, so that a slow CI machine passes,
#: and bounded, so that a broken page fails instead of hanging.
WAIT = 15.0
#: What a page needs is on 127.0.0.1; everything else is refused before a DNS lookup.
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})
#: The flags every test browser runs with (see docs/console.md and the reference
#: notes on driving Debian's Chromium as root in a container).
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # as root in a container, the sandbox cannot start
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--no-proxy-server",  # loopback traffic never goes through a proxy the environment names
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost",
    "--window-size=1280,800",
)


def browser_missing() -> str | None:
    """Why no browser test can run here, or None when one can."""
    if webdriver is None:
        return "selenium is not installed (pip install -e '.[test]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} is missing (apt-get install {package})"
    return None


def require_browser() -> None:
    """Skip the calling test (or module) without a browser; fail under CI."""
    reason = browser_missing()
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(f"no browser: {reason}")


# --- screenshots -----------------------------------------------------------------------

_screenshots: Path | None = None
_screenshot_lock = threading.Lock()


def screenshot_dir() -> Path:
    """Where this run's screenshots go: ``TIDINGS_SCREENSHOT_DIR``, or a new temp directory."""
    global _screenshots  # noqa: PLW0603 - one directory per test run
    with _screenshot_lock:
        if _screenshots is None:
            chosen = os.environ.get("TIDINGS_SCREENSHOT_DIR")
            if chosen:
                _screenshots = Path(chosen)
                _screenshots.mkdir(parents=True, exist_ok=True)
            else:
                _screenshots = Path(tempfile.mkdtemp(prefix="tidings-screenshots-"))
            print(f"browser screenshots: {_screenshots}", file=sys.stderr)
        return _screenshots


def screenshots_taken() -> Path | None:
    """The screenshot directory, if a test saved anything (for the end-of-run summary)."""
    return _screenshots


# --- the browser -----------------------------------------------------------------------


class Browser:
    """One headless Chromium: a page, waits on its DOM, screenshots and its console."""

    def __init__(self, driver: Any, profile: Path) -> None:
        self.driver = driver
        self.profile = profile

    # navigation and the DOM

    def open(self, url: str) -> None:
        """Load ``url`` (waits for the document, not for its scripts: wait on the DOM after)."""
        self.driver.get(url)

    @property
    def url(self) -> str:
        return str(self.driver.current_url)

    def find(self, css: str) -> Any:
        """The first element matching ``css`` (raises if there is none)."""
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[Any]:
        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def js(self, script: str, *args: Any) -> Any:
        """Run ``script`` in the page (``return ...`` for a value; ``arguments[i]`` for args)."""
        return self.driver.execute_script(script, *args)

    def wait_until(
        self, condition: Callable[[Browser], T], *, timeout: float = WAIT, message: str = ""
    ) -> T:
        """Wait until ``condition(browser)`` is truthy (exceptions count as not yet); its value.

        Raises:
            AssertionError: not within ``timeout``, with ``message``, the page's URL
            and its console errors, and a screenshot saved.
        """
        wait = WebDriverWait(
            self.driver, timeout, poll_frequency=0.05, ignored_exceptions=(WebDriverException,)
        )
        try:
            return wait.until(lambda _driver: condition(self))  # type: ignore[no-any-return]
        except TimeoutException:
            shot = self.screenshot("timeout")
            errors = "; ".join(self.console_errors()) or "none"
            raise AssertionError(
                f"timed out after {timeout} s waiting for {message or condition!r} on {self.url}"
                f" (console errors: {errors}; screenshot {shot})"
            ) from None

    def wait_for(self, css: str, *, visible: bool = True, timeout: float = WAIT) -> Any:
        """The first element matching ``css`` once it exists (and is displayed, by default)."""

        def found(browser: Browser) -> Any:
            element = browser.find(css)
            return element if not visible or element.is_displayed() else None

        return self.wait_until(found, timeout=timeout, message=f"{css} to appear")

    def wait_text(self, css: str, text: str, *, timeout: float = WAIT) -> Any:
        """The first element matching ``css`` whose text contains ``text``, once there is one."""

        def found(browser: Browser) -> Any:
            for element in browser.find_all(css):
                if text in element.text:
                    return element
            return None

        return self.wait_until(found, timeout=timeout, message=f"{css} containing {text!r}")

    def wait_gone(self, css: str, *, timeout: float = WAIT) -> None:
        """Wait until no element matches ``css``."""
        self.wait_until(
            lambda browser: not browser.find_all(css), timeout=timeout, message=f"{css} to go"
        )

    def type_into(self, css: str, text: str, *, clear: bool = True) -> Any:
        element = self.wait_for(css)
        if clear:
            element.clear()
        element.send_keys(text)
        return element

    def click(self, css: str) -> None:
        self.wait_for(css).click()

    # the window

    def viewport(self, width: int, height: int) -> None:
        """Make the page's viewport exactly ``width`` x ``height`` CSS pixels (screenshots too).

        ``--window-size`` sizes the window, of which headless Chromium gives part
        to its (invisible) frame; this sets what the page sees.
        """
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def screenshot(self, name: str) -> Path:
        """Save a PNG of the viewport as ``<name>.png`` in :func:`screenshot_dir`; its path."""
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
        path = screenshot_dir() / f"{safe}.png"
        self.driver.get_screenshot_as_file(str(path))
        return path

    def screenshot_to(self, path: Path) -> Path:
        """Save a PNG of the viewport at ``path`` (for pictures that are kept, e.g. docs)."""
        self.driver.get_screenshot_as_file(str(path))
        return path

    # what the page said and did

    def console_log(self) -> list[dict[str, Any]]:
        """The page's console messages since the last call (level, message, source)."""
        return list(self.driver.get_log("browser"))

    def console_errors(self) -> list[str]:
        """The page's console errors (and failed loads) since the last call."""
        return [entry["message"] for entry in self.console_log() if entry["level"] == "SEVERE"]

    def foreign_requests(self) -> list[str]:
        """URLs this page loaded (or tried to) from anywhere but 127.0.0.1."""
        urls = self.js(
            "return performance.getEntriesByType('resource').map((e) => e.name)"
            ".concat([location.href])"
        )
        return [
            url
            for url in urls
            if urlsplit(url).scheme in ("http", "https", "ws", "wss")
            and urlsplit(url).hostname not in LOCAL_HOSTS
        ]

    def forget_cookies(self) -> None:
        """Log out of everything: the next page starts without cookies."""
        self.driver.delete_all_cookies()

    def quit(self) -> None:
        with suppress(Exception):
            self.driver.quit()
        shutil.rmtree(self.profile, ignore_errors=True)


def start_browser(*, width: int = 1280, height: int = 800) -> Browser:
    """A new headless Chromium with a fresh profile, its viewport ``width`` x ``height``."""
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a driver
    profile = Path(tempfile.mkdtemp(prefix="tidings-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=subprocess.DEVNULL)
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except Exception:
        shutil.rmtree(profile, ignore_errors=True)
        raise
    browser = Browser(driver, profile)
    browser.viewport(width, height)
    return browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the test module (skipped, or failed under CI, without one)."""
    require_browser()
    started = start_browser()
    try:
        yield started
    finally:
        started.quit()


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call a blocking (Selenium) function from a Trio test without stopping Trio meanwhile."""
    return await trio.to_thread.run_sync(
        functools.partial(fn, *args, **kwargs), abandon_on_cancel=True
    )


# --- a real node for the page ------------------------------------------------------------


@attrs.frozen
class ServedNode:
    """A ``tidings serve`` process: where it listens, and its log."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


@contextmanager
def tidings_serve(
    *args: str, env: dict[str, str] | None = None, timeout: float = 20.0
) -> Iterator[ServedNode]:
    """Run ``tidings serve --host 127.0.0.1 --port 0 ARGS`` until the block ends (SIGTERM).

    ``env`` is added to the environment (``TIDINGS_*`` settings). Waits for the
    line the server prints once it listens, and reads the port from it.
    """
    log = Path(tempfile.mkdtemp(prefix="tidings-serve-")) / "stderr.log"
    environment = {**os.environ, **(env or {})}
    environment.pop("TIDINGS_CONFIG", None)
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "tidings", "serve", "--host", "127.0.0.1", "--port", "0",
             "--log-level", "warning", *args],
            env=environment, stdout=subprocess.PIPE, stderr=stderr,
        )  # fmt: skip
    try:
        lines: queue.Queue[str] = queue.Queue()
        assert process.stdout is not None
        stdout = process.stdout

        def read() -> None:  # a thread, so that waiting for the line has a timeout
            for raw in stdout:
                lines.put(raw.decode(errors="replace"))
            lines.put("")

        threading.Thread(target=read, daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"tidings serve did not listen within {timeout} s") from None
            if not line:
                raise AssertionError(f"tidings serve exited: {log.read_text()}")
            if "listening on" in line:
                break
        port = int(urlsplit(line.split("listening on", 1)[1].strip()).port or 0)
        yield ServedNode(process, port, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
