"""The seed's full-stack demo: EchoWorker behind REST, WebSocket and SSE on port 8080,
with the response cache (memory, or Redis with REDIS_URL), per-session rate limits (100
requests a minute unless RATE_LIMIT_REQUESTS / RATE_LIMIT_WINDOW say otherwise),
deduplication and priorities.

    python examples/web_api_demo.py            # or SERVER_PORT=9000 python examples/...

Then, from another shell, submit a prompt (keeping its request_id) and fetch the result:

    ID=$(curl -s localhost:8080/api/v1/infer -H 'content-type: application/json' \\
         -d '{"prompt": "What is the capital of France?", "session_id": "user-123",
              "metadata": {"priority": "high"}}' \\
         | python3 -c 'import json, sys; print(json.load(sys.stdin)["request_id"])')
    curl -s localhost:8080/api/v1/result/$ID
"""

from __future__ import annotations

import logging

import attrs

from orchestrator_server import ServerConfig, run_server


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = ServerConfig.from_env(worker="echo")
    if config.rate_limit_requests is None:
        config = attrs.evolve(config, rate_limit_requests=100, rate_limit_window=60.0)
    run_server(config)  # logs what it serves; Ctrl-C or SIGTERM drains, then exit status 0


if __name__ == "__main__":
    main()
