"""Serving the proxy: the front's listening socket, the app's lifespan, SIGTERM, and ``--workers N``.

One worker serves in the process that ran ``relay-idem proxy``. With ``--workers N`` that process
binds the socket, starts N worker processes that share it (``python -m relay_idem.server FD``, the
config in an environment variable), restarts a worker that dies, and on SIGTERM or SIGINT passes
the signal on and waits for them.

A worker on SIGTERM stops accepting, closes idle connections, lets every request in flight finish
(so its idempotency record is completed), runs the app's lifespan shutdown (pending writes, the
upstream pool, the store), and exits 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import logging.config
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import uvloop
from starlette.types import ASGIApp, Message

from relay_idem.config import WORKER_CONFIG_ENV, Config
from relay_idem.front import Front, Limits

logger = logging.getLogger(__name__)

BACKLOG = 2048
# A worker that dies is restarted, but not faster than this (a worker that cannot start at all).
RESTART_INTERVAL = 1.0
# Descriptors a worker needs beside one per client connection: the upstream pool, Redis, files.
FILE_MARGIN = 1024
# How often the parent looks at its workers and at the signals it got.
SUPERVISE_INTERVAL = 0.2
# New container objects between two young collections of the cycle collector (Python's default: 700).
YOUNG_COLLECTION_THRESHOLD = 7000


class LifespanFailed(RuntimeError):
    """The app's lifespan startup failed: the worker does not serve."""


class Lifespan:
    """Runs the app's ASGI lifespan: startup before the first connection, shutdown after the last."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.outbox: asyncio.Queue[Message] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        scope: dict[str, Any] = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self.task = asyncio.ensure_future(self.app(scope, self.inbox.get, self.outbox.put))
        await self.inbox.put({"type": "lifespan.startup"})
        reply = await self.reply()
        if reply["type"] != "lifespan.startup.complete":
            raise LifespanFailed(reply.get("message", "") or reply["type"])

    async def shutdown(self) -> None:
        if self.task is None or self.task.done():
            return
        await self.inbox.put({"type": "lifespan.shutdown"})
        reply = await self.reply()
        if reply["type"] != "lifespan.shutdown.complete":
            logger.error("relay-idem: lifespan shutdown failed: %s", reply.get("message", "") or reply["type"])
        await self.task

    async def reply(self) -> Message:
        assert self.task is not None
        getting = asyncio.ensure_future(self.outbox.get())
        await asyncio.wait({getting, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if getting.done():
            return getting.result()
        getting.cancel()
        error = self.task.exception()
        return {"type": "lifespan.failed", "message": repr(error) if error else "the lifespan ended early"}


def limits(config: Config) -> Limits:
    return Limits(
        max_header_bytes=config.max_header_bytes,
        header_timeout=config.header_timeout,
        body_timeout=config.body_timeout,
        send_timeout=config.send_timeout,
        max_connections=config.max_connections,
    )


async def serve(config: Config, sock: socket.socket | None = None, *, app: ASGIApp | None = None) -> None:
    """Serve ``config``'s proxy on ``sock`` (or on its host and port) until SIGTERM or SIGINT."""
    from relay_idem.proxy import build_proxy_app

    loop = asyncio.get_running_loop()
    app = app if app is not None else build_proxy_app(config)
    lifespan = Lifespan(app)
    await lifespan.startup()
    # The cycle collector, tuned for a server that owns its process (benchmarks/README.md, "The
    # proxy's CPU per request"): what is built by now lives as long as the worker, so it is frozen
    # out of the full collections' sight; and a young collection waits for 7,000 new objects, not
    # 700 — requests in flight hold a few thousand, so at 700 a first execution paid ~3 µs (up to
    # ~10 µs when a full collection came round) for collections that found no garbage.
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD)
    front = Front(app, limits(config), access_log=config.access_log)
    if sock is None:
        server = await loop.create_server(front.protocol, config.host, config.port, reuse_address=True, backlog=BACKLOG)
        logger.info("relay-idem: proxy on http://%s:%d in front of %s", config.host, config.port, config.upstream)
    else:
        server = await loop.create_server(front.protocol, sock=sock, backlog=BACKLOG)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()
    await front.shutdown()
    await lifespan.shutdown()
    await server.wait_closed()


def configure_logging(config: Config) -> None:
    from relay_idem.cli import log_config

    logging.config.dictConfig(log_config(config.log_level))


def raise_file_limit(max_connections: int) -> None:
    """Let the worker open as many descriptors as its connections and their upstream ones need.

    The soft limit is often 1024; it goes up to what the hard limit allows (nginx's
    ``worker_rlimit_nofile``). Past the limit, accepting fails and the connected are still served.
    """
    wanted = max_connections + FILE_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            logger.warning(
                "relay-idem: %d file descriptors allowed (hard limit); --max-connections %d may need %d",
                new, max_connections, wanted,
            )  # fmt: skip


def run_worker(config: Config, sock: socket.socket | None = None) -> None:
    """One worker: an uvloop event loop serving the proxy until it is told to stop."""
    configure_logging(config)
    raise_file_limit(config.max_connections)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(config, sock))


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock


def start_worker(sock: socket.socket) -> subprocess.Popen[bytes]:
    fd = sock.fileno()
    return subprocess.Popen([sys.executable, "-m", "relay_idem.server", str(fd)], pass_fds=(fd,))


def forget_metrics_of(pid: int) -> None:
    """Drop a dead worker's live gauges (relay_idem_pending_writes), so /_relay/metrics sums live workers only."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def run_workers(config: Config) -> None:
    """The parent of ``--workers N``: binds, starts and supervises the workers, forwards SIGTERM/SIGINT."""
    configure_logging(config)
    sock = listening_socket(config.host, config.port)
    os.environ[WORKER_CONFIG_ENV] = config.to_json()
    stopping: list[int] = []
    workers: list[subprocess.Popen[bytes]] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for _ in range(config.workers):
        workers.append(start_worker(sock))
    logger.info(
        "relay-idem: proxy on http://%s:%d in front of %s, %d workers",
        config.host, config.port, config.upstream, config.workers,
    )  # fmt: skip
    try:
        while not stopping:
            for index, worker in enumerate(workers):
                if worker.poll() is not None:
                    logger.warning("relay-idem: worker %d exited with %s; restarting it", worker.pid, worker.returncode)
                    forget_metrics_of(worker.pid)
                    time.sleep(RESTART_INTERVAL)
                    if not stopping:
                        workers[index] = start_worker(sock)
            time.sleep(SUPERVISE_INTERVAL)
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait()
    finally:
        sock.close()


def worker_main(argv: list[str]) -> None:
    """``python -m relay_idem.server FD``: a worker of ``--workers N`` on the parent's socket."""
    config = Config.from_environment()
    sock = socket.socket(fileno=int(argv[0]))
    run_worker(config, sock)


if __name__ == "__main__":
    worker_main(sys.argv[1:])
