"""Simulated agents, so that a newcomer sees the server at work (``--demo``, on by default).

They do what the seed's processes do: two agents take turns on tasks, each turn
streamed as task-stream events (``BroadcastTaskEvent``); an agent writes its
reply straight into the SQLite store, where the poll finds it (agents "write
directly to the DB"); the coordinator posts through the server
(``BroadcastMessage``); every agent process reports its telemetry
(``BroadcastTelemetry``), and a finished task lands in the other agent's inbox
(``BroadcastInboxMessage``). Everything happens in the thread ``demo``.
"""

from __future__ import annotations

import itertools
import os
import uuid
from dataclasses import dataclass

import trio

from .app import AgentMessaging, now_ms

THREAD = "demo"
TURNS_PER_TASK = 3
TOOLS = [("bash", "pytest -q", "41 passed in 2.3s"), ("read_file", "docs/design.md", "212 lines"),
         ("grep", "TODO src/", "3 matches")]  # fmt: skip


@dataclass
class Agent:
    """One simulated agent process and the counters its telemetry reports."""

    name: str
    pid: int
    started: float
    turns: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0


async def run_demo(app: AgentMessaging, interval: float = 0.5) -> None:
    """Tasks, turn after turn, each step ``interval`` seconds after the last, forever."""
    now = trio.current_time()
    agents = [Agent("design-doc-creator", os.getpid() + 1, now),
              Agent("code-reviewer", os.getpid() + 2, now)]  # fmt: skip
    await app.post(_message("user", "newcomer", "Write the design doc, then have it reviewed."))
    for number in itertools.count(1):
        task, done = f"task-{number}", number % 4 != 0  # every fourth fails, to show an error
        for turn in range(1, TURNS_PER_TASK + 1):
            agent = agents[(turn - 1) % 2]
            failing = not done and turn == TURNS_PER_TASK
            await _turn(app, agent, task, turn, interval, failing=failing)
        other = agents[0] if agent is agents[1] else agents[1]
        status = "completed" if done else "failed"
        await app.broadcast("task_stream", _stream(agent, task, "status", status=status))
        report = _message("agent", "coordinator", f"{task} {status}", kind="status", subject=task)
        await app.post(report)
        inbox = {
            "id": uuid.uuid4().hex[:12],
            "message_id": uuid.uuid4().hex[:12],
            "correlation_id": task,
            "from_agent": agent.name,
            "to_inbox": other.name,
            "message_type": "review_request" if done else "help_request",
            "title": f"{'Review' if done else 'Look at'} {task}",
            "status": "unread",
            "created_at": now_ms(),
        }
        await app.broadcast("inbox_message", inbox)
        await trio.sleep(interval)


async def _turn(
    app: AgentMessaging, agent: Agent, task: str, turn: int, interval: float, *, failing: bool
) -> None:
    tool, tool_input, tool_output = TOOLS[turn % len(TOOLS)]
    steps = [
        _stream(agent, task, "turn_start", turn_num=turn, status="running"),
        _stream(agent, task, "text", turn_num=turn, text=f"Turn {turn}: looking at {tool_input}"),
        _stream(agent, task, "tool_use", turn_num=turn, tool_name=tool, tool_input=tool_input),
        _stream(agent, task, "tool_result", turn_num=turn, tool_name=tool, tool_output=tool_output),
    ]
    if failing:
        steps.append(_stream(agent, task, "error", turn_num=turn, error_msg="tool timed out"))
    for step in steps:
        await app.broadcast("task_stream", step)
        await trio.sleep(interval)
    # The agent's reply goes straight into the store, as the seed's agents write;
    # the server's poll finds it and delivers it to the thread's subscribers.
    reply = _message("agent", agent.name, f"{task}, turn {turn}: {tool_output}")
    await app.store.insert({"id": uuid.uuid4().hex, "created_at": now_ms(), **reply})
    tokens_in, tokens_out = 1200 + 37 * turn, 300 + 11 * turn
    agent.turns += 1
    agent.tokens_in += tokens_in
    agent.tokens_out += tokens_out
    agent.cost = round(agent.tokens_in * 3e-6 + agent.tokens_out * 15e-6, 4)
    end = _stream(agent, task, "turn_end", turn_num=turn, tokens_in=tokens_in,
                  tokens_out=tokens_out, duration_sec=len(steps))  # fmt: skip
    await app.broadcast("task_stream", end)
    telemetry = {
        "instance_id": f"{agent.name}-1",
        "pid": agent.pid,
        "turns": agent.turns,
        "tokens_in": agent.tokens_in,
        "tokens_out": agent.tokens_out,
        "cost": agent.cost,
        "status": "running",
        "duration_sec": int(trio.current_time() - agent.started),
    }
    await app.broadcast("telemetry", telemetry)
    await trio.sleep(interval)


def _message(from_type: str, from_id: str, content: str, **fields: str) -> dict[str, str]:
    to = ("agent", "coordinator") if from_type == "user" else ("user", "newcomer")
    return {"thread_id": THREAD, "from_type": from_type, "from_id": from_id, "to_type": to[0],
            "to_id": to[1], "kind": "chat", "content": content, **fields}  # fmt: skip


def _stream(agent: Agent, task: str, stream_type: str, **fields: object) -> dict[str, object]:
    return {"task_id": task, "thread_id": THREAD, "stream_type": stream_type,
            "agent_id": agent.name, "source_type": "coordinator", **fields}  # fmt: skip
