"""``python -m orchestrator_server`` / ``orchestrator-server``: run the server from a shell."""

from __future__ import annotations

import argparse
import logging
import sys

from orchestrator_server import require_server_extra

try:
    require_server_extra()
except ModuleNotFoundError as exc:  # main() says it in one line
    _missing: ModuleNotFoundError | None = exc
else:
    _missing = None
    from orchestrator_server._loop import run
    from orchestrator_server.app import run_server
    from orchestrator_server.config import ServerConfig
    from orchestrator_server.workers import WORKERS, make_worker


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator-server",
        description="Serve the prompt orchestrator over REST, WebSocket and SSE.",
        epilog="Environment: SERVER_HOST, SERVER_PORT, REDIS_URL, RATE_LIMIT_REQUESTS, "
        "RATE_LIMIT_WINDOW, CORS_ORIGINS, ORCHESTRATOR_WORKER, and each worker's own "
        "(OPENAI_API_KEY, ANTHROPIC_API_KEY, LLAMA_CPP_URL, VLLM_URL, ...).",
    )
    parser.add_argument("--host", help="interface to bind (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="TCP port (default 8080 or $SERVER_PORT)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help="model worker (default echo)")
    parser.add_argument(
        "--workers", type=int, default=1, help="processes (only 1 without a shared store)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, then serve until SIGINT/SIGTERM (requests in flight drain first)."""
    if _missing is not None:
        print(f"orchestrator-server: {_missing}", file=sys.stderr)
        return 2
    args = _parser().parse_args(argv)
    overrides = {
        key: value
        for key, value in (("host", args.host), ("port", args.port), ("worker", args.worker))
        if value is not None
    }
    try:
        config = ServerConfig.from_env(**overrides)
    except (ValueError, TypeError) as exc:
        print(f"orchestrator-server: {exc}", file=sys.stderr)
        return 2
    if args.workers != 1:
        print(
            "orchestrator-server: --workers must be 1: requests live in this process's "
            "memory, so a status request reaching another process would answer 404. "
            "Run one process per port (and a load balancer), or use the Redis-backed "
            "store when it is configured.",
            file=sys.stderr,
        )
        return 2
    try:
        run(_check_worker(config))
    except ValueError as exc:
        print(f"orchestrator-server: worker {config.worker!r}: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run_server(config)  # returns after SIGINT/SIGTERM and the drain: exit status 0
    return 0


async def _check_worker(config: ServerConfig) -> None:
    """Build the worker once before serving, so a missing key or model, or a URL that
    points at this very server, is a one-line error at the prompt, not a traceback from
    the server's startup (or a server calling itself)."""
    worker = make_worker(config.worker, server_address=(config.host, config.port))
    aclose = getattr(worker, "aclose", None)
    if aclose is not None:
        await aclose()


if __name__ == "__main__":
    sys.exit(main())
