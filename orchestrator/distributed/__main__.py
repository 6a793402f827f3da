"""``orchestrator-worker`` / ``python -m orchestrator.distributed``: a worker process.

It takes requests from the shared queue on ``--redis-url`` (or ``REDIS_URL``) and runs
them with ``--worker`` (a name: echo, openai, anthropic, llama_cpp, vllm; or an import
path ``package.module:factory`` returning a ``ModelWorker``), ``--max-concurrency`` calls
at once. On SIGTERM or SIGINT it stops taking work, hands back at once what it took and
had not started, lets its running calls finish for ``--drain-seconds``, hands back what
is left, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from orchestrator._urls import redact_url

__all__ = ["main"]

logger = logging.getLogger("orchestrator.worker")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator-worker",
        description="Run prompt-orchestrator requests from a shared Redis queue.",
        epilog="Environment: REDIS_URL, ORCHESTRATOR_WORKER, ORCHESTRATOR_REDIS_PREFIX, "
        "ORCHESTRATOR_RECLAIM_AFTER, ORCHESTRATOR_MAX_DELIVERIES, and each worker's own "
        "(OPENAI_API_KEY, ANTHROPIC_API_KEY, LLAMA_CPP_URL, VLLM_URL, ...).",
    )
    parser.add_argument(
        "--worker", help="echo, openai, anthropic, llama_cpp, vllm, or package.module:factory"
    )
    parser.add_argument("--redis-url", help="the shared Redis (default $REDIS_URL)")
    parser.add_argument("--max-concurrency", type=int, default=8, help="calls at once")
    parser.add_argument(
        "--drain-seconds", type=float, default=30.0, help="how long running calls may finish"
    )
    parser.add_argument(
        "--prefix", help="the keys' prefix in Redis (default $ORCHESTRATOR_REDIS_PREFIX or orch:)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, then run until SIGINT/SIGTERM; one line and exit 2 on bad input."""
    args = _parser().parse_args(argv)
    url = args.redis_url or os.environ.get("REDIS_URL")
    name = args.worker or os.environ.get("ORCHESTRATOR_WORKER") or "echo"
    problem = None
    if not url:
        problem = "--redis-url (or REDIS_URL) is required: the queue lives in Redis"
    elif not url.startswith(("redis://", "rediss://", "unix://")):
        problem = f"the Redis URL must look like redis://host:6379/0, got {redact_url(url)!r}"
    elif args.max_concurrency < 1:
        problem = f"--max-concurrency must be >= 1, got {args.max_concurrency}"
    elif args.drain_seconds < 0:
        problem = f"--drain-seconds must be >= 0, got {args.drain_seconds}"
    if problem is not None:
        print(f"orchestrator-worker: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return asyncio.run(_serve(url, name, args))  # type: ignore[arg-type]
    except _Refused as exc:
        print(f"orchestrator-worker: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once
        return 130


class _Refused(Exception):
    pass


async def _serve(url: str, name: str, args: argparse.Namespace) -> int:
    from orchestrator import PipelineConfig, spawn_pipeline
    from orchestrator.distributed import ClusterConfig
    from orchestrator.hooks import DEFAULT_TEMPLATE, default_retriever
    from orchestrator.workers._named import build_worker

    try:
        worker = build_worker(name)
        seed_demo = name == "echo"
        config = PipelineConfig(
            max_concurrency=args.max_concurrency,
            drain_timeout=args.drain_seconds,
            retriever=default_retriever if seed_demo else None,
            template=DEFAULT_TEMPLATE if seed_demo else "{input}",
        )
        handles = spawn_pipeline(
            worker,
            config,
            redis_url=url,
            role="worker",
            cluster=ClusterConfig.from_env(
                **({} if args.prefix is None else {"prefix": args.prefix})
            ),
        )
    except (ValueError, TypeError, ImportError) as exc:
        raise _Refused(f"worker {name!r}: {exc}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logger.info(
        "worker %s: taking requests from %s (max concurrency %d)",
        name,
        redact_url(url),
        args.max_concurrency,
    )
    try:
        await stop.wait()
        logger.info("stopping: handing back what has not started, draining the rest")
        await handles.shutdown()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        aclose = getattr(worker, "aclose", None)
        if aclose is not None:
            await aclose()
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
