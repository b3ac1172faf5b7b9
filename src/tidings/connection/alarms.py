"""One timer for every connection's pinger, so that a sleeping pinger costs little.

A pinger sleeps until its next deadline (a ping is due, the read timeout or
the token's expiry would pass). With ``trio.sleep`` each of those sleeps
makes a cancel scope and a deadline entry of its own; here a pinger parks
itself with :meth:`AlarmClock.sleep_until`, and one node-level task wakes
every pinger whose deadline has passed. The pinger is still the
connection's own task, in the connection's nursery; only the waking is shared.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Awaitable
from typing import Any

import trio

#: With nothing to wake, the clock still looks again this often (seconds).
IDLE_CHECK = 3600.0


class _Alarm:
    """One parked task and its deadline; called, it is the abort function of the wait."""

    __slots__ = ("deadline", "sequence", "task")

    def __init__(self, deadline: float, sequence: int, task: trio.lowlevel.Task) -> None:
        self.deadline = deadline
        self.sequence = sequence
        self.task: trio.lowlevel.Task | None = task

    def __lt__(self, other: _Alarm) -> bool:
        return (self.deadline, self.sequence) < (other.deadline, other.sequence)

    def __call__(self, _: object) -> trio.lowlevel.Abort:
        self.task = None  # left in the heap; skipped when its time comes
        return trio.lowlevel.Abort.SUCCEEDED


class AlarmClock:
    """Wakes parked tasks at their deadlines. Run :meth:`run` in the node's nursery."""

    __slots__ = ("_heap", "_scope", "_sequence")

    def __init__(self) -> None:
        self._heap: list[_Alarm] = []
        self._sequence = itertools.count()
        self._scope: trio.CancelScope | None = None

    def sleep_until(self, deadline: float) -> Awaitable[Any]:
        """Park the calling task until ``trio.current_time()`` reaches ``deadline``.

        Await what it returns at once. Cancellable like any wait; what the task
        is sent on waking is ignored.
        """
        alarm = _Alarm(deadline, next(self._sequence), trio.lowlevel.current_task())
        heap = self._heap
        heapq.heappush(heap, alarm)
        scope = self._scope
        if scope is not None and deadline < scope.deadline and heap[0] is alarm:
            scope.deadline = deadline  # the clock sleeps too long: wake it sooner
        return trio.lowlevel.wait_task_rescheduled(alarm)  # noqa: ASYNC105 - the caller awaits

    def __len__(self) -> int:
        """Alarms waiting (cancelled ones included until their time)."""
        return len(self._heap)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Wake tasks whose deadline has passed, until cancelled."""
        heap = self._heap
        task_status.started()
        while True:
            now = trio.current_time()
            while heap and heap[0].deadline <= now:
                alarm = heapq.heappop(heap)
                task = alarm.task
                if task is not None:
                    alarm.task = None
                    trio.lowlevel.reschedule(task)
            deadline = heap[0].deadline if heap else now + IDLE_CHECK
            with trio.CancelScope(deadline=deadline) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
