"""A FastAPI route that publishes a shipping update, awaiting the AsyncPublisher.

    uvicorn examples.publishers.fastapi_app:app

The app makes one AsyncPublisher at start-up (its lifespan) and closes it at
shutdown; every request shares its pool of connections to tidings.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request

from tidings.publisher import ApiCallError, AsyncPublisher


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    url = os.environ.get("TIDINGS_URL", "http://127.0.0.1:8800")
    async with AsyncPublisher(url, api_key=os.environ["TIDINGS_API_KEY"]) as publisher:
        app.state.tidings = publisher
        yield


app = FastAPI(lifespan=lifespan)


@app.post("/orders/{order_id}/shipped")
async def order_shipped(order_id: int, request: Request) -> dict[str, Any]:
    tidings: AsyncPublisher = request.app.state.tidings
    try:
        published = await tidings.publish(
            f"orders.{order_id}", {"type": "order.shipped", "orderId": order_id}
        )
    except ApiCallError as exc:
        raise HTTPException(503, f"shipping update not published: {exc.code}") from exc
    return {"orderId": order_id, "seq": published.seq, "epoch": published.epoch}
