"""``python -m examples.agent_messaging --port 8080 [--token T] [--db messages.db] [--no-demo]``
and ``python -m examples.agent_messaging watch [--thread demo] [--url ws://HOST:PORT/ws]``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import trio

from tidings import Config

from .app import AgentMessaging, Store
from .demo import THREAD, run_demo
from .watch import watch


def options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m examples.agent_messaging")
    add = parser.add_argument
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=8080)
    add("--db", default=":memory:", help="SQLite file agents also write to (default: in memory)")
    add("--token", help="the static token clients must present (SetToken); unset: open")
    add("--poll-interval", type=float, default=0.5, help="seconds between polls of the db")
    add("--max-lag", type=int, default=1000, help="unacknowledged messages before a pause")
    add("--rate-limit", type=int, default=100, help="messages a client may send per second")
    add("--ping-interval", type=float, default=54.0, help="seconds between pings")
    add("--pong-wait", type=float, default=60.0, help="silence after which a client is closed")
    add("--write-wait", type=float, default=10.0, help="seconds a write may take")
    add(
        "--demo",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="simulated agents: thread messages, telemetry, inbox, task streams (default: on)",
    )
    add("--demo-interval", type=float, default=0.5, help="seconds between the demo's steps")
    return parser.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[AgentMessaging, Config]:
    config = Config(
        host=args.host,
        port=args.port,
        token=args.token,
        max_message_size=10 * 1024,  # larger messages close the connection with 1009
        ping_interval=args.ping_interval,
        read_timeout=args.pong_wait,
        write_timeout=args.write_wait,
        rate_limit=args.rate_limit,
        rate_period=1.0,
        rate_limit_violations=0,  # throttled, never closed for it
        outbox_size=args.max_lag + 64,  # room for a subscriber's window of messages
        overflow_policy="disconnect",  # a client not reading closes with 1008, then resumes
        log_level="warning",
    )
    app = AgentMessaging(Store(args.db), max_lag=args.max_lag, poll_interval=args.poll_interval)
    return app, config


async def main(args: argparse.Namespace) -> None:
    app, config = build(args)
    async with app.running(config) as server, trio.open_nursery() as nursery:
        print(f"agent messaging server on {server.url}", flush=True)
        if args.demo:
            nursery.start_soon(run_demo, app, args.demo_interval)
            print(
                f"demo: simulated agents post to thread '{THREAD}' and broadcast telemetry, "
                "inbox messages and task streams (--no-demo: off). Watch them with:\n"
                f"  python -m examples.agent_messaging watch --url {server.url}"
                + (" --token TOKEN" if args.token else ""),
                flush=True,
            )
        await trio.sleep_forever()


if __name__ == "__main__":
    if sys.argv[1:2] == ["watch"]:
        sys.exit(watch(sys.argv[2:]))
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main, options())
