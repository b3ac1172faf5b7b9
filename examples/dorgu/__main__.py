"""``python -m examples.dorgu [--enable-websocket] [--websocket-addr :9090] [--port P]``
and ``python -m examples.dorgu watch TOPIC [-n NAMESPACE] [--url ws://HOST:PORT/ws]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import orjson
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url


def watch(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dorgu watch")
    parser.add_argument("topic", help="personas, cluster, deployments or events")
    parser.add_argument("-n", "--namespace", help="only this namespace's events")
    parser.add_argument("--url", default="ws://127.0.0.1:9090/ws")
    parser.add_argument("--count", type=int, help="exit after this many events")
    args = parser.parse_args(argv)
    try:
        return trio.run(_watch, args)
    except KeyboardInterrupt:
        return 130


async def _watch(args: argparse.Namespace) -> int:
    """Subscribe and print each event; reconnect (and resubscribe) while the operator is away.

    Not ``tidings.client``: it resubscribes only topics whose subscribe answer
    gave a position, and dorgu's gives none.
    """
    printed, backoff = 0, 0.2
    while True:
        try:
            async with open_websocket_url(args.url) as ws:
                now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                subscribe = {"type": "subscribe", "topic": args.topic, "requestId": "watch"}
                await ws.send_message(orjson.dumps({**subscribe, "timestamp": now}).decode())
                backoff = 0.2
                while True:
                    frame = orjson.loads(await ws.get_message())
                    if frame.get("type") == "error":
                        print(f"dorgu: {frame.get('payload')}", file=sys.stderr)
                        return 1
                    payload = frame.get("payload") or {}
                    if frame.get("type") != "event" or args.namespace not in (
                        None, payload.get("namespace", args.namespace)
                    ):  # fmt: skip
                        continue
                    print(render(frame), flush=True)
                    printed += 1
                    if printed == args.count:
                        return 0
        except (OSError, HandshakeError, ConnectionClosed) as exc:
            problem = exc.__cause__ or exc
            print(f"dorgu: {args.url} unavailable ({problem!r}); retrying", file=sys.stderr)
        await trio.sleep(backoff)
        backoff = min(backoff * 2, 5.0)


def render(frame: dict[str, Any]) -> str:
    payload = dict(frame["payload"])
    where = "/".join(str(payload.pop(k)) for k in ("namespace", "name") if k in payload)
    kind = payload.pop("eventType", "passed" if payload.pop("passed", False) else "failed")
    rest = " ".join(f"{k}={v if isinstance(v, str) else orjson.dumps(v).decode()}"
                    for k, v in payload.items())  # fmt: skip
    return f"{frame.get('timestamp', '')[11:19]} {frame['topic']:<8} {kind:<11} {where} {rest}"


def main(argv: list[str]) -> int:
    if argv[:1] == ["watch"]:
        return watch(argv[1:])
    from .app import serve  # noqa: PLC0415 - the watch command starts faster without tidings

    return serve(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
