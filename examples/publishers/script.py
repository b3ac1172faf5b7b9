"""Publish one event from a plain script or a cron job.

    TIDINGS_URL=http://127.0.0.1:8800 TIDINGS_API_KEY=s3cret-key \\
        python -m examples.publishers.script deploys '{"step": "build", "status": "ok"}'

Prints the event's seq and epoch. Exit status 1 (with the API's error code)
when the node refused it or stayed unreachable through the retries.
"""

from __future__ import annotations

import json
import os
import sys

from tidings.publisher import ApiCallError, Publisher


def main(argv: list[str]) -> int:
    topic, payload = argv[0], json.loads(argv[1])
    url = os.environ.get("TIDINGS_URL", "http://127.0.0.1:8800")
    with Publisher(url, api_key=os.environ["TIDINGS_API_KEY"]) as tidings:
        try:
            published = tidings.publish(topic, payload)
        except ApiCallError as exc:
            print(f"not published: {exc}", file=sys.stderr)
            return 1
    print(published.seq, published.epoch)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
