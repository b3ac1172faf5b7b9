"""``python -m examples.aurora --port 5006``: the Aurora chatbot service on 127.0.0.1."""

from __future__ import annotations

import argparse
import contextlib
import os

import trio

from .app import open_aurora


async def main(options: dict[str, object]) -> None:
    async with open_aurora(**options) as aurora:  # type: ignore[arg-type]
        port = aurora.server.port
        print(f"Aurora chatbot on ws://127.0.0.1:{port} (agents: /kubectl-agent;"
              f" the chat page: http://127.0.0.1:{port}/chat)", flush=True)  # fmt: skip
        await trio.sleep_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m examples.aurora", description=__doc__)
    parser.add_argument("--port", type=int, default=5006, help="0 picks a free port")
    parser.add_argument("--chunk-delay", type=float, default=0.05, help="seconds between frames")
    parser.add_argument("--workflow-timeout", type=float, default=1800.0, help="seconds")
    parser.add_argument("--agent-token", default=os.environ.get("AURORA_AGENT_TOKEN"),
                        help="agents' bearer token (default: $AURORA_AGENT_TOKEN)")  # fmt: skip
    parser.add_argument("--log-level", default="warning", help="debug, info, warning, error")
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main, vars(parser.parse_args()))
