"""``python -m examples.agent_messaging watch``: one line per frame the server sends.

It subscribes to a thread from a seq (catch-up in batches, then live), acks what
it received (``--no-ack`` does not, to see the pause at ``--max-lag``), and
shows the broadcasts every client gets: telemetry, inbox messages, task streams.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import orjson
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from .demo import THREAD


def watch(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.agent_messaging watch")
    parser.add_argument("--url", default="ws://127.0.0.1:8080/ws", help="the server's /ws")
    parser.add_argument("--thread", default=THREAD, help=f"thread to follow (default: {THREAD})")
    parser.add_argument("--from-seq", type=int, default=0, help="catch up after this message_seq")
    parser.add_argument("--token", help="the server's --token, if it has one")
    parser.add_argument("--no-ack", action="store_true", help="never ack: see the pause")
    args = parser.parse_args(argv)
    try:
        return trio.run(_watch, args)
    except KeyboardInterrupt:
        return 130
    except (OSError, HandshakeError, ConnectionClosed) as exc:
        print(f"watch: {args.url}: {exc.__cause__ or exc}", file=sys.stderr)
        return 1


async def _watch(args: argparse.Namespace) -> int:
    url = f"{args.url}?token={args.token}" if args.token else args.url
    async with open_websocket_url(url) as ws:
        subscribe = {"thread_id": args.thread, "from_seq": args.from_seq}
        await ws.send_message(orjson.dumps({"type": "subscribe", "data": subscribe}).decode())
        while True:
            frame = orjson.loads(await ws.get_message())
            print(render(frame), flush=True)
            data = frame.get("data") or {}
            kind = frame.get("type")
            seq = None
            if kind == "batch" and data.get("messages"):
                seq = data["messages"][-1]["message_seq"]
            elif kind == "message" and data.get("thread_id") == args.thread:
                seq = data["message_seq"]
            if seq is not None and not args.no_ack:
                ack = {"type": "ack", "data": {"thread_id": args.thread, "ack_seq": seq}}
                await ws.send_message(orjson.dumps(ack).decode())


def render(frame: dict[str, Any]) -> str:
    """``12:00:01 telemetry     design-doc-creator-1 running: 3 turns, ...``."""
    kind, data = str(frame.get("type")), frame.get("data") or {}
    clock = time.strftime("%H:%M:%S", time.localtime(frame.get("timestamp", 0) / 1000))
    if kind == "batch":
        seqs = [message["message_seq"] for message in data.get("messages", [])]
        more = ", more follow" if data.get("has_more") else ""
        what = f"{data.get('thread_id')} #{seqs[0]}-#{seqs[-1]} ({len(seqs)} messages{more})"
    elif kind == "message":
        what = (
            f"{data.get('thread_id')} #{data.get('message_seq')} {data.get('from_id')} -> "
            f"{data.get('to_id')}: {data.get('content')}"
        )
    elif kind == "thread_state":
        what = f"{data.get('thread_id')} {data.get('status')} at #{data.get('last_seq')}"
    elif kind == "telemetry":
        what = (
            f"{data.get('instance_id')} {data.get('status')}: {data.get('turns')} turns, "
            f"{data.get('tokens_in')} in / {data.get('tokens_out')} out, ${data.get('cost')}"
        )
    elif kind == "inbox_message":
        what = (
            f"{data.get('to_inbox')} <- {data.get('from_agent')}: {data.get('title')} "
            f"({data.get('message_type')})"
        )
    elif kind == "task_stream":
        detail = next(
            (str(data[key]) for key in ("text", "tool_input", "tool_output", "error_msg", "status")
             if data.get(key)), "",
        )  # fmt: skip
        what = (
            f"{data.get('task_id')} {data.get('stream_type')} {data.get('agent_id', '')} {detail}"
        )
    elif kind == "error":
        what = f"{data.get('code')}: {data.get('message')}"
    else:
        what = orjson.dumps(data).decode() if data else ""
    return f"{clock} {kind:<13} {what}".rstrip()
