"""dorgu: the operator's WebSocket server (topics, requests, live events) on tidings."""
