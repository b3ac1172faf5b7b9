"""The agent messaging server (seed 004): threads of messages in SQLite, resumable by seq.

A subscriber is caught up from the store in batches of 50, then follows its
thread live, paused while ``max_lag`` messages past its ack. Posted messages go
out at once; rows agents write into the SQLite file are found by a poll.
"""

from __future__ import annotations

import logging
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from tidings import (
    AppMessage,
    CloseInfo,
    Config,
    Endpoint,
    JsonDialect,
    RequestError,
    Server,
    Session,
    messages,
    open_server,
)

MAX_BATCH = 50
BROADCAST = "broadcast"  # the topic every client follows: telemetry, inbox, task streams
STREAM_TYPES = {"turn_start", "text", "tool_use", "tool_result", "turn_end", "error", "status"}
# The seed's Go structs as they marshal: fields in order, "?" marks omitempty.
SHAPES = {
    "message": "id thread_id message_seq created_at from_type from_id to_type to_id kind"
    " subject? content metadata_json?",
    "telemetry": "instance_id pid turns tokens_in tokens_out cost status duration_sec",
    "inbox_message": "id message_id correlation_id? from_agent to_inbox message_type title"
    " payload? status created_at",
    "task_stream": "task_id thread_id? stream_type turn_num? text? tool_name? tool_input?"
    " tool_output? error_msg? status? tokens_in? tokens_out? cost? duration_sec? workspace?"
    " directive? directive_full? agent_id? source_type?",
}
INTS = {"message_seq", "created_at", "pid", "turns", "tokens_in", "tokens_out", "turn_num",
        "duration_sec"}  # fmt: skip
SCHEMA = """CREATE TABLE IF NOT EXISTS messages (id TEXT PRIMARY KEY, thread_id TEXT NOT NULL,
    message_seq INTEGER NOT NULL, created_at INTEGER NOT NULL, from_type TEXT, from_id TEXT,
    to_type TEXT, to_id TEXT, kind TEXT, subject TEXT, content TEXT, metadata_json TEXT,
    UNIQUE (thread_id, message_seq))"""
NEXT_SEQ = "(SELECT COALESCE(MAX(message_seq), 0) + 1 FROM messages WHERE thread_id = ?)"
# Rows agents wrote are read with the seed's types, whatever they stored.
COLUMNS = ", ".join(
    f"CAST({name} AS {'INTEGER' if name in INTS else 'TEXT'}) AS {name}"
    for name in SHAPES["message"].replace("?", "").split()
)
LOGGER = logging.getLogger("examples.agent_messaging")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def frame(kind: str, data: Any = None) -> dict[str, Any]:
    """An event; ``data`` is left out when there is none (ping, pong), as Go's omitempty does."""
    return {"type": kind, "timestamp": now_ms()} | ({} if data is None else {"data": data})


def error_frame(error: messages.Error) -> dict[str, Any]:
    return frame("error", {"code": str(error.code), "message": error.message})


def shape(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as the seed's struct for ``kind`` marshals: its fields, zero values, omitempty."""
    shaped: dict[str, Any] = {}
    for spec in SHAPES[kind].split():
        name = spec.rstrip("?")
        zero: int | float | str = 0 if name in INTS else 0.0 if name == "cost" else ""
        value = zero if data.get(name) is None else data[name]
        wanted = (int,) if name in INTS else (int, float) if name == "cost" else (str,)
        if not isinstance(value, wanted) or isinstance(value, bool):
            raise RequestError("invalid_field", f"{name} must be a {type(zero).__name__}")
        if value or not spec.endswith("?"):
            shaped[name] = value
    return shaped


def data_of(message: AppMessage) -> dict[str, Any]:
    data = message.body.get("data", message.body)  # the seed's place; the top level tolerated
    if not isinstance(data, dict):
        raise RequestError("invalid_message", "data must be an object")
    return data


class Store:
    """The messages table. Calls run one at a time in a worker thread: an agent
    writing to the file may hold its lock, and the event loop must not wait on it."""

    def __init__(self, path: str = ":memory:") -> None:
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(SCHEMA)
        self.seen = self.db.execute("SELECT COALESCE(MAX(rowid), 0) FROM messages").fetchone()[0]
        self.lock = trio.Lock()

    async def query(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        async with self.lock:
            return await trio.to_thread.run_sync(self._query, sql, args)

    def _query(self, sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
        return [dict(row) for row in self.db.execute(sql, args)]

    async def insert(self, message: dict[str, Any]) -> dict[str, Any]:
        """Store a message as the next of its thread (one statement: atomic)."""
        names = [name for name in message if name != "message_seq"]
        values = [message[name] for name in names]
        sql = f"INSERT INTO messages ({', '.join(names)}, message_seq) VALUES ("
        sql += f"{', '.join('?' * len(names))}, {NEXT_SEQ}) RETURNING *"
        try:
            return (await self.query(sql, *values, message["thread_id"]))[0]
        except sqlite3.IntegrityError as exc:
            raise RequestError("conflict", f"not stored: {exc}") from None

    async def after(self, thread: str, seq: int, limit: int) -> list[dict[str, Any]]:
        sql = f"SELECT {COLUMNS} FROM messages WHERE thread_id = ? AND message_seq > ?"
        return await self.query(f"{sql} ORDER BY message_seq LIMIT ?", thread, seq, limit)

    async def new_rows(self) -> list[dict[str, Any]]:
        """Rows added since the last call, by anyone (this server or an agent)."""
        sql = f"SELECT rowid AS row, {COLUMNS} FROM messages WHERE rowid > ? ORDER BY rowid"
        sql += " LIMIT 1000"
        rows = await self.query(sql, self.seen)
        self.seen = rows[-1]["row"] if rows else self.seen
        return rows


@dataclass(eq=False)
class Sub:
    """One client's subscription to one thread."""

    session: Session
    thread: str
    sent: int  # the last message_seq sent to the client
    acked: int  # the last message_seq it acknowledged
    state: str = "catching_up"  # then "live", or "paused" (max_lag past its ack)
    pumping: bool = False  # a catch-up task runs
    dirty: bool = False  # a message arrived while the store was being read


class AgentMessaging:
    """The application: the ``/ws`` endpoint, thread subscriptions, the store and its poll."""

    def __init__(self, store: Store, *, max_lag: int = 1000, poll_interval: float = 0.5) -> None:
        self.store, self.max_lag, self.poll_interval = store, max_lag, poll_interval
        self.threads: dict[str, set[Sub]] = {}
        self.server: Server | None = None
        self.nursery: trio.Nursery | None = None
        self.endpoint = Endpoint("/ws", JsonDialect("agent-messaging", encode_error=error_frame))
        self.endpoint.on_connect(self.connected)
        self.endpoint.on_disconnect(self.disconnected)
        self.endpoint.on("subscribe")(self.subscribe)
        self.endpoint.on("ack")(self.ack)
        for kind in ("message", "telemetry", "inbox_message", "task_stream"):
            self.endpoint.on(kind)(self.publish)
        self.endpoint.on("ping")(self.ping)
        self.endpoint.on("pong")(self.ping)

    @asynccontextmanager
    async def running(self, config: Config) -> AsyncIterator[Server]:
        async with (
            open_server(config, endpoints=[self.endpoint]) as self.server,
            trio.open_nursery() as self.nursery,
        ):
            if self.poll_interval > 0:
                self.nursery.start_soon(self.poll)
            try:
                yield self.server
            finally:
                self.nursery.cancel_scope.cancel()

    # --- what an embedding program calls (the seed's BroadcastMessage and Broadcast*) -----

    async def post(self, data: dict[str, Any]) -> dict[str, Any]:
        """Store a message as its thread's next and deliver it now."""
        if not data.get("thread_id") or not isinstance(data["thread_id"], str):
            raise RequestError("invalid_field", "thread_id is required")
        message = shape("message", {**data, "created_at": data.get("created_at") or now_ms()})
        message["id"] = message["id"] or uuid.uuid4().hex
        row = await self.store.insert(message)
        self.deliver(row["thread_id"], [row])
        return shape("message", row)

    async def broadcast(self, kind: str, data: dict[str, Any]) -> None:
        """A telemetry, inbox_message or task_stream event to every client."""
        if kind == "task_stream" and data.get("stream_type") not in STREAM_TYPES:
            raise RequestError("invalid_field", f"stream_type is one of {sorted(STREAM_TYPES)}")
        assert self.server is not None
        await self.server.publish(BROADCAST, frame(kind, shape(kind, data)))

    # --- clients -----------------------------------------------------------------------

    async def connected(self, session: Session) -> None:
        session.state["subs"] = {}
        await session.subscribe(BROADCAST)

    async def disconnected(self, session: Session, closed: CloseInfo) -> None:
        for sub in session.state.get("subs", {}).values():
            self.drop(sub)

    async def ping(self, session: Session, message: AppMessage) -> None:
        if message.kind == "ping":  # a pong needs no answer
            session.reply(frame("pong"))

    async def publish(self, session: Session, message: AppMessage) -> None:
        if message.kind == "message":
            await self.post(data_of(message))
        else:
            await self.broadcast(message.kind, data_of(message))

    async def subscribe(self, session: Session, message: AppMessage) -> None:
        data, subs = data_of(message), session.state["subs"]
        thread, from_seq = data.get("thread_id"), data.get("from_seq") or 0
        if not thread or not isinstance(thread, str):
            raise RequestError("invalid_field", "thread_id is required")
        if not isinstance(from_seq, int) or isinstance(from_seq, bool) or from_seq < 0:
            raise RequestError("invalid_field", "from_seq is a message_seq (0: from the start)")
        if thread in subs:
            self.drop(subs[thread])
        sub = subs[thread] = Sub(session, thread, sent=from_seq, acked=from_seq)
        self.threads.setdefault(thread, set()).add(sub)
        self.catch_up(sub)

    async def ack(self, session: Session, message: AppMessage) -> None:
        data = data_of(message)
        sub, ack_seq = session.state["subs"].get(data.get("thread_id")), data.get("ack_seq")
        if sub is None:
            raise RequestError("not_subscribed", "ack a thread you are subscribed to")
        if not isinstance(ack_seq, int) or isinstance(ack_seq, bool):
            raise RequestError("invalid_field", "ack_seq is a message_seq")
        sub.acked = max(sub.acked, min(ack_seq, sub.sent))
        if sub.state == "paused":
            self.catch_up(sub)

    def drop(self, sub: Sub) -> None:
        subs = self.threads.get(sub.thread, set())
        subs.discard(sub)
        if not subs:
            self.threads.pop(sub.thread, None)

    # --- delivery: live, or caught up from the store -------------------------------------

    def deliver(self, thread: str, rows: list[dict[str, Any]]) -> None:
        """New rows of ``thread``, in seq order: live subscribers get them now."""
        for sub in list(self.threads.get(thread, ())):
            sub.dirty = True  # a catch-up under way reads on
            for row in rows if sub.state == "live" else ():
                seq = row["message_seq"]
                if seq <= sub.sent:
                    continue
                if seq != sub.sent + 1 or seq - sub.acked > self.max_lag:
                    self.catch_up(sub)  # a gap (an agent's row not polled yet), or too far ahead
                    break
                if not sub.session.send(frame("message", shape("message", row))):
                    break
                sub.sent = seq

    def catch_up(self, sub: Sub) -> None:
        sub.state, sub.dirty = "catching_up", True
        if not sub.pumping and self.nursery is not None:
            sub.pumping = True
            self.nursery.start_soon(self.pump, sub)

    async def pump(self, sub: Sub) -> None:
        """Batches from the store until the client is caught up (live) or max_lag ahead (paused)."""
        try:
            while sub in self.threads.get(sub.thread, ()):
                room = min(MAX_BATCH, sub.acked + self.max_lag - sub.sent)
                if room <= 0:
                    self.set_state(sub, "paused")  # an ack resumes it
                    return
                sub.dirty = False
                rows = await self.store.after(sub.thread, sub.sent, room + 1)
                batch, more = [shape("message", row) for row in rows[:room]], len(rows) > room
                if sub not in self.threads.get(sub.thread, ()):
                    return
                if batch:
                    data = {"thread_id": sub.thread, "messages": batch, "has_more": more}
                    if not sub.session.send(frame("batch", data)):
                        return
                    sub.sent = batch[-1]["message_seq"]
                if not more and not sub.dirty:  # nothing arrived while reading: go live
                    self.set_state(sub, "live")
                    return
        except sqlite3.Error:
            LOGGER.exception("reading thread %r failed", sub.thread)
            sub.session.close(1011, "the message store failed")
        finally:
            sub.pumping = False

    def set_state(self, sub: Sub, status: str) -> None:
        sub.state = status
        data = {"thread_id": sub.thread, "status": status, "last_seq": sub.sent}
        sub.session.send(frame("thread_state", data | {"updated_at": now_ms()}))

    async def poll(self) -> None:
        """Rows agents wrote straight into the database (the seed polls every 500 ms)."""
        while True:
            await trio.sleep(self.poll_interval)
            try:
                found = await self.store.new_rows()
            except sqlite3.Error:
                LOGGER.exception("polling the message store failed")
                continue
            by_thread: dict[str, list[dict[str, Any]]] = {}
            for row in found:
                by_thread.setdefault(row["thread_id"], []).append(row)
            for thread, rows in by_thread.items():
                self.deliver(thread, sorted(rows, key=lambda row: row["message_seq"]))
