"""Streams, compression and centrifuge-js in a real browser, against a real ``tidings serve``.

Headless Chromium (``tests/browser.py``) opens pages (``tests/web/``) served from
another origin by the test (``tests/pages.py``); they reach the node through a
proxy the test switches off and on (``tests/tcpproxy.py``), as a network that
fails. What the pages show is asserted on their DOM; each test saves a
screenshot (the run prints where). No sleep waits for anything: every wait
is on the DOM or an event, with a timeout.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
import trio
from trio_websocket import open_websocket_url

from .browser import Browser, ServedNode, in_thread, tidings_serve
from .conftest import http_request, receive, subscribe
from .pages import page_server
from .tcpproxy import switching_proxy

pytestmark = pytest.mark.slow

KEY = "browser-streams-key"
WEB = Path(__file__).resolve().parent / "web"
CENTRIFUGE_JS = Path(__file__).resolve().parent / "node/node_modules/centrifuge/dist/centrifuge.js"
#: One whole scenario, with its reconnects.
SCENARIO = 90
HTML = "text/html; charset=utf-8"


@pytest.fixture(scope="module")
def node() -> Iterator[ServedNode]:
    """A node with an API key (the test publishes through it) and a quick reconnect."""
    env = {"TIDINGS_API_KEY": KEY, "TIDINGS_SSE_RETRY": "150ms"}
    with tidings_serve(env=env) as served:
        yield served


def files() -> dict[str, tuple[str, bytes]]:
    pages = {f"/{page.name}": (HTML, page.read_bytes()) for page in WEB.glob("*.html")}
    if CENTRIFUGE_JS.exists():
        pages["/centrifuge.js"] = ("text/javascript; charset=utf-8", CENTRIFUGE_JS.read_bytes())
    return pages


async def publish(node: ServedNode, topic: str, payload: Any) -> int:
    """Publish through the node's HTTP API, as a backend would; the event's seq."""
    body = orjson.dumps({"topic": topic, "payload": payload})
    status, _, content = await http_request(
        node.port, "POST", "/api/publish", body, f"Authorization: apikey {KEY}\r\n"
    )
    assert status == 200, content
    return int(orjson.loads(content)["seq"])


def texts(browser: Browser, css: str) -> list[str]:
    return list(
        browser.js(f"return [...document.querySelectorAll({css!r})].map(e => e.textContent)")
    )


def opens(browser: Browser) -> int:
    """How many times the page's EventSource opened."""
    return int(browser.js("return +document.body.dataset.opens"))


def text(browser: Browser, css: str) -> str:
    return str(browser.js(f"return document.querySelector({css!r}).textContent"))


async def wait(browser: Browser, condition: Callable[[Browser], Any], message: str) -> Any:
    return await in_thread(browser.wait_until, condition, message=message)


class Publisher:
    """Publishes to topics in turn while a test cuts the network; counts what it sent."""

    def __init__(self, node: ServedNode, topics: list[str]) -> None:
        self.node = node
        self.topics = topics
        self.sent: dict[str, int] = dict.fromkeys(topics, 0)
        """The seq of the last event published to each topic."""
        self.total = 0
        self._waiters: list[tuple[int, trio.Event]] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            topic = self.topics[self.total % len(self.topics)]
            self.sent[topic] = await publish(self.node, topic, {"n": self.total})
            self.total += 1
            for target, event in self._waiters:
                if self.total >= target:
                    event.set()
            # The pace of the load, not a wait for anything: a few events per cut.
            await trio.sleep(0.02)

    async def more(self, count: int) -> None:
        """Return once ``count`` more events have been published."""
        event = trio.Event()
        self._waiters.append((self.total + count, event))
        await event.wait()


async def test_eventsource_sees_every_event_once_in_order_across_network_cuts(
    browser: Browser, node: ServedNode
) -> None:
    """Three topics, one stream; the network fails three times, twice while
    events are published. The browser's own reconnect, with its Last-Event-ID,
    resumes every topic: each event is on the page once, in order, and nothing
    is reset. Topic c has no event before the first cut: the id the stream
    starts with (no data, no event) is what resumes it."""
    run = secrets.token_hex(3)
    a, b, c = (f"{name}-{run}" for name in "abc")
    with trio.fail_after(SCENARIO):
        for n in range(3):
            await publish(node, a, {"n": n})
            await publish(node, b, {"n": n})
        async with switching_proxy(node.port) as proxy, page_server(files()) as pages:
            stream = (
                f"http://127.0.0.1:{proxy.port}/sse?topic={a}&since=0&topic={b}&since=0&topic={c}"
            )
            await in_thread(browser.open, pages.url("/sse.html") + "?stream=" + quote(stream))
            await wait(browser, lambda br: len(texts(br, "#events li")) == 6, "the replay")
            assert texts(browser, "#events li")[-1] == f"{b} 3"
            # The first cut: before anything of c, and while nothing is published.
            proxy.cut()
            await wait(browser, lambda br: text(br, "#state") == "reconnecting", "the first cut")
            assert [await publish(node, topic, {"n": -1}) for topic in (c, a)] == [1, 4]
            proxy.restore()
            await wait(browser, lambda br: opens(br) == 2, "the first reconnect")
            publisher = Publisher(node, [a, b, c])
            async with trio.open_nursery() as nursery:
                await nursery.start(publisher.run)
                for opened in (3, 4):
                    await publisher.more(3)
                    proxy.cut()
                    await wait(browser, lambda br: text(br, "#state") == "reconnecting", "a cut")
                    await publisher.more(6)  # published while the page cannot hear
                    proxy.restore()
                    await wait(browser, lambda br, n=opened: opens(br) == n, f"open {opened}")
                await publisher.more(3)
                nursery.cancel_scope.cancel()
            expected = 8 + publisher.total
            await wait(browser, lambda br: len(texts(br, "#events li")) == expected, "every event")
            await in_thread(browser.screenshot, "eventsource-after-three-cuts")
            seen = texts(browser, "#events li")
            for topic in (a, b, c):
                seqs = [int(item.split()[1]) for item in seen if item.split()[0] == topic]
                assert seqs == list(range(1, publisher.sent[topic] + 1)), topic
            assert texts(browser, "#resets li") == []
            # The reconnects were the browser's own, each with the id it had last seen.
            streams = [i for i, head in enumerate(proxy.requests) if head.startswith(b"GET /sse")]
            assert len(streams) >= 4
            resumed = [proxy.headers_of(i).get("last-event-id") for i in streams[1:]]
            assert all(resumed) and len(set(resumed)) == len(resumed)
            assert browser.foreign_requests() == []


async def test_a_plain_websocket_negotiates_compression_and_the_wire_carries_less(
    browser: Browser, node: ServedNode
) -> None:
    """Chromium offers permessage-deflate; the node accepts without context
    takeover. A 20 KB event crosses the wire compressed, and so does what the
    page publishes back: a subscriber without compression gets it intact."""
    run = secrets.token_hex(3)
    topic, echo = f"logs-{run}", f"echo-{run}"
    lines = [
        f"step {i}: pulled layer sha256:{i * 7919:016x} in {i % 13}.{i % 7}s" for i in range(400)
    ]
    payload = {"log": "".join(line + "\n" for line in lines)}
    size = len(orjson.dumps(payload))
    with trio.fail_after(SCENARIO):
        async with (
            switching_proxy(node.port) as proxy,
            page_server(files()) as pages,
            open_websocket_url(node.ws) as listener,
        ):
            await subscribe(listener, echo)
            ws = f"ws://127.0.0.1:{proxy.port}/ws"
            await in_thread(
                browser.open,
                pages.url("/websocket.html") + f"?ws={quote(ws)}&topic={topic}&echo={echo}",
            )
            await wait(browser, lambda br: text(br, "#subscribed") == "yes", "the subscription")
            extensions = text(browser, "#extensions")
            assert extensions.startswith("permessage-deflate")
            assert "server_no_context_takeover" in extensions
            assert "client_no_context_takeover" in extensions
            before = proxy.to_client, proxy.to_server
            await publish(node, topic, payload)
            await wait(browser, lambda br: text(br, "#echoed") == "published", "the echo")
            assert text(browser, "#received") == f"{len(payload['log'])} characters, 400 lines"
            event = await receive(listener)
            assert (event["topic"], event["payload"]) == (echo, payload)
            sent_down = proxy.to_client - before[0]
            sent_up = proxy.to_server - before[1]
            assert sent_down < size / 2, (sent_down, size)  # the event, compressed
            assert sent_up < size / 2, (sent_up, size)  # the browser's publish, compressed
            await in_thread(browser.screenshot, "websocket-compressed")


async def test_the_centrifuge_js_browser_build_connects_and_recovers(
    browser: Browser, node: ServedNode
) -> None:
    if not CENTRIFUGE_JS.exists():
        missing = "tests/node has no centrifuge build: run npm ci there"
        if os.environ.get("TIDINGS_REQUIRE_NODE") == "1":
            pytest.fail(f"TIDINGS_REQUIRE_NODE=1 but {missing}", pytrace=False)
        pytest.skip(missing)
    channel = f"news-{secrets.token_hex(3)}"
    with trio.fail_after(SCENARIO):
        async with switching_proxy(node.port) as proxy, page_server(files()) as pages:
            ws = f"ws://127.0.0.1:{proxy.port}/connection/websocket"
            await in_thread(
                browser.open, pages.url("/centrifuge.html") + f"?ws={quote(ws)}&channel={channel}"
            )
            await wait(browser, lambda br: len(texts(br, "#subscribed li")) == 1, "subscribed")
            for n in range(3):
                await publish(node, channel, {"n": n})
            await wait(browser, lambda br: len(texts(br, "#publications li")) == 3, "3 events")
            proxy.cut()
            await wait(browser, lambda br: text(br, "#client") == "connecting", "the cut")
            for n in range(3, 6):
                await publish(node, channel, {"n": n})
            proxy.restore()
            await wait(browser, lambda br: len(texts(br, "#publications li")) == 6, "recovery")
            await in_thread(browser.screenshot, "centrifuge-js-recovered")
            assert texts(browser, "#publications li") == [f"{n + 1} {n}" for n in range(6)]
            assert texts(browser, "#subscribed li") == [
                "wasRecovering=false recovered=false",
                "wasRecovering=true recovered=true",
            ]
