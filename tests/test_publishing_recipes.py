"""The recipes of docs/publishing.md (examples/publishers/), run against a real ``tidings serve``.

- the plain script: run as a subprocess, as a cron job would;
- the Django view: called with Django's RequestFactory (Django configured in
  this process, no database, no server), twice for one order;
- the FastAPI route: the real app, its lifespan and its route, through httpx's
  ASGI transport under ``asyncio.run``;
- the Celery task: its body (``reports.publish_report_ready``) with the same
  Publisher call the task makes; Celery itself is not installed, so the
  decorator and the worker are not run.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import django
import httpx
import pytest
from django.conf import settings
from django.test import RequestFactory

from examples.publishers import django_views, fastapi_app, reports
from tidings.publisher import Publisher

from .redis_fixture import free_port
from .serve_fixture import API_KEY, ServeProcess

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
Serve = Callable[..., ServeProcess]


def events(node: ServeProcess, topic: str) -> list[object]:
    with Publisher(node.http_url, api_key=API_KEY) as publisher:
        return [event.payload for event in publisher.history(topic).events]


def test_the_script_publishes_and_reports_a_node_that_is_down(tidings_serve: Serve) -> None:
    node = tidings_serve()
    env = {**os.environ, "TIDINGS_URL": node.http_url, "TIDINGS_API_KEY": API_KEY}
    command = [sys.executable, "-m", "examples.publishers.script", "deploys", '{"step": "build"}']
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    seq, epoch = done.stdout.split()
    assert seq == "1" and epoch
    assert events(node, "deploys") == [{"step": "build"}]

    env["TIDINGS_URL"] = f"http://127.0.0.1:{free_port()}"
    down = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert down.returncode == 1
    assert "unreachable" in down.stderr


def test_the_django_view_publishes_once_for_an_order_posted_twice(tidings_serve: Serve) -> None:
    node = tidings_serve()
    if not settings.configured:
        settings.configure(ALLOWED_HOSTS=["testserver"], INSTALLED_APPS=[])
        django.setup()
    settings.TIDINGS_URL = node.http_url
    settings.TIDINGS_API_KEY = API_KEY
    django_views.tidings.cache_clear()
    try:
        answers = [
            django_views.order_paid(RequestFactory().post("/orders/42/paid"), order_id=42)
            for _ in range(2)
        ]
        assert [a.status_code for a in answers] == [200, 200]
        expected = b'{"paid": true, "notified": true, "seq": 1}'
        assert answers[0].content == answers[1].content == expected
        assert events(node, "orders.42") == [{"type": "order.paid", "orderId": 42}]
        wrong_method = django_views.order_paid(RequestFactory().get("/orders/42/paid"), 42)
        assert wrong_method.status_code == 405
    finally:
        django_views.tidings().close()
        django_views.tidings.cache_clear()


def test_the_fastapi_route_publishes_through_its_lifespans_publisher(
    tidings_serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = tidings_serve()
    monkeypatch.setenv("TIDINGS_URL", node.http_url)
    monkeypatch.setenv("TIDINGS_API_KEY", API_KEY)

    async def main() -> None:
        app = fastapi_app.app
        async with (
            fastapi_app.lifespan(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http,
        ):
            answer = await http.post("/orders/7/shipped")
            assert answer.status_code == 200, answer.text
            assert answer.json()["seq"] == 1
            second = await http.post("/orders/7/shipped")
            assert second.json()["seq"] == 2  # no key: two shipments, two events

    asyncio.run(asyncio.wait_for(main(), 20))
    assert events(node, "orders.7") == [{"type": "order.shipped", "orderId": 7}] * 2


def test_the_celery_tasks_body_publishes_once_per_task_id(tidings_serve: Serve) -> None:
    node = tidings_serve()
    with Publisher(node.http_url, api_key=API_KEY) as publisher:
        first = reports.publish_report_ready(publisher, "alice", "r-1", idempotency_key="task-1")
        # Celery retries a task under its id: the retry publishes nothing new.
        again = reports.publish_report_ready(publisher, "alice", "r-1", idempotency_key="task-1")
        other = reports.publish_report_ready(publisher, "alice", "r-2", idempotency_key="task-2")
    assert again == first
    assert (first.seq, other.seq) == (1, 2)
    assert [e["reportId"] for e in events(node, "users.alice")] == ["r-1", "r-2"]  # type: ignore[index]


def test_the_recipes_in_the_docs_are_the_tested_files() -> None:
    text = (ROOT / "docs" / "publishing.md").read_text()
    blocks = re.findall(r"```python\n# (examples/publishers/\S+\.py)\n(.*?)```", text, re.DOTALL)
    assert {path for path, _ in blocks} >= {
        "examples/publishers/script.py",
        "examples/publishers/django_views.py",
        "examples/publishers/fastapi_app.py",
        "examples/publishers/celery_tasks.py",
        "examples/publishers/reports.py",
    }
    for path, block in blocks:
        assert block in (ROOT / path).read_text(), f"docs/publishing.md drifted from {path}"
