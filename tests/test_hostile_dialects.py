"""Hostile input to every dialect: always an error frame or a close, never a crash.

Random frames (a fixed seed, so a failure reproduces) go to the native, the
Centrifugo and an application (JsonDialect) endpoint; the server must log no
error or traceback, and keep serving a well-behaved client afterwards.
"""

from __future__ import annotations

import logging
import random
import string
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from tidings import Endpoint
from tidings.protocol.json_dialect import JsonDialect

from .conftest import TEST_TIMEOUT, running_server, subscribe, ws_client

METHODS = ["connect", "subscribe", "publish", "history", "presence", "rpc", "refresh", "send"]
VALUES: list[Any] = [None, {}, [], "s", 1, -1, 1.5, True, "\x00", "x" * 300, 10**18]


def junk(rng: random.Random) -> str:
    def value() -> Any:
        return rng.choice(VALUES)

    shapes = [
        lambda: "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 40))),
        lambda: "[" * rng.randint(1, 3000),
        lambda: "\n".join(["{}", "", "[1]", '{"id":1}', "null", "{"][: rng.randint(1, 6)]),
        lambda: '{"id": 123456789012345678901234567890, "connect": {}}',
        lambda: rng.choice(["[]", "[1, 2]", '[{"type": "x"}]', "1", '"s"', "null", "true"]),
        lambda: orjson.dumps(
            {
                "id": value(),
                rng.choice([*METHODS, "x"]): rng.choice(
                    [
                        value(),
                        {
                            "channel": value(),
                            "data": value(),
                            "limit": value(),
                            "since": rng.choice([value(), {"offset": value(), "epoch": value()}]),
                            "offset": value(),
                            "recover": value(),
                            "token": value(),
                            "method": value(),
                        },
                    ]
                ),
            }
        ).decode(),
        lambda: orjson.dumps(
            {
                "type": rng.choice(["subscribe", "publish", "request", "ack", "presence", "x"]),
                "topic": value(),
                "payload": rng.choice([value(), {"since": value(), "epoch": value()}]),
                "requestId": value(),
            }
        ).decode(),
    ]
    return str(rng.choice(shapes)())


@pytest.mark.slow
async def test_random_frames_never_crash_any_dialect(caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(20261122)
    app = Endpoint("/app", JsonDialect("app"))
    with trio.fail_after(TEST_TIMEOUT * 3):
        async with running_server(endpoints=[app]) as server:
            with caplog.at_level(logging.WARNING):
                for path in ("/ws", "/connection/websocket", "/app"):
                    for _ in range(40):
                        try:
                            url = f"ws://127.0.0.1:{server.port}{path}"
                            async with open_websocket_url(url) as ws:
                                for _ in range(rng.randint(1, 6)):
                                    await ws.send_message(junk(rng))
                                with trio.move_on_after(0.02):
                                    while True:
                                        await ws.get_message()
                        except ConnectionClosed:
                            pass  # closing on bad input is an answer too
            failures = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
            assert not failures, [r.getMessage() for r in failures]
            async with ws_client(server) as ws:  # and it still serves
                await subscribe(ws, "after")
