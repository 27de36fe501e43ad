"""The proxy's front against broken and hostile clients (SPEC §4), over raw sockets to real processes.

Every probe runs against ``relay-idem proxy`` as its own process in front of the test upstream,
which counts what it receives in its own process: "nothing was forwarded" is counted outside the
proxy. Limits are the flags' small values, so each probe takes seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.proxy_upstream import big_body
from tests.relay_processes import MESSAGE, PROBLEM, calls, keyed, new_id, running_proxy, wait_for

pytestmark = pytest.mark.anyio

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 1.0
SEND_TIMEOUT = 1.0
MAX_CONNECTIONS = 20


@pytest.fixture(scope="module")
def proxy(upstream: str) -> Iterator[tuple[str, int]]:
    """One proxy with small limits for the whole module; yields its URL and pid."""
    options = (
        *("--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT)),
        *("--send-timeout", str(SEND_TIMEOUT), "--max-response-bytes", "16MiB"),
    )
    with running_proxy(upstream, *options) as (url, process):
        yield url, process.pid


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


async def open_connection(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*address(url))


async def exchange(url: str, data: bytes) -> bytes:
    """Send ``data`` as it is, then read until the proxy closes the connection."""
    reader, writer = await open_connection(url)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(-1), timeout=15)
    finally:
        writer.close()


def head_and_body(response: bytes) -> tuple[bytes, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    return head, body


def problem_type(response: bytes) -> str:
    head, body = head_and_body(response)
    assert f"content-type: {PROBLEM}".encode() in head.lower()
    kind: str = json.loads(body)["type"]
    return kind


def content_length(response: bytes) -> int:
    head = head_and_body(response)[0].lower()
    return int(head.split(b"content-length: ")[1].split(b"\r\n")[0])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1])


# --- framing: conflicts are 400, and nothing hidden in a body reaches the upstream -----------------


def smuggling(outer: str, inner: str) -> dict[str, bytes]:
    """Requests whose framing is ambiguous, each with a second request hidden where a body would be."""
    hidden = f"GET /echo?id={inner} HTTP/1.1\r\nHost: upstream\r\n\r\n".encode()
    head = f"POST /echo?id={outer} HTTP/1.1\r\nHost: proxy\r\n".encode()
    chunked = b"0\r\n\r\n" + hidden
    return {
        "content-length then transfer-encoding": head
        + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(chunked)
        + chunked,
        "transfer-encoding then content-length": head
        + b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n" % len(chunked)
        + chunked,
        "two different content-lengths": head
        + b"Content-Length: 5\r\nContent-Length: %d\r\n\r\nhello" % (5 + len(hidden))
        + hidden,
        "bad chunk size": head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n" + hidden + b"0\r\n\r\n",
        "chunk size overflow": head + b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffff5\r\nhello\r\n" + hidden,
        "obsolete line folding": head + b"X-Folded: a\r\n b\r\nContent-Length: %d\r\n\r\n" % len(hidden) + hidden,
        "transfer-encoding not ending in chunked": head + b"Transfer-Encoding: chunked, gzip\r\n\r\n" + hidden,
    }


CASES = list(smuggling("outer", "inner"))


@pytest.mark.parametrize("case", CASES)
async def test_ambiguous_framing_is_400_and_nothing_reaches_the_upstream(
    proxy: tuple[str, int], upstream: str, client: httpx.AsyncClient, case: str
) -> None:
    url, _ = proxy
    outer, inner = new_id(), new_id()
    response = await exchange(url, smuggling(outer, inner)[case])
    assert response.startswith(b"HTTP/1.1 400 "), response[:200]
    assert problem_type(response).endswith("/malformed-request")
    assert b"connection: close" in head_and_body(response)[0].lower()
    assert len(head_and_body(response)[1]) == content_length(response)  # one answer, then the connection closed
    assert (await calls(client, upstream, outer))["calls"] == 0
    assert (await calls(client, upstream, inner))["calls"] == 0


async def test_well_framed_pipelined_requests_are_answered_in_order(
    proxy: tuple[str, int], upstream: str, client: httpx.AsyncClient
) -> None:
    url, _ = proxy
    first, second = new_id(), new_id()
    data = (
        f"POST /echo?id={first} HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + b"5\r\nhello\r\n0\r\n\r\n"
        + f"GET /echo?id={second} HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n".encode()
    )
    response = await exchange(url, data)
    answers = response.split(b"HTTP/1.1 200 OK\r\n")
    assert len(answers) == 3, response
    assert json.loads(head_and_body(answers[1])[1])["body_size"] == 5
    assert json.loads(head_and_body(answers[2])[1])["method"] == "GET"
    assert (await calls(client, upstream, first))["calls"] == 1
    assert (await calls(client, upstream, second))["calls"] == 1


async def test_a_pipelined_head_over_the_limit_is_not_forwarded(
    proxy: tuple[str, int], upstream: str, client: httpx.AsyncClient
) -> None:
    url, _ = proxy
    first, second = new_id(), new_id()
    # Both heads in one write: the second starts inside the read that ends the first.
    data = (
        f"GET /echo?id={first} HTTP/1.1\r\nHost: proxy\r\n\r\n".encode()
        + f"GET /echo?id={second} HTTP/1.1\r\nHost: proxy\r\nX-Big: ".encode()
        + b"b" * (70 * 1024)
        + b"\r\n\r\n"
    )
    response = await exchange(url, data)
    assert response.startswith(b"HTTP/1.1 200 ")  # the first is answered, then the connection closes
    assert (await calls(client, upstream, first))["calls"] == 1
    assert (await calls(client, upstream, second))["calls"] == 0


async def test_an_upgrade_request_is_answered_as_a_plain_request_and_the_connection_closes(
    proxy: tuple[str, int], upstream: str, client: httpx.AsyncClient
) -> None:
    url, _ = proxy
    name = new_id()
    head = f"GET /echo?id={name} HTTP/1.1\r\nHost: proxy\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    response = await exchange(url, head.encode() + b"websocket frames")
    assert response.startswith(b"HTTP/1.1 200 ")
    seen = {name for name, _ in json.loads(head_and_body(response)[1])["headers"]}
    assert not {"upgrade", "connection"} & seen
    assert (await calls(client, upstream, name))["calls"] == 1
    with_body = f"POST /echo?id={name} HTTP/1.1\r\nHost: proxy\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
    refused = await exchange(url, with_body.encode() + b"Content-Length: 5\r\n\r\nhello")
    assert refused.startswith(b"HTTP/1.1 400 ")
    assert (await calls(client, upstream, name))["calls"] == 1


async def test_expect_100_continue_gets_100_before_the_body(proxy: tuple[str, int]) -> None:
    url, _ = proxy
    reader, writer = await open_connection(url)
    head = f"POST /echo?id={new_id()} HTTP/1.1\r\nHost: proxy\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    writer.write(head.encode())
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    status = await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout=10)
    writer.close()
    assert status.startswith(b"HTTP/1.1 200 ")


# --- hostile clients ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_slow_heads_are_dropped_after_the_header_timeout_while_others_are_served(
    proxy: tuple[str, int], client: httpx.AsyncClient
) -> None:
    url, _ = proxy
    slow_count = 200

    async def slow_head() -> float:
        """A head that never ends: one header line every half second. Returns when it was cut off."""
        reader, writer = await open_connection(url)
        began = time.monotonic()
        writer.write(b"POST /echo HTTP/1.1\r\nHost: proxy\r\n")
        try:
            while True:
                try:
                    if await asyncio.wait_for(reader.read(1024), timeout=0.5) == b"":
                        return time.monotonic() - began
                except TimeoutError:
                    writer.write(b"X-Slow: 1\r\n")
        except ConnectionError:
            return time.monotonic() - began
        finally:
            writer.close()

    slow = [asyncio.create_task(slow_head()) for _ in range(slow_count)]
    served = 0
    while not all(task.done() for task in slow):
        response = await client.post(f"{url}/echo", params={"id": new_id()}, content=MESSAGE)
        assert response.status_code == 200
        served += 1
        await asyncio.sleep(0.1)
        assert served < 400, "the slow heads were not dropped"  # ~40 s: a hang guard, not a timing claim
    lifetimes = [task.result() for task in slow]
    assert min(lifetimes) >= HEADER_TIMEOUT - 0.05  # none cut off early
    assert served >= 2  # normal requests went through while the slow heads were open (each one 200)


@pytest.mark.slow
async def test_a_head_over_the_limit_is_431_forwards_nothing_and_is_not_buffered(
    proxy: tuple[str, int], upstream: str, client: httpx.AsyncClient
) -> None:
    url, pid = proxy
    name = new_id()
    size = 32 * 1024 * 1024
    before = rss_kib(pid)
    reader, writer = await open_connection(url)
    writer.write(f"POST /echo?id={name} HTTP/1.1\r\nHost: proxy\r\nX-Huge: ".encode())

    async def send_huge() -> None:
        line = b"a" * (1024 * 1024)
        for _ in range(size // len(line)):
            writer.write(line)
            await writer.drain()

    sending = asyncio.create_task(send_huge())
    try:
        response = await asyncio.wait_for(reader.read(-1), timeout=15)
    finally:
        sending.cancel()
        writer.close()
    assert response.startswith(b"HTTP/1.1 431 "), response[:200]
    assert problem_type(response).endswith("/header-too-large")
    assert (await calls(client, upstream, name))["calls"] == 0
    grown_kib = rss_kib(pid) - before
    assert grown_kib < 4 * 1024, f"the proxy grew by {grown_kib} KiB on a {size // 1024} KiB header"
    # And the proxy is fine: a normal request is served.
    assert (await client.post(f"{url}/echo", params={"id": new_id()}, content=MESSAGE)).status_code == 200


@pytest.mark.slow
async def test_a_stalled_body_is_408_and_its_key_is_free_for_the_retry(
    proxy: tuple[str, int], upstream: str, client: httpx.AsyncClient
) -> None:
    url, _ = proxy
    name, key = new_id(), new_id()
    head = (
        f"POST /work?id={name} HTTP/1.1\r\nHost: proxy\r\nIdempotency-Key: {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(MESSAGE)}\r\n\r\n"
    )
    began = time.monotonic()
    response = await exchange(url, head.encode() + MESSAGE[:10])  # and then nothing more
    assert time.monotonic() - began >= BODY_TIMEOUT - 0.05
    assert response.startswith(b"HTTP/1.1 408 "), response[:200]
    assert problem_type(response).endswith("/request-timeout")
    assert (await calls(client, upstream, name))["started"] == 0

    retry = await client.post(f"{url}/work", params={"id": name}, content=MESSAGE, headers=keyed(key))
    assert retry.status_code == 200
    assert "idempotent-replayed" not in retry.headers  # executed: the key was free
    assert (await calls(client, upstream, name))["calls"] == 1


@pytest.mark.slow
async def test_a_body_that_keeps_coming_slower_than_the_body_timeout_in_total_is_served(
    proxy: tuple[str, int], upstream: str, client: httpx.AsyncClient
) -> None:
    """The body timeout bounds each gap between reads, not the whole body."""
    url, _ = proxy
    name, key = new_id(), new_id()
    reader, writer = await open_connection(url)
    head = (
        f"POST /echo?id={name} HTTP/1.1\r\nHost: proxy\r\nIdempotency-Key: {key}\r\n"
        f"Content-Length: {len(MESSAGE)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode())
    began = time.monotonic()
    pieces = [MESSAGE[start : start + 6] for start in range(0, len(MESSAGE), 6)]
    for piece in pieces:
        await asyncio.sleep(BODY_TIMEOUT / 5)  # gaps well inside the timeout, even on a loaded machine
        writer.write(piece)
    response = await asyncio.wait_for(reader.read(-1), timeout=15)
    writer.close()
    assert time.monotonic() - began > BODY_TIMEOUT * 2  # longer in total than the timeout
    assert response.startswith(b"HTTP/1.1 200 "), response[:200]
    assert json.loads(head_and_body(response)[1])["body_size"] == len(MESSAGE)
    assert (await calls(client, upstream, name))["calls"] == 1


@pytest.mark.slow
async def test_a_client_that_does_not_read_is_cut_off_and_its_record_is_completed(
    proxy: tuple[str, int], upstream: str, client: httpx.AsyncClient
) -> None:
    url, _ = proxy
    name, key, size = new_id(), new_id(), 8 * 1024 * 1024
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    sock.connect(address(url))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    head = (
        f"POST /big?id={name}&size={size} HTTP/1.1\r\nHost: proxy\r\nIdempotency-Key: {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(MESSAGE)}\r\n\r\n"
    )
    writer.write(head.encode() + MESSAGE)
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout=10)).startswith(b"HTTP/1.1 200 ")

    async def replayed() -> bool:
        # Until the record is completed, the same key is "in progress" (409).
        retry = await client.post(f"{url}/big", params={"id": name, "size": size}, content=MESSAGE, headers=keyed(key))
        return retry.status_code == 200 and retry.headers.get("idempotent-replayed") == "true"

    # The client reads nothing more; the proxy cuts it off after the send timeout and completes the record.
    await wait_for(replayed, timeout=30, interval=0.2, what="the replay of the record")
    received = 0
    with contextlib.suppress(ConnectionError):  # the proxy aborted the connection: a reset, or an early end
        while chunk := await asyncio.wait_for(reader.read(1024 * 1024), timeout=10):
            received += len(chunk)
    writer.close()
    assert received < size
    retry = await client.post(f"{url}/big", params={"id": name, "size": size}, content=MESSAGE, headers=keyed(key))
    assert retry.content == big_body(size)
    assert (await calls(client, upstream, name))["calls"] == 1


@pytest.mark.slow
async def test_connections_past_the_cap_are_turned_away_and_the_connected_are_served(upstream: str) -> None:
    with running_proxy(upstream, "--max-connections", str(MAX_CONNECTIONS)) as (url, _process):
        async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=1)) as connected:
            assert (await connected.get(f"{url}/echo")).status_code == 200  # holds one of the slots
            idle = [await open_connection(url) for _ in range(MAX_CONNECTIONS - 1)]  # and these the rest

            async def turned_away() -> bool:
                reader, writer = await open_connection(url)
                try:
                    answer = await asyncio.wait_for(reader.read(-1), timeout=10)
                except ConnectionError:
                    return True  # refused is as good as 503
                finally:
                    writer.close()
                return answer.startswith(b"HTTP/1.1 503 ") and problem_type(answer).endswith("/too-many-connections")

            for _ in range(5):
                assert await turned_away()
                # The client that was already connected keeps its connection and is served.
                assert (await connected.get(f"{url}/echo")).status_code == 200
            for _reader, writer in idle:
                writer.close()

            async def admitted() -> bool:
                async with httpx.AsyncClient(timeout=10) as fresh:
                    return (await fresh.get(f"{url}/echo")).status_code == 200

            await wait_for(admitted, timeout=10, what="a new connection to be admitted once slots were free")
