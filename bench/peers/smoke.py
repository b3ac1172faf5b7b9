"""Smoke test of the benchmark peer hubs: protocol, fan-out order, drops, /health, SIGTERM.

For each peer it:

* starts it on a free 127.0.0.1 port and waits for its ``listening on`` line;
* connects 3 subscribers and 1 publisher (trio-websocket, i.e. wsproto: a
  client independent of every peer's own library), checks the ``subscribed``
  responses and ``GET /health`` (4 connections);
* publishes 100 events and checks every subscriber got seq 1..100 in order,
  payloads intact, frames shaped the way ``bench/loadgen.py`` scans them, and
  the publisher 100 ``published`` answers;
* checks a late ``subscribe`` reports seq 100, ``unsubscribe``, error replies;
* slow consumer: one subscriber stops reading while 2000 events of 32 KiB are
  published; the reading subscriber must still get every one in order, the
  stalled one must see a gap (its queue was full, the hub dropped, not blocked);
* sends SIGTERM with connections open and expects exit status 0.

Usage: ``python bench/peers/smoke.py [PEER ...]`` with PEER among
websockets, websockets-queue, ws, gorilla (default: all). Run ``setup.sh`` first.
Every wait is bounded; exits 1 if any peer fails.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"

PEERS: dict[str, list[str]] = {
    "websockets": [sys.executable, str(HERE / "websockets_hub.py")],
    "websockets-queue": [sys.executable, str(HERE / "websockets_hub.py"), "--mode", "queue"],
    "ws": ["node", str(HERE / "ws_hub.js")],
    "gorilla": [str(HERE / "gorilla_hub" / "gorilla_hub")],
}

N_EVENTS = 100
SLOW_EVENTS = 2000
SLOW_PAD = 32 * 1024
STEP_TIMEOUT = 10.0  # any single wait
PEER_TIMEOUT = 120.0  # the whole run for one peer


class SmokeError(AssertionError):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise SmokeError(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


async def recv_json(ws: WebSocketConnection) -> tuple[str, dict[str, Any]]:
    with trio.fail_after(STEP_TIMEOUT):
        raw = await ws.get_message()
    check(isinstance(raw, str), f"expected a text frame, got {type(raw).__name__}")
    assert isinstance(raw, str)
    return raw, json.loads(raw)


async def request(ws: WebSocketConnection, msg: dict[str, Any]) -> dict[str, Any]:
    await ws.send_message(json.dumps(msg, separators=(",", ":")))
    raw, reply = await recv_json(ws)
    check(raw.startswith('{"type":"'), f"reply not compact JSON: {raw[:80]}")
    return reply


async def subscribe(ws: WebSocketConnection, topic: str, rid: int, seq: int) -> None:
    reply = await request(ws, {"type": "subscribe", "topic": topic, "requestId": rid})
    want = {
        "type": "response",
        "topic": topic,
        "requestId": rid,
        "payload": {"status": "subscribed", "topic": topic, "seq": seq},
    }
    check(reply == want, f"subscribe reply {reply!r}, want {want!r}")


async def health(port: int) -> dict[str, Any]:
    with trio.fail_after(STEP_TIMEOUT):
        stream = await trio.open_tcp_stream(HOST, port)
        async with stream:
            await stream.send_all(
                f"GET /health HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    check(b" 200 " in status + b" ", f"/health status line {status!r}")
    check(b"application/json" in head.lower(), f"/health content type: {head!r}")
    answer: dict[str, Any] = json.loads(body)
    return answer


def payload_for(i: int) -> dict[str, Any]:
    # "t" first, as the load generator does; then awkward JSON to pass through unchanged
    return {
        "t": time.monotonic_ns(),
        "i": i,
        "text": 'ü € 🎉 <&> "q" \\ \n',
        "nested": {"list": [1, 2.5, None, True, False, -7, 1e-3], "empty": {}, "arr": []},
    }


def check_event(raw: str, ev: dict[str, Any], topic: str, seq: int) -> None:
    check(raw.startswith('{"type":"event"'), f"event frame starts {raw[:40]!r}")
    check(f'"seq":{seq},' in raw or f'"seq":{seq}}}' in raw, f"no compact seq in {raw[:120]!r}")
    check('"payload":{"t":' in raw, f"payload not compact / t not first: {raw[:160]!r}")
    check(ev.get("type") == "event", f"not an event: {ev!r}")
    check(ev.get("topic") == topic, f"event topic {ev.get('topic')!r}, want {topic!r}")
    check(ev.get("seq") == seq, f"event seq {ev.get('seq')!r}, want {seq}")
    stamp = ev.get("timestamp")
    check(isinstance(stamp, str) and stamp.endswith("Z"), f"timestamp {stamp!r}")
    assert isinstance(stamp, str)
    parsed = datetime.fromisoformat(stamp[:-1] + "+00:00")
    check(abs(parsed.timestamp() - time.time()) < 60, f"timestamp {stamp!r} is not now")


async def scenario(port: int, log: list[str]) -> None:
    url = f"ws://{HOST}:{port}/ws"
    topic = "smoke/topic-ü"
    other = "smoke/other"
    async with (
        open_websocket_url(url, connect_timeout=STEP_TIMEOUT, disconnect_timeout=2) as s0,
        open_websocket_url(url, connect_timeout=STEP_TIMEOUT, disconnect_timeout=2) as s1,
        open_websocket_url(url, connect_timeout=STEP_TIMEOUT, disconnect_timeout=2) as s2,
        open_websocket_url(url, connect_timeout=STEP_TIMEOUT, disconnect_timeout=2) as pub,
    ):
        subs = [s0, s1, s2]
        for i, ws in enumerate(subs):
            await subscribe(ws, topic, 1000 + i, 0)
        await subscribe(s0, other, 2000, 0)  # several topics on one connection

        h = await health(port)
        check(h == {"status": "ok", "connections": 4}, f"/health {h!r}, want 4 connections")

        payloads = [payload_for(i) for i in range(1, N_EVENTS + 1)]
        received: list[list[dict[str, Any]]] = [[] for _ in subs]

        async def drain(k: int, ws: WebSocketConnection) -> None:
            for seq in range(1, N_EVENTS + 1):
                raw, ev = await recv_json(ws)
                check_event(raw, ev, topic, seq)
                received[k].append(ev["payload"])

        acks: list[dict[str, Any]] = []

        async def publish_all() -> None:
            for i, p in enumerate(payloads, start=1):
                msg = {"type": "publish", "topic": topic, "payload": p, "requestId": i}
                await pub.send_message(json.dumps(msg, ensure_ascii=False, separators=(",", ":")))

        async def collect_acks() -> None:
            for _ in range(N_EVENTS):
                _, reply = await recv_json(pub)
                acks.append(reply)

        async with trio.open_nursery() as nursery:
            for k, ws in enumerate(subs):
                nursery.start_soon(drain, k, ws)
            nursery.start_soon(collect_acks)
            nursery.start_soon(publish_all)

        for k in range(len(subs)):
            check(received[k] == payloads, f"subscriber {k}: payloads changed in transit")
        want_acks = [
            {
                "type": "response",
                "topic": topic,
                "requestId": i,
                "payload": {"status": "published", "seq": i},
            }
            for i in range(1, N_EVENTS + 1)
        ]
        check(acks == want_acks, f"publish answers differ, first: {acks[:1]!r}")
        log.append(f"3 subscribers got seq 1..{N_EVENTS} in order, payloads intact; 100 acks")

        # A late subscriber learns the current seq.
        async with open_websocket_url(url, connect_timeout=STEP_TIMEOUT) as late:
            await subscribe(late, topic, 3000, N_EVENTS)
            h = await health(port)
            check(h["connections"] == 5, f"/health {h!r}, want 5 connections")

        # Unsubscribe: s0 leaves `topic`; the next thing it sees is the `other` event.
        reply = await request(s0, {"type": "unsubscribe", "topic": topic, "requestId": 4000})
        want = {
            "type": "response",
            "topic": topic,
            "requestId": 4000,
            "payload": {"status": "unsubscribed", "topic": topic},
        }
        check(reply == want, f"unsubscribe reply {reply!r}")
        for rid, t in ((4001, topic), (4002, other)):
            reply = await request(
                pub, {"type": "publish", "topic": t, "payload": {"t": rid}, "requestId": rid}
            )
            check(reply["payload"]["status"] == "published", f"publish reply {reply!r}")
        raw, ev = await recv_json(s0)
        check_event(raw, ev, other, 1)
        for ws in (s1, s2):
            raw, ev = await recv_json(ws)
            check_event(raw, ev, topic, N_EVENTS + 1)
        log.append("late subscribe seq, multi-topic and unsubscribe ok")

        # Invalid input gets an error frame, and the connection stays usable.
        for bad in ("not json", '{"type":"bogus","topic":"x"}', '{"type":"publish"}', "[1,2]"):
            await pub.send_message(bad)
            _, reply = await recv_json(pub)
            check(
                reply.get("type") == "error" and reply["payload"]["code"] == "invalid_message",
                f"reply to {bad!r}: {reply!r}",
            )
        log.append("errors ok")

    # A message over 512 KiB closes the connection (1009, message too big).
    async with open_websocket_url(url, connect_timeout=STEP_TIMEOUT, disconnect_timeout=2) as big:
        with trio.fail_after(STEP_TIMEOUT):
            try:
                await big.send_message(
                    '{"type":"publish","topic":"t","payload":"' + "x" * 600_000 + '"}'
                )
                await big.get_message()
            except ConnectionClosed as exc:
                code: object = exc.reason.code if exc.reason else None
            else:
                code = "a reply"
        check(code == 1009, f"oversized message: got {code}, want close 1009")
    log.append("oversized message -> close 1009")

    await slow_consumer(url, port, log)


async def slow_consumer(url: str, port: int, log: list[str]) -> None:
    topic = "smoke/slow"
    pad = "x" * SLOW_PAD
    async with (
        open_websocket_url(url, connect_timeout=STEP_TIMEOUT, receive_buffer_size=65536) as fast,
        # message_queue_size=1: once one message waits unread, wsproto stops reading the socket
        open_websocket_url(url, connect_timeout=STEP_TIMEOUT, message_queue_size=1) as slow,
        open_websocket_url(url, connect_timeout=STEP_TIMEOUT, receive_buffer_size=65536) as pub,
    ):
        await subscribe(fast, topic, 1, 0)
        await subscribe(slow, topic, 2, 0)
        started = time.monotonic()

        async def fast_reader() -> None:
            for seq in range(1, SLOW_EVENTS + 1):
                _, ev = await recv_json(fast)
                check(ev["seq"] == seq, f"fast subscriber got seq {ev['seq']}, want {seq}")

        async def publisher() -> None:
            in_flight = trio.Semaphore(64)

            async def acks() -> None:
                for _ in range(SLOW_EVENTS):
                    await recv_json(pub)
                    in_flight.release()

            async with trio.open_nursery() as n:
                n.start_soon(acks)
                for i in range(1, SLOW_EVENTS + 1):
                    with trio.fail_after(STEP_TIMEOUT):
                        await in_flight.acquire()
                    await pub.send_message(
                        f'{{"type":"publish","topic":"{topic}","payload":{{"t":{i},"pad":"{pad}"}},"requestId":{i}}}'
                    )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fast_reader)
            nursery.start_soon(publisher)
        elapsed = time.monotonic() - started

        # Now the stalled subscriber reads what it was left until its queue is empty
        # (no frame for 1 s); then a marker event must reach it again.
        seqs: list[int] = []
        with trio.fail_after(4 * STEP_TIMEOUT):
            while True:
                with trio.move_on_after(1.0) as idle:
                    raw = await slow.get_message()
                if idle.cancelled_caught:
                    break
                seqs.append(json.loads(raw)["seq"])
        marker = SLOW_EVENTS + 1
        await request(
            pub, {"type": "publish", "topic": topic, "payload": {"t": 0}, "requestId": marker}
        )
        _, ev = await recv_json(slow)
        check(ev["seq"] == marker, f"after draining, slow subscriber got {ev['seq']}, not {marker}")
        seqs.append(marker)
        check(all(a < b for a, b in itertools.pairwise(seqs)), "slow subscriber: seqs out of order")
        gaps = marker - len(seqs)
        check(gaps > 0, f"slow subscriber got all {len(seqs)} events: nothing was dropped")
        log.append(
            f"slow consumer: fast got all {SLOW_EVENTS} x {SLOW_PAD // 1024} KiB "
            f"in {elapsed:.1f}s; "
            f"stalled one got {len(seqs)} (first gap after seq {first_gap(seqs)}), "
            f"{gaps} dropped for it alone"
        )


def first_gap(seqs: list[int]) -> int:
    for a, b in itertools.pairwise(seqs):
        if b != a + 1:
            return a
    return seqs[-1]


async def run_peer(name: str) -> tuple[bool, list[str]]:
    log: list[str] = []
    port = free_port()
    cmd = [*PEERS[name], "--port", str(port)]
    proc = await trio.lowlevel.open_process(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    stderr = bytearray()
    ok = False
    try:
        async with trio.open_nursery() as nursery:

            async def read_stderr() -> None:
                assert proc.stderr is not None
                while chunk := await proc.stderr.receive_some(65536):
                    stderr.extend(chunk)

            nursery.start_soon(read_stderr)
            with trio.fail_after(PEER_TIMEOUT):
                line = b""
                with trio.fail_after(STEP_TIMEOUT):
                    assert proc.stdout is not None
                    while not line.endswith(b"\n"):
                        chunk = await proc.stdout.receive_some(1)
                        check(chunk != b"", f"exited before listening: {proc.poll()}")
                        line += chunk
                want = f"listening on ws://{HOST}:{port}/ws\n".encode()
                check(line == want, f"first line {line!r}, want {want!r}")
                log.append(line.decode().strip())

                await scenario(port, log)

                # SIGTERM with a connection open: exit 0, promptly.
                async with open_websocket_url(
                    f"ws://{HOST}:{port}/ws", connect_timeout=STEP_TIMEOUT
                ) as ws:
                    await subscribe(ws, "smoke/bye", 1, 0)
                    t0 = time.monotonic()
                    proc.send_signal(signal.SIGTERM)
                    with trio.fail_after(STEP_TIMEOUT):
                        rc = await proc.wait()
                    check(rc == 0, f"exit status {rc} after SIGTERM")
                    log.append(f"SIGTERM -> exit 0 in {time.monotonic() - t0:.2f}s")
            nursery.cancel_scope.cancel()
        ok = True
    except* Exception as group:
        for exc in group.exceptions:
            log.append(f"FAIL: {type(exc).__name__}: {exc}")
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            with trio.move_on_after(5):
                await proc.wait()
        if stderr.strip():
            log.append("stderr: " + stderr.decode(errors="replace").strip()[-2000:])
    return ok, log


async def main(names: list[str]) -> int:
    failed = 0
    for name in names:
        ok, log = await run_peer(name)
        print(f"== {name}: {'PASS' if ok else 'FAIL'}")
        for line in log:
            print(f"   {line}")
        failed += not ok
    print(f"{len(names) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("peers", nargs="*", metavar="PEER", help=", ".join(PEERS))
    args = parser.parse_args()
    unknown = [p for p in args.peers if p not in PEERS]
    if unknown:
        parser.error(f"unknown peer(s) {unknown}; choose from {list(PEERS)}")
    sys.exit(trio.run(main, args.peers or list(PEERS)))
