"""The web console in a real browser, against a real ``tidings serve``.

Headless Chromium (``tests/browser.py``) logs in with the API key and looks at
the DOM: a WebSocket client the test connected, with its subscription; an event
published through the API appearing in the live tail; a publish from the form
reaching a WebSocket subscriber; a client disconnected from the console seeing
its close. Each view is saved as a screenshot (the run prints where); the
assertions are on the DOM only, never on pixels or durations.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from .browser import Browser, ServedNode, in_thread, tidings_serve
from .conftest import TEST_TIMEOUT, http_request, receive, subscribe

pytestmark = pytest.mark.slow

KEY = "console-test-key-7c1e"
SESSION_COOKIE = "tidings_console"


@pytest.fixture(scope="module")
def node() -> Iterator[ServedNode]:
    """One node for the module, with an API key, publishing the demo pipeline meanwhile."""
    with tidings_serve("--demo", env={"TIDINGS_API_KEY": KEY}) as served:
        yield served


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


async def api(node: ServedNode, method: str, body: Any = None) -> Any:
    """An API call with the key, as a backend makes it; its answer (must be 200)."""
    status, _headers, content = await http_request(
        node.port,
        "POST",
        f"/api/{method}",
        orjson.dumps(body or {}),
        f"Authorization: apikey {KEY}\r\n",
    )
    assert status == 200, content
    return orjson.loads(content)


@asynccontextmanager
async def subscriber(
    node: ServedNode, topic: str
) -> AsyncIterator[tuple[WebSocketConnection, str]]:
    """A native WebSocket client subscribed to ``topic``, and its client id."""
    async with open_websocket_url(node.ws) as ws:
        await subscribe(ws, topic)
        [entry] = (await api(node, "presence", {"topic": topic}))["clients"]
        yield ws, entry["client"]


@pytest.fixture(autouse=True)
def page_without_errors(browser: Browser) -> Iterator[None]:
    """After each test: the page logged no error and shows none (a failed refresh would)."""
    browser.console_log()  # what earlier tests left
    yield
    errors = [e for e in browser.console_errors() if "/console/login" not in e]
    assert errors == []
    shown = browser.find_all("#status-error")
    assert [element.text for element in shown] in ([], [""])


def log_in(browser: Browser, node: ServedNode, view: str = "overview") -> None:
    """Open the console at ``view``, logging in with the key if the page asks."""
    browser.open(f"{node.http}/console/#{view}")
    state = browser.wait_until(
        lambda b: b.js("return document.body.dataset.state"), message="the page to start"
    )
    if state != "logged-in":
        browser.type_into("#login-key", KEY + "\n")  # Enter submits: the keyboard is enough
        browser.wait_until(
            lambda b: b.js("return document.body.dataset.state") == "logged-in",
            message="the login",
        )
    browser.wait_for(f"#view-{view.split('?', maxsplit=1)[0]}")


async def test_a_wrong_key_is_refused_and_the_key_logs_in(
    browser: Browser, node: ServedNode
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await in_thread(browser.forget_cookies)
        # A person opens the node's address: it leads to the console's login.
        await in_thread(browser.open, f"{node.http}/")
        await in_thread(browser.wait_for, "#login-key")
        assert browser.url == f"{node.http}/console/"
        assert browser.find("#login-key").get_attribute("type") == "password"
        await in_thread(browser.screenshot, "console-login")

        await in_thread(browser.type_into, "#login-key", "not-the-key\n")
        await in_thread(browser.wait_text, "#login-error", "Wrong API key")
        assert browser.js("return document.body.dataset.state") == "logged-out"
        assert browser.find("#view-overview").is_displayed() is False
        assert browser.driver.get_cookie(SESSION_COOKIE) is None

        await in_thread(browser.type_into, "#login-key", KEY + "\n")
        info = await api(node, "info")
        await in_thread(browser.wait_for, f'#nodes-table tr[data-node="{info["node"]}"]')
        assert browser.find("#node-label").text.startswith(f"node {info['node']}")
        cookie = browser.driver.get_cookie(SESSION_COOKIE)
        assert cookie is not None
        assert (cookie["httpOnly"], cookie["sameSite"]) == (True, "Strict")
        # Everything the page loaded came from the node; nothing failed but the wrong login.
        assert browser.foreign_requests() == []
        errors = [e for e in browser.console_errors() if "/console/login" not in e]
        assert errors == []


async def test_the_clients_view_shows_a_websocket_client_with_its_subscription(
    browser: Browser, node: ServedNode
) -> None:
    topic = unique("orders")
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            subscriber(node, topic) as (_ws, client),
            subscriber(node, unique("other")) as (_other, other),
        ):
            await in_thread(log_in, browser, node, "clients")
            row = await in_thread(browser.wait_for, f'#clients-table tr[data-client="{client}"]')
            assert topic in [link.text for link in row.find_elements("css selector", "a.topic")]
            cells = [cell.text for cell in row.find_elements("css selector", "td")]
            assert cells[0] == client
            assert (cells[1], cells[2]) == ("\u2013", "default")  # no user without JWT
            assert cells[4].startswith("127.0.0.1:")
            assert cells[5] == "native /ws"
            await in_thread(browser.screenshot, "console-clients")

            # The filter narrows the list on the node: only the client with that topic.
            await in_thread(browser.type_into, "#clients-filter", topic)
            await in_thread(browser.wait_gone, f'#clients-table tr[data-client="{other}"]')
            await in_thread(browser.wait_text, "#clients-range", "1\u20131 of 1 clients")
            assert [
                r.get_attribute("data-client") for r in browser.find_all("tr[data-client]")
            ] == [client]
            # Its topic links to the topic's live tail.
            browser.find(f'#clients-table tr[data-client="{client}"] a.topic').click()
            await in_thread(browser.wait_for, "#view-tail")
            assert browser.find("#tail-topic").get_attribute("value") == topic
            await in_thread(browser.wait_text, "#presence-list li", client)


async def test_an_event_published_through_the_api_appears_in_the_live_tail(
    browser: Browser, node: ServedNode
) -> None:
    topic = unique("tail")
    with trio.fail_after(TEST_TIMEOUT):
        async with subscriber(node, topic) as (_ws, client):
            await in_thread(log_in, browser, node, f"tail?topic={topic}")
            await in_thread(browser.wait_text, "#tail-status", "No events on this topic yet")
            await in_thread(browser.wait_text, "#presence-list li", client)

            first = await api(node, "publish", {"topic": topic, "payload": {"order": 1}})
            item = await in_thread(browser.wait_for, '#tail-events li[data-seq="1"]')
            assert first["seq"] == 1
            assert '{"order":1}' in item.text
            await api(node, "publish", {"topic": topic, "payload": {"order": 2}})
            await in_thread(browser.wait_for, '#tail-events li[data-seq="2"]')
            # Newest first, each event once, with its seq.
            seqs = [li.get_attribute("data-seq") for li in browser.find_all("#tail-events li")]
            assert seqs == ["2", "1"]
            await in_thread(browser.wait_text, "#tail-status", f"epoch {first['epoch']}")
            await in_thread(browser.screenshot, "console-tail")


async def test_a_publish_from_the_form_reaches_a_websocket_subscriber(
    browser: Browser, node: ServedNode
) -> None:
    topic = unique("form")
    with trio.fail_after(TEST_TIMEOUT):
        async with subscriber(node, topic) as (ws, _client):
            await in_thread(log_in, browser, node, "publish")
            await in_thread(browser.type_into, "#publish-topic", topic)
            # Invalid JSON is refused in the page: nothing is sent.
            await in_thread(browser.type_into, "#publish-payload", '{"broken": ')
            await in_thread(browser.click, "#publish-submit")
            await in_thread(browser.wait_text, "#publish-payload-error", "Not valid JSON")
            assert browser.find("#publish-payload").get_attribute("aria-invalid") == "true"

            await in_thread(
                browser.type_into, "#publish-payload", '{"from": "the console", "n": 1}'
            )
            await in_thread(browser.click, "#publish-submit")
            await in_thread(browser.wait_text, "#publish-result", "seq 1")
            assert browser.find("#publish-payload-error").text == ""
            event = await receive(ws)
            # The first event the subscriber sees is the valid one: the broken one never left.
            assert (event["type"], event["topic"], event["seq"]) == ("event", topic, 1)
            assert event["payload"] == {"from": "the console", "n": 1}
            await in_thread(browser.screenshot, "console-publish")


async def test_disconnecting_a_client_from_the_console_closes_its_connection(
    browser: Browser, node: ServedNode
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with subscriber(node, unique("bye")) as (ws, client):
            await in_thread(log_in, browser, node, "clients")
            await in_thread(browser.type_into, "#clients-filter", client)
            await in_thread(browser.wait_text, "#clients-range", "1\u20131 of 1 clients")
            await in_thread(browser.click, f'button[data-key="disconnect:{client}"]')
            await in_thread(browser.wait_for, "#disconnect-dialog[open]")
            assert client in browser.find("#disconnect-client").text
            await in_thread(browser.screenshot, "console-disconnect")
            await in_thread(browser.click, "#disconnect-confirm")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert (closed.value.reason.code, closed.value.reason.reason) == (
                1000,
                "disconnected from the console",
            )
            await in_thread(browser.wait_gone, f'tr[data-client="{client}"]')
            await in_thread(browser.wait_text, "#clients-range", "of 0 clients")
            assert not browser.find("#disconnect-dialog").get_attribute("open")


async def test_the_topics_and_overview_views_show_the_node(
    browser: Browser, node: ServedNode
) -> None:
    topic = unique("stats")
    with trio.fail_after(TEST_TIMEOUT):
        async with subscriber(node, topic):
            for n in range(3):
                await api(node, "publish", {"topic": topic, "payload": n})
            await in_thread(log_in, browser, node, "topics")
            await in_thread(browser.type_into, "#topics-filter", topic)
            row = await in_thread(browser.wait_for, f'#topics-table tr[data-topic="{topic}"]')
            cells = [cell.text for cell in row.find_elements("css selector", "td")]
            assert (cells[0], cells[1]) == (topic, "default")
            assert (cells[3], cells[4], cells[6]) == ("1", "3", "3")  # subscribers, seq, history
            await in_thread(browser.type_into, "#topics-filter", "")
            await in_thread(browser.wait_for, '#topics-table tr[data-topic="deploys"]')
            await in_thread(browser.screenshot, "console-topics")

            # Sorting is the node's: by seq, descending, the busiest demo topic comes first.
            await in_thread(browser.click, '#topics-table th[data-sort="seq"] button')
            await in_thread(browser.click, '#topics-table th[data-sort="seq"] button')
            header = browser.find('#topics-table th[data-sort="seq"]')
            assert header.get_attribute("aria-sort") == "descending"
            await in_thread(browser.wait_text, "#topics-table tbody tr:first-child", "deploys")

            await in_thread(log_in, browser, node, "overview")
            info = await api(node, "info")
            await in_thread(browser.wait_for, f'#nodes-table tr[data-node="{info["node"]}"]')
            stat = await in_thread(browser.wait_for, '[data-stat="connections"] dd')
            assert int(stat.text.replace(",", "")) >= 1
            await in_thread(browser.wait_for, "#overview-chart svg[role=img]")
            await in_thread(browser.screenshot, "console-overview")


async def test_logging_out_ends_the_session_for_the_api_too(
    browser: Browser, node: ServedNode
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await in_thread(log_in, browser, node, "overview")
        cookie = browser.driver.get_cookie(SESSION_COOKIE)["value"]
        headers = f"Cookie: {SESSION_COOKIE}={cookie}\r\n"
        _, _, content = await http_request(node.port, "GET", "/console/session", b"", headers)
        csrf = orjson.loads(content)["csrf"]
        headers += f"X-CSRF-Token: {csrf}\r\n"
        status, _, _ = await http_request(node.port, "POST", "/api/info", b"{}", headers)
        assert status == 200

        await in_thread(browser.click, "#logout")
        await in_thread(browser.wait_text, "#login-error", "Logged out")
        assert browser.driver.get_cookie(SESSION_COOKIE) is None
        status, _, content = await http_request(node.port, "POST", "/api/info", b"{}", headers)
        assert (status, orjson.loads(content)["error"]["code"]) == (401, "unauthorized")


async def test_the_console_fits_a_narrow_screen_follows_the_dark_theme_and_is_labelled(
    browser: Browser, node: ServedNode
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await in_thread(log_in, browser, node, "clients")
        # Every control has a label a screen reader can say; sorting is by buttons.
        unlabelled = browser.js(
            "return [...document.querySelectorAll('input, select, textarea')]"
            ".filter((e) => e.type !== 'hidden' && !e.labels.length).map((e) => e.id)"
            ".concat([...document.querySelectorAll('button, a[href]')]"
            ".filter((e) => !(e.textContent.trim() || e.getAttribute('aria-label')))"
            ".map((e) => e.outerHTML))"
        )
        assert unlabelled == []
        assert browser.find_all("#clients-table th[data-sort] button")
        # The keyboard moves between views, and focus lands on the new view's heading.
        browser.find('#nav a[data-view="topics"]').send_keys("\n")
        await in_thread(browser.wait_for, "#view-topics")
        await in_thread(
            browser.wait_until,
            lambda b: b.js("return document.activeElement.id") == "topics-title",
            message="focus on the Topics heading",
        )

        light = browser.js("return getComputedStyle(document.body).backgroundColor")
        browser.driver.execute_cdp_cmd(
            "Emulation.setEmulatedMedia",
            {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
        )
        try:
            dark = browser.js("return getComputedStyle(document.body).backgroundColor")
            assert dark != light
            await in_thread(browser.screenshot, "console-topics-dark")
        finally:
            browser.driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})

        browser.viewport(390, 800)
        try:
            async with subscriber(node, unique("narrow")) as (_ws, client):
                await in_thread(log_in, browser, node, "clients")
                await in_thread(browser.type_into, "#clients-filter", client)
                row = await in_thread(browser.wait_for, f'tr[data-client="{client}"]')
                # Each row is a card whose cells say which column they are.
                labels = [
                    cell.get_attribute("data-label")
                    for cell in row.find_elements("css selector", "td")
                ]
                assert labels[:3] == ["Client", "User", "Tenant"]
                # Nothing pushes the page sideways.
                overflow = browser.js(
                    "return document.documentElement.scrollWidth"
                    " - document.documentElement.clientWidth"
                )
                assert overflow <= 0
                await in_thread(browser.screenshot, "console-clients-narrow")
        finally:
            browser.viewport(1280, 800)
