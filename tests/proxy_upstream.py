"""The upstream the proxy tests put ``relay-idem proxy`` in front of: a raw ASGI app served by uvicorn.

``uvicorn tests.proxy_upstream:app --port N``. Every endpoint that does work counts its calls under
the ``id`` query parameter, so a test reads how often the upstream really executed with
``GET /calls?id=…`` (the count lives in the upstream process, outside the proxy).

    ANY  /echo                  200 JSON: method, path, query, headers (in order), body size and sha256
    POST /work?id=&seconds=     sleeps, then 200 JSON with a fresh uuid (tells an execution from a replay);
                                also under /work/<anything>, for tests that route by path
    POST /stream?id=            200, streams "first;" and waits for GET /release?id= before the rest
    POST /big?id=&size=         200, ``size`` deterministic bytes in 64 KiB chunks with Content-Length
    POST /cookies?id=           200 with two Set-Cookie headers and hop-by-hop headers that must not pass
    GET  /calls?id=             {"calls": N, "started": N}
    GET  /release?id=           lets /stream?id= finish
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import uuid
from collections import Counter
from typing import Any
from urllib.parse import parse_qs

from tests.apps import read_request_body, respond

Scope = dict[str, Any]
Message = dict[str, Any]

CHUNK = 64 * 1024
STREAM_FIRST = b"first;"
STREAM_REST = [b"second;", b"third."]
STREAM_GATE_TIMEOUT = 10.0

calls: Counter[str] = Counter()
releases: dict[str, asyncio.Event] = {}


def big_body(size: int) -> bytes:
    """``size`` bytes that are not all alike, so a truncation or a reordering shows."""
    pattern = bytes(range(256)) * (CHUNK // 256)
    return (pattern * (size // len(pattern) + 1))[:size]


JSON = [(b"content-type", b"application/json")]


def release_event(name: str) -> asyncio.Event:
    return releases.setdefault(name, asyncio.Event())


async def app(scope: Scope, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    query = {name: values[0] for name, values in parse_qs(scope["query_string"].decode()).items()}
    name = query.get("id", "")
    path = scope["path"]
    body = await read_request_body(receive)
    if path == "/calls":
        document = {"calls": calls[name], "started": calls[f"started:{name}"]}
        await respond(send, 200, json.dumps(document).encode(), JSON)
    elif path == "/release":
        release_event(name).set()
        await respond(send, 200, b"{}", JSON)
    elif path == "/echo":
        calls[name] += 1
        document = {
            "method": scope["method"],
            "path": path,
            "query": scope["query_string"].decode(),
            "headers": [[key.decode("latin-1"), value.decode("latin-1")] for key, value in scope["headers"]],
            "body_size": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
        await respond(send, 200, json.dumps(document).encode(), JSON)
    elif path == "/work" or path.startswith("/work/"):
        calls[f"started:{name}"] += 1
        await asyncio.sleep(float(query.get("seconds", "0")))
        calls[name] += 1
        await respond(send, int(query.get("status", "200")), json.dumps({"run": uuid.uuid4().hex}).encode(), JSON)
    elif path == "/stream":
        calls[name] += 1
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": STREAM_FIRST, "more_body": True})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release_event(name).wait(), STREAM_GATE_TIMEOUT)
        for chunk in STREAM_REST:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/big":
        calls[name] += 1
        data = big_body(int(query["size"]))
        headers = [(b"content-type", b"application/octet-stream"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for start in range(0, len(data), CHUNK):
            await send({"type": "http.response.body", "body": data[start : start + CHUNK], "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/cookies":
        calls[name] += 1
        headers = [
            (b"content-type", b"text/plain"),
            (b"set-cookie", b"session=abc; Path=/; HttpOnly"),
            (b"x-between", b"1"),
            (b"set-cookie", b"theme=dark; Path=/"),
            (b"connection", b"x-upstream-hop"),
            (b"x-upstream-hop", b"must not pass"),
            (b"keep-alive", b"timeout=5"),
        ]
        await respond(send, 200, b"cookies", headers)
    else:
        await respond(send, 404, b'{"error": "no such path"}', JSON)


if __name__ == "__main__":  # python -m tests.proxy_upstream PORT KEEP_ALIVE: a keep-alive timeout under 1 s
    import sys

    import uvicorn

    port, keep_alive = int(sys.argv[1]), float(sys.argv[2])
    uvicorn.run(app, host="127.0.0.1", port=port, timeout_keep_alive=keep_alive, log_level="warning")
