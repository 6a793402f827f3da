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
    from orchestrator.distributed import ClusterConfig
    from orchestrator_server._loop import run
    from orchestrator_server._processes import inherited_socket, serve_processes
    from orchestrator_server.app import run_server
    from orchestrator_server.config import ServerConfig
    from orchestrator_server.workers import WORKERS, make_worker


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator-server",
        description="Serve the prompt orchestrator over REST, WebSocket and SSE.",
        epilog="Environment: SERVER_HOST, SERVER_PORT, REDIS_URL, RATE_LIMIT_REQUESTS, "
        "RATE_LIMIT_WINDOW, CORS_ORIGINS, ORCHESTRATOR_WORKER, ORCHESTRATOR_ROLE, "
        "ORCHESTRATOR_REDIS_PREFIX, ORCHESTRATOR_SHARED_CAPACITY, ORCHESTRATOR_RECLAIM_AFTER, "
        "ORCHESTRATOR_MAX_DELIVERIES, and each worker's own "
        "(OPENAI_API_KEY, ANTHROPIC_API_KEY, LLAMA_CPP_URL, VLLM_URL, ...).",
    )
    parser.add_argument("--host", help="interface to bind (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="TCP port (default 8080 or $SERVER_PORT)")
    parser.add_argument(
        "--worker",
        help=f"model worker: {', '.join(sorted(WORKERS))}, or package.module:factory "
        "(default echo)",
    )
    parser.add_argument(
        "--redis-url", help="share the pipeline over this Redis (default $REDIS_URL)"
    )
    parser.add_argument(
        "--role",
        choices=["both", "frontend"],
        help="with Redis: run requests here too (both, the default) or only admit and "
        "answer them (frontend; orchestrator-worker processes run them)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="server processes (more than 1 needs Redis)"
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
        for key, value in (
            ("host", args.host),
            ("port", args.port),
            ("worker", args.worker),
            ("redis_url", args.redis_url),
            ("role", args.role),
        )
        if value is not None
    }
    try:
        config = ServerConfig.from_env(**overrides)
        if config.redis_url is not None:
            ClusterConfig.from_env()  # its variables are checked now, not at startup
    except (ValueError, TypeError) as exc:
        print(f"orchestrator-server: {exc}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"orchestrator-server: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    if args.workers > 1 and config.redis_url is None:
        print(
            "orchestrator-server: --workers > 1 needs --redis-url (or REDIS_URL): without "
            "a shared store, requests live in one process's memory, and a status request "
            "reaching another process would answer 404.",
            file=sys.stderr,
        )
        return 2
    if config.role == "both" or config.redis_url is None:
        try:
            run(_check_worker(config))
        except ValueError as exc:
            print(f"orchestrator-server: worker {config.worker!r}: {exc}", file=sys.stderr)
            return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.workers > 1:
        forwarded = list(argv if argv is not None else sys.argv[1:])
        return serve_processes(_without_workers(forwarded), args.workers, config.host, config.port)
    inherited = inherited_socket()
    run_server(config, sockets=None if inherited is None else [inherited])
    return 0  # after SIGINT/SIGTERM and the drain


def _without_workers(argv: list[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            kept.append(arg)
    return kept


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
