"""A Celery task that publishes when a report is ready.

    celery -A examples.publishers.celery_tasks worker

A Celery worker runs tasks in plain processes with no event loop: the
synchronous Publisher fits. It is made once per worker process, on first use,
after the prefork pool forked.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from celery import Celery

from tidings.publisher import ApiUnavailableError, Publisher

from .reports import publish_report_ready

app = Celery("reports", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/1"))


@functools.cache
def tidings() -> Publisher:
    return Publisher(os.environ["TIDINGS_URL"], api_key=os.environ["TIDINGS_API_KEY"])


# The Publisher already retried a few seconds; Celery retries for longer, with
# the same key (the task id), so a node that is down a while publishes once too.
@app.task(bind=True, autoretry_for=(ApiUnavailableError,), retry_backoff=True, max_retries=10)
def report_ready(self: Any, user: str, report_id: str) -> int:
    published = publish_report_ready(tidings(), user, report_id, idempotency_key=self.request.id)
    return published.seq
