"""What an operator sees: ``GET /metrics`` after real traffic, and the structured logs.

Metrics are read with prometheus-client's own parser, so a scrape that a
Prometheus server could not read fails here too. Log records are captured
from the ``tidings`` loggers as they are emitted and rendered with the JSON
formatter ``tidings serve --log-format json`` installs; a subprocess test
checks that command end to end.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import h11
import jwt
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from tidings import OverflowPolicy, Server
from tidings.logs import JsonFormatter

from .conftest import (
    TEST_TIMEOUT,
    Disconnects,
    call,
    http_request,
    raw_client,
    receive,
    running_server,
    send,
    subscribe,
    ws_client,
)

API_KEY = "metrics-test-key"
TOKEN = "static-token-for-the-tests"
JWT_SECRET = "a-test-secret-long-enough-for-hs256-0123456789"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
BIG = {"blob": "x" * 32_000}


# --- helpers -------------------------------------------------------------------------------


class Metrics:
    """One scrape of ``/metrics``, parsed by prometheus-client."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.families: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.families[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        """The value of one sample; a KeyError if the scrape does not have it."""
        return self.samples[(name, frozenset(labels.items()))]

    def labelled(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: value for (sample, labels), value in self.samples.items() if sample == name}

    def histogram(self, name: str) -> tuple[dict[str, float], float, float]:
        """Cumulative buckets by ``le``, the count and the sum of a histogram."""
        assert self.families[name] == "histogram", self.families
        buckets = {
            dict(labels)["le"]: value for labels, value in self.labelled(f"{name}_bucket").items()
        }
        count, total = self(f"{name}_count"), self(f"{name}_sum")
        values = list(buckets.values())
        assert values == sorted(values), "buckets are cumulative"
        assert buckets["+Inf"] == count
        return buckets, count, total


async def scrape(server: Server) -> Metrics:
    status, headers, body = await http_request(server.port, "GET", "/metrics")
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return Metrics(body.decode())


class LogWatch(logging.Handler):
    """Keeps the ``tidings`` log records and lets a test wait for one by its ``event``."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._changed.set()
        self._changed = trio.Event()

    def events(self, name: str) -> list[logging.LogRecord]:
        return [r for r in self.records if getattr(r, "event", None) == name]

    async def wait_for(self, name: str, count: int = 1) -> list[logging.LogRecord]:
        while len(self.events(name)) < count:
            await self._changed.wait()
        return self.events(name)


@pytest.fixture
def logs() -> Iterator[LogWatch]:
    logger = logging.getLogger("tidings")
    watch = LogWatch()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(watch)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)


def as_json(record: logging.LogRecord) -> dict[str, Any]:
    """The line ``--log-format json`` writes for a record, parsed back."""
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert isinstance(entry, dict)
    assert RFC3339.match(entry["time"]), entry
    assert entry["level"] == record.levelname.lower()
    assert entry["logger"] == record.name
    assert entry["message"] == record.getMessage()
    return entry


async def stall_until_dropping(server: Server) -> Any:
    """A client that subscribes to ``t`` and never reads again; publish until it drops."""
    stalled = await raw_client(server, receive_buffer=4096)
    await stalled.send_json({"type": "subscribe", "topic": "t", "requestId": "s"})
    assert (await stalled.receive_json())["type"] == "response"
    while server.statistics().dropped == 0:
        await server.publish("t", BIG)
    return stalled


# --- metrics ---------------------------------------------------------------------------------


async def test_metrics_count_connections_subscriptions_and_events_of_real_traffic() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=API_KEY) as server:
            before = await scrape(server)
            for gauge in ("tidings_connections", "tidings_subscriptions", "tidings_topics"):
                assert before.families[gauge] == "gauge"
                assert before(gauge) == 0
            assert before("tidings_events_published_total") == 0
            assert before("tidings_events_delivered_total") == 0
            assert before("tidings_events_dropped_total", reason="overflow") == 0
            assert before("tidings_broker_inbox_depth") == 0
            _, flushes_before, _ = before.histogram("tidings_write_delay_seconds")
            assert before.labelled("tidings_disconnects_total") == {}

            disconnects = Disconnects(server)
            async with ws_client(server) as a, ws_client(server) as b, ws_client(server) as pub:
                await subscribe(a, "t")
                await subscribe(b, "t")
                await subscribe(b, "u")
                for n in range(5):  # over the HTTP API
                    status, _, _ = await http_request(
                        server.port,
                        "POST",
                        "/api/publish",
                        f'{{"topic": "t", "payload": {n}}}'.encode(),
                        f"Authorization: apikey {API_KEY}\r\n",
                    )
                    assert status == 200
                for n in range(5, 7):  # and by a WebSocket client
                    reply = await call(
                        pub, {"type": "publish", "topic": "t", "payload": n, "requestId": n}
                    )
                    assert reply["payload"]["status"] == "published"
                for ws in (a, b):
                    assert [(await receive(ws))["payload"] for _ in range(7)] == list(range(7))

                during = await scrape(server)
                assert during("tidings_connections") == 3
                assert during("tidings_subscriptions") == 3
                assert during("tidings_topics") == 2
                assert during("tidings_events_published_total") == 7
                assert during("tidings_events_delivered_total") == 14
                assert during("tidings_events_dropped_total", reason="overflow") == 0
                _, flushes, seconds = during.histogram("tidings_write_delay_seconds")
                assert flushes > flushes_before  # the writes of those events were timed
                assert seconds >= 0

            await disconnects.wait(3)
            after = await scrape(server)
            assert after("tidings_connections") == 0
            assert after("tidings_subscriptions") == 0
            assert after("tidings_events_published_total") == 7  # counters never go back
            # Closed by the clients themselves: counted under the code, not their reason.
            assert after("tidings_disconnects_total", code="1000", reason="by client") == 3


async def test_metrics_count_dropped_events_and_sample_the_outbox_depth(logs: LogWatch) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(
            outbox_size=8, write_timeout=30, ping_interval=0.2, read_timeout=30
        ) as server:
            stalled = await stall_until_dropping(server)
            [stalled_client] = server.clients()
            # The heartbeat samples the outbox depth, then reports the drops in one line.
            [overflow] = await logs.wait_for("overflow")
            metrics = await scrape(server)
            dropped = metrics("tidings_events_dropped_total", reason="overflow")
            assert dropped >= 1
            assert dropped == server.statistics().dropped
            published = metrics("tidings_events_published_total")
            # One subscriber: every event was either queued for it or dropped.
            assert metrics("tidings_events_delivered_total") + dropped == published

            buckets, samples, depth_sum = metrics.histogram("tidings_outbox_depth")
            assert samples >= 1
            assert depth_sum >= 8  # the full outbox (8) was sampled at least once
            assert buckets["4"] < buckets["+Inf"]

            assert overflow.levelname == "WARNING"
            entry = as_json(overflow)
            assert entry["event"] == "overflow"
            assert entry["client"] == stalled_client.id
            assert 1 <= entry["dropped"] <= dropped
            assert stalled_client.id in entry["message"]
            await stalled.aclose()


async def test_metrics_count_disconnects_by_code_and_reason_and_log_each(logs: LogWatch) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(
            outbox_size=8,
            overflow_policy=OverflowPolicy.DISCONNECT,
            write_timeout=30,
            close_timeout=0.2,
            rate_limit=2,
            rate_period=60,
            rate_limit_violations=2,
        ) as server:
            disconnects = Disconnects(server)
            # 1008: a subscriber that stopped reading, under the disconnect policy.
            stalled = await stall_until_dropping(server)
            assert await stalled.receive_close() == 1008
            await disconnects.wait(1)
            await stalled.aclose()

            # 4000: closed by the application.
            async with ws_client(server) as kicked:
                await call(kicked, {"type": "ping", "requestId": "p"})
                [info] = server.clients()
                assert server.disconnect(info.id, 4000, "kicked")
                with pytest.raises(ConnectionClosed) as closed:
                    await kicked.get_message()
                assert closed.value.reason.code == 4000
            await disconnects.wait(2)

            # 4029: over its rate limit twice (2 messages per minute, closed at the 2nd excess).
            async with ws_client(server) as flooder:
                for n in range(4):
                    await send(flooder, {"type": "ping", "requestId": n})
                assert (await receive(flooder))["type"] == "pong"
                assert (await receive(flooder))["type"] == "pong"
                refused = await receive(flooder)
                assert (refused["type"], refused["payload"]["code"]) == ("error", "rate_limited")
                with pytest.raises(ConnectionClosed) as closed:
                    await flooder.get_message()
                assert closed.value.reason.code == 4029
            await disconnects.wait(3)

            # 1000: the client leaves.
            async with ws_client(server) as leaving:
                await call(leaving, {"type": "ping", "requestId": "bye"})
            await disconnects.wait(4)
            # A client's own code and reason do not become labels: no series per client whim.
            async with ws_client(server) as odd:
                await call(odd, {"type": "ping", "requestId": "odd"})
                await odd.aclose(code=4321, reason="my own reason 8f2c")
            await disconnects.wait(5)

            metrics = await scrape(server)
            by_reason = {
                (dict(labels)["code"], dict(labels)["reason"]): value
                for labels, value in metrics.labelled("tidings_disconnects_total").items()
            }
            assert by_reason == {
                ("1008", "outbox overflow"): 1,
                ("4000", "kicked"): 1,
                ("4029", "rate limited"): 1,
                ("1000", "by client"): 1,
                ("0", "by client"): 1,
            }
            assert metrics("tidings_rate_limited_messages_total") == 2
            assert metrics("tidings_events_dropped_total", reason="overflow") >= 1
            assert metrics("tidings_connections") == 0

            lines = [as_json(record) for record in logs.events("disconnect")]
            assert [(e["code"], e["reason"], e["by"]) for e in lines] == [
                (1008, "outbox overflow", "server"),
                (4000, "kicked", "server"),
                (4029, "rate limited", "server"),
                (1000, "", "client"),
                (4321, "my own reason 8f2c", "client"),  # the log line tells it as it was
            ]
            for entry in lines:
                assert isinstance(entry["duration"], float | int)
                assert entry["duration"] >= 0
                assert entry["client"] in entry["message"]
            assert lines[0]["dropped"] >= 1
            assert lines[-1]["dropped"] == 0
            connects = logs.events("connect")
            assert [getattr(r, "client", None) for r in connects] == [e["client"] for e in lines]


async def test_auth_failures_are_counted_and_logged_with_the_reason(logs: LogWatch) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(token=TOKEN) as server:
            assert (await scrape(server))("tidings_auth_failures_total") == 0
            with pytest.raises(ConnectionRejected) as missing:
                async with open_websocket_url(server.url):
                    pass
            assert missing.value.status_code == 401
            with pytest.raises(ConnectionRejected) as wrong:
                async with open_websocket_url(server.url + "?token=not-the-token"):
                    pass
            assert wrong.value.status_code == 401
            assert (await scrape(server))("tidings_auth_failures_total") == 2

            headers = [(b"authorization", f"Bearer {TOKEN}".encode())]
            async with open_websocket_url(server.url, extra_headers=headers) as ws:
                await subscribe(ws, "t")
                # A refresh with a bad token is refused and counted too; the connection stays.
                reply = await call(
                    ws, {"type": "refresh", "payload": {"token": "forged"}, "requestId": "r"}
                )
                assert (reply["type"], reply["payload"]["code"]) == ("error", "unauthorized")
                assert (await scrape(server))("tidings_auth_failures_total") == 3
                assert (await call(ws, {"type": "ping", "requestId": "p"}))["type"] == "pong"

            failures = [as_json(record) for record in logs.events("auth_failure")]
            assert len(failures) == 3  # two upgrades and the refresh
            assert [f["level"] for f in failures] == ["warning", "warning", "warning"]
            assert "token is required" in failures[0]["reason"]
            assert failures[1]["reason"] == "invalid token"
            assert failures[2]["reason"] == "invalid token" and failures[2]["client"]
            for entry in failures:
                assert entry["remote"].startswith("127.0.0.1:")
                assert entry["reason"] in entry["message"]
            assert len(logs.events("connect")) == 1  # only the client with the token got in


async def test_connect_and_disconnect_lines_name_the_client_user_tenant_and_duration(
    logs: LogWatch,
) -> None:
    token = jwt.encode(
        {"sub": "alice", "tenant": "acme", "exp": int(time.time()) + 600},
        JWT_SECRET,
        algorithm="HS256",
    )
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(jwt_secret=JWT_SECRET) as server:
            disconnects = Disconnects(server)
            headers = [(b"authorization", f"Bearer {token}".encode())]
            async with open_websocket_url(server.url, extra_headers=headers) as ws:
                await subscribe(ws, "t")
                [info] = server.clients()
            await disconnects.wait()

            [connect] = [as_json(r) for r in logs.events("connect")]
            assert connect["level"] == "info"
            assert connect["logger"] == "tidings.server"
            assert (connect["client"], connect["user"], connect["tenant"]) == (
                info.id,
                "alice",
                "acme",
            )
            assert connect["remote"] == info.remote
            assert info.id in connect["message"]

            [disconnect] = [as_json(r) for r in logs.events("disconnect")]
            assert disconnect["client"] == info.id
            assert (disconnect["code"], disconnect["reason"], disconnect["by"]) == (
                1000,
                "",
                "client",
            )
            assert isinstance(disconnect["duration"], float | int)
            assert disconnect["duration"] >= 0
            assert disconnect["dropped"] == 0


# --- the HTTP side of /metrics ----------------------------------------------------------------


async def test_head_of_metrics_and_health_keeps_the_connection_usable() -> None:
    """HEAD answers the headers of GET, no body, and the next request on the connection works."""
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            client = h11.Connection(h11.CLIENT)
            host = f"127.0.0.1:{server.port}"
            answers: list[tuple[int, dict[bytes, bytes], bytes]] = []
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:  # one connection for the three requests
                for method, target in [
                    ("HEAD", "/metrics"),
                    ("HEAD", "/health"),
                    ("GET", "/health"),
                ]:
                    if answers:
                        client.start_next_cycle()
                    request = h11.Request(method=method, target=target, headers=[("Host", host)])
                    await stream.send_all(client.send(request) + client.send(h11.EndOfMessage()))
                    answers.append(await _read_response(stream, client))
            (metrics_status, metrics_headers, metrics_body), head, get = answers
            assert metrics_status == 200
            assert metrics_headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
            assert int(metrics_headers[b"content-length"]) > 0
            assert metrics_body == b""
            assert head[0] == get[0] == 200
            assert head[2] == b""
            assert int(head[1][b"content-length"]) > 0  # what GET would send (uptime varies)
            assert json.loads(get[2])["status"] == "ok"


async def _read_response(
    stream: trio.SocketStream, client: h11.Connection
) -> tuple[int, dict[bytes, bytes], bytes]:
    status, headers, body = 0, {}, b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            assert data, "the server closed the connection"
            client.receive_data(data)
        elif isinstance(event, h11.Response):
            status, headers = event.status_code, dict(event.headers)
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, headers, body
        else:
            raise AssertionError(f"unexpected {event!r}")


async def test_metrics_can_be_turned_off() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(metrics=False) as server:
            status, _, body = await http_request(server.port, "GET", "/metrics")
            assert status == 404
            assert json.loads(body)["error"]["code"] == "not_found"


# --- tidings serve --log-format json ----------------------------------------------------------


@pytest.mark.slow
async def test_serve_with_log_format_json_writes_one_json_object_per_line() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tidings", "serve", "--port", "0", "--token", TOKEN,
             "--log-format", "json", "--log-level", "info"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert process.stdout is not None
        assert process.stderr is not None
        stderr = bytearray()
        try:
            # The banner is a log line too, and nothing goes to stdout.
            while b'"event":"listening"' not in stderr or not stderr.endswith(b"\n"):
                chunk = await process.stderr.receive_some(65536)
                assert chunk, f"tidings serve ended: {stderr.decode(errors='replace')}"
                stderr.extend(chunk)
            banner = next(
                json.loads(line) for line in stderr.decode().splitlines() if '"listening"' in line
            )
            url = banner["url"]
            assert banner["auth"] == "token"
            assert banner["websocket"] == {"/ws": "native", "/connection/websocket": "centrifugo"}
            assert (banner["api"], banner["backplane"]) == (False, "memory")

            headers = [(b"authorization", f"Bearer {TOKEN}".encode())]
            async with open_websocket_url(url, extra_headers=headers) as ws:
                await subscribe(ws, "t")
            with pytest.raises(ConnectionRejected):
                async with open_websocket_url(url):
                    pass
            process.send_signal(signal.SIGTERM)
            while chunk := await process.stderr.receive_some(65536):
                stderr.extend(chunk)
            assert await process.wait() == 0
            assert await process.stdout.receive_some(65536) == b""
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

        lines = [line for line in stderr.decode().splitlines() if line.strip()]
        entries = [json.loads(line) for line in lines]  # every line is one JSON object
        for entry in entries:
            assert {"time", "level", "logger", "message"} <= set(entry), entry
            assert RFC3339.match(entry["time"])
        by_event = {entry.get("event"): entry for entry in entries}
        connect, disconnect, failure = (
            by_event["connect"],
            by_event["disconnect"],
            by_event["auth_failure"],
        )
        assert (connect["level"], connect["tenant"], connect["user"]) == ("info", "default", None)
        assert disconnect["client"] == connect["client"]
        assert (disconnect["code"], disconnect["reason"], disconnect["by"]) == (1000, "", "client")
        assert disconnect["duration"] >= 0
        assert failure["level"] == "warning"
        assert "token is required" in failure["reason"]
