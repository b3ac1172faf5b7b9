"""The body of the Celery task in celery_tasks.py: a plain function of a Publisher.

Kept apart from Celery so that it reads (and is tested) without a broker.
"""

from __future__ import annotations

from tidings.publisher import Published, Publisher


def publish_report_ready(
    tidings: Publisher, user: str, report_id: str, *, idempotency_key: str
) -> Published:
    """Tell a user's browsers that their report is ready to download.

    ``idempotency_key`` is the Celery task's id, the same on every retry of
    the task: a task retried after a lost answer, or run again after its
    worker died, publishes once within the node's window.
    """
    return tidings.publish(
        f"users.{user}",
        {"type": "report.ready", "reportId": report_id, "url": f"/reports/{report_id}.pdf"},
        idempotency_key=idempotency_key,
    )
