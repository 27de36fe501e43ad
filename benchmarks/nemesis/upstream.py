"""The nemesis's upstream: every execution is appended to a file, outside the proxy, before it answers.

``python -m benchmarks.nemesis.upstream --ports P1,P2 --log FILE`` serves one app on several ports
(one per proxy process, so each execution says which proxy process sent it). Each request to
``POST /exec?key=K`` appends ``{"key", "t", "port", "status", "execution"}`` to FILE with one
``write`` on an ``O_APPEND`` descriptor *before* it waits and answers: a write that returned is in
the page cache, so it survives a SIGKILL of this process. ``status`` is drawn when the request
arrives: mostly 201 with a body naming the execution (so a second execution of a key is visible in
the bytes a client gets), sometimes 503 — "not processed, try again" — which the proxy releases.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import time
import uuid
from typing import Any
from urllib.parse import parse_qs

import uvicorn

Scope = dict[str, Any]
Message = dict[str, Any]

BUSY_SHARE = 0.04  # answered 503 (released by the proxy: a retry executes again, legitimately)
MAX_DELAY = 0.25  # seconds an execution takes at most: kills and stalls land inside executions
UPSTREAM_HEADER = (b"x-nemesis-upstream", b"1")  # marks the app's own answers, 503 included


class Recorder:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(self, **fields: Any) -> None:
        os.write(self.fd, (json.dumps(fields) + "\n").encode())


def build_app(recorder: Recorder) -> Any:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        query = parse_qs(scope["query_string"].decode())
        if scope["path"] != "/exec" or "key" not in query:
            await respond(send, 200, b"ok", b"text/plain")
            return
        status = 503 if random.random() < BUSY_SHARE else 201
        execution = uuid.uuid4().hex
        recorder.record(key=query["key"][0], t=time.time(), port=scope["server"][1], status=status, execution=execution)
        await asyncio.sleep(random.uniform(0, MAX_DELAY))
        if status == 503:
            body = json.dumps({"type": "tag:nemesis,2026:busy", "title": "busy", "status": 503}).encode()
            await respond(send, 503, body, b"application/problem+json")
            return
        body = json.dumps({"key": query["key"][0], "execution": execution}).encode()
        await respond(send, 201, body, b"application/json")

    return app


async def respond(send: Any, status: int, body: bytes, content_type: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), UPSTREAM_HEADER]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ports", required=True, help="comma-separated ports on 127.0.0.1")
    parser.add_argument("--log", required=True, help="append-only file of executions")
    args = parser.parse_args()
    sockets = []
    for port in args.ports.split(","):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", int(port)))
        sockets.append(sock)
    config = uvicorn.Config(build_app(Recorder(args.log)), log_level="warning", lifespan="off")
    uvicorn.Server(config).run(sockets=sockets)


if __name__ == "__main__":
    main()
