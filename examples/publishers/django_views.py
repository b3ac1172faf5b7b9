"""A Django view that tells the browsers watching an order that it was paid.

In settings.py: ``TIDINGS_URL = "http://127.0.0.1:8800"`` and
``TIDINGS_API_KEY = env("TIDINGS_API_KEY")``; in urls.py:
``path("orders/<int:order_id>/paid", django_views.order_paid)``.

A Django view is synchronous and runs with no event loop: the plain
``Publisher`` is what it needs. One per process, made on first use (after
any fork of the server's workers).
"""

from __future__ import annotations

import functools

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_POST

from tidings.publisher import ApiCallError, Publisher


@functools.cache
def tidings() -> Publisher:
    return Publisher(settings.TIDINGS_URL, api_key=settings.TIDINGS_API_KEY, timeout=5)


@require_POST
def order_paid(request: HttpRequest, order_id: int) -> JsonResponse:
    # ... mark the order paid in the database ...
    try:
        published = tidings().publish(
            f"orders.{order_id}",
            {"type": "order.paid", "orderId": order_id},
            # A form posted twice (a double click, a retry) publishes once.
            idempotency_key=f"order-paid-{order_id}",
        )
    except ApiCallError as exc:
        # The order is paid either way; the browsers catch up from history.
        return JsonResponse({"paid": True, "notified": False, "error": exc.code}, status=202)
    return JsonResponse({"paid": True, "notified": True, "seq": published.seq})
