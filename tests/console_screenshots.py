"""Take the screenshots of docs/console.md: ``python -m tests.console_screenshots docs/img``.

Runs ``tidings serve --demo`` with an API key and JWT clients, connects a few
dozen WebSocket clients in three tenants, publishes a varying load for about a
minute so that the chart has something to draw, then saves each view of the
console at 1280x800 (and the clients view in the dark theme and on a narrow
screen). Not a test: the tests (``test_console.py``) assert on the DOM and save
their own screenshots.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import jwt
import orjson
import trio
from trio_websocket import open_websocket_url

from .browser import Browser, ServedNode, browser_missing, in_thread, start_browser, tidings_serve
from .conftest import http_request, subscribe

KEY = "docs-screenshots-key"
SECRET = "docs-screenshots-jwt-secret-0123456789abcdef"
USERS = [
    ("alice", "acme"), ("bob", "acme"), ("carol", "acme"), ("dave", "globex"),
    ("erin", "globex"), ("frank", "initech"), ("grace", "initech"), ("heidi", "acme"),
]  # fmt: skip
#: The publications/s of acme's orders in the topics view (9th column).
RATE_CELL = '#topics-table tr[data-topic="orders"][data-tenant="acme"] td:nth-child(9)'
#: Seconds of load before the screenshots: the chart shows this much.
LOAD_SECONDS = 70


async def api(node: ServedNode, method: str, body: object) -> None:
    await http_request(
        node.port, "POST", f"/api/{method}", orjson.dumps(body), f"Authorization: apikey {KEY}\r\n"
    )


async def client(node: ServedNode, user: str, tenant: str, topics: list[str]) -> None:
    claims = {"sub": user, "tenant": tenant, "exp": int(time.time()) + 3600}
    url = f"{node.ws}?token={jwt.encode(claims, SECRET, algorithm='HS256')}"
    async with open_websocket_url(url) as ws:
        for topic in topics:
            await subscribe(ws, topic)
        while True:
            await ws.get_message()


async def load(node: ServedNode) -> None:
    """A rate that rises and falls, so that the chart is not a flat line."""
    start = trio.current_time()
    while True:
        elapsed = trio.current_time() - start
        burst = int(6 + 5 * math.sin(elapsed / 9))
        for n in range(burst):
            await api(node, "publish", {"topic": "orders", "payload": {"n": n}, "tenant": "acme"})
        await trio.sleep(0.25)


def shoot(browser: Browser, node: ServedNode, directory: Path) -> None:
    base = f"{node.http}/console/"
    browser.open(base)
    browser.wait_for("#login-key")
    browser.type_into("#login-key", "s3cret-key")
    browser.screenshot_to(directory / "console-login.png")
    browser.type_into("#login-key", KEY + "\n")
    browser.wait_until(lambda b: b.js("return document.body.dataset.state") == "logged-in")
    views = [
        ("overview", "#nodes-table tr[data-node]"),
        ("clients", "#clients-table tr[data-client]"),
        ("topics", '#topics-table tr[data-topic="orders"]'),
        ("tail?topic=orders&tenant=acme", "#tail-events li[data-seq]"),
        ("publish", "#publish-topic"),
    ]
    for view, ready in views:
        browser.open(f"{base}#{view}")
        browser.wait_for(ready)
        if view == "publish":
            browser.type_into("#publish-topic", "deploys")
            browser.click("#publish-submit")
            browser.wait_text("#publish-result", "seq")
        if view == "topics":  # publications/s needs two readings
            browser.wait_until(lambda b: b.find(RATE_CELL).text not in ("", "\u2013"))
        name = view.split("?", maxsplit=1)[0]
        browser.wait_until(lambda b: b.find("#status-updated").text.startswith("Updated"))
        browser.screenshot_to(directory / f"console-{name}.png")
    browser.open(f"{base}#clients")
    browser.wait_for("#clients-table tr[data-client]")
    browser.click('button[data-key^="disconnect:"]')
    browser.wait_for("#disconnect-dialog[open]")
    browser.screenshot_to(directory / "console-disconnect.png")
    browser.click("#disconnect-cancel")
    browser.driver.execute_cdp_cmd(
        "Emulation.setEmulatedMedia",
        {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
    )
    browser.open(f"{base}#overview")
    browser.wait_for("#overview-chart polyline")
    browser.screenshot_to(directory / "console-overview-dark.png")
    browser.driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    browser.viewport(390, 800)
    browser.open(f"{base}#clients")
    browser.wait_for("#clients-table tr[data-client]")
    browser.screenshot_to(directory / "console-clients-narrow.png")


async def main(directory: Path) -> None:
    env = {"TIDINGS_API_KEY": KEY, "TIDINGS_JWT_SECRET": SECRET, "TIDINGS_NODE_ID": "node-a"}
    with tidings_serve("--demo", env=env) as node:
        async with trio.open_nursery() as nursery:
            for n in range(36):
                user, tenant = USERS[n % len(USERS)]
                topics = ["orders", "deploys", "functions"][: 1 + n % 3]
                nursery.start_soon(client, node, user, tenant, topics)
            nursery.start_soon(load, node)
            await trio.sleep(LOAD_SECONDS)  # a script, not a test: the chart needs time to fill
            browser = await in_thread(start_browser)
            try:
                await in_thread(shoot, browser, node, directory)
            finally:
                await in_thread(browser.quit)
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    missing = browser_missing()
    if missing:
        sys.exit(f"no browser: {missing}")
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img")
    target.mkdir(parents=True, exist_ok=True)
    trio.run(main, target)
    print(f"screenshots in {target}")
