"""SPEC §8.1-8.3 through a real proxy with --workers 2 on Redis, its routes from a --config file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from tests.relay_processes import calls, new_id, running_proxy
from tests.test_proxy_processes import both_workers

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROUTES = """
workers = 2
on_conflict = "wait"
replay_exclude_header = ["set-cookie"]

[[route]]
path = "/work/github"
key = "header:X-GitHub-Delivery"
require_key = true

[[route]]
path = "/work/shop"
key = "json:event.id"
require_key = true
"""


async def redeliver_100_times(client: httpx.AsyncClient, url: str, headers: dict[str, str], body: bytes) -> None:
    responses = await asyncio.gather(*(client.post(url, content=body, headers=headers) for _ in range(100)))
    assert {response.status_code for response in responses} == {200}
    assert len({response.content for response in responses}) == 1
    assert sum(response.headers.get("idempotent-replayed") == "true" for response in responses) == 99


async def test_webhook_redeliveries_through_two_workers_execute_once(
    upstream: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f'redis = "{redis_url}"\nprefix = "{prefix}"\n{ROUTES}')
    github, shop = new_id(), new_id()
    with running_proxy(upstream, "--config", str(config), env={"TMPDIR": str(tmp_path)}) as (proxy, _):
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
            await both_workers(client, proxy)
            # A GitHub-style delivery: the sender's own delivery id is the key.
            delivery = {"X-GitHub-Delivery": f"72d3162e-{github}", "X-GitHub-Event": "push"}
            url = f"{proxy}/work/github?id={github}&seconds=0.5"
            await redeliver_100_times(client, url, delivery, b'{"ref": "refs/heads/main"}')
            # A shop event: the key is a field of the JSON body.
            event = json.dumps({"event": {"id": f"evt_{shop}", "type": "order.paid"}}).encode()
            await redeliver_100_times(client, f"{proxy}/work/shop?id={shop}&seconds=0.5", {}, event)
            assert (await calls(client, upstream, github))["calls"] == 1
            assert (await calls(client, upstream, shop))["calls"] == 1
            # The routes require their key source: no delivery id, or no event id, is a 400.
            missing = await client.post(f"{proxy}/work/github?id={github}", headers={"Idempotency-Key": "k"})
            no_field = await client.post(f"{proxy}/work/shop?id={shop}", content=b'{"event": {}}')
            invalid = await client.post(f"{proxy}/work/shop?id={shop}", content=b'{"event": {"id": 1.5}}')
            assert [missing.status_code, no_field.status_code, invalid.status_code] == [400, 400, 400]
            assert [response.json()["type"].rsplit("/", 1)[-1] for response in (missing, no_field, invalid)] == [
                "key-required", "key-required", "invalid-key",
            ]  # fmt: skip
            # Elsewhere the global options hold: no key, no idempotency.
            plain = [await client.post(f"{proxy}/work/other?id={github}-plain") for _ in range(2)]
            assert [response.status_code for response in plain] == [200, 200]
            assert (await calls(client, upstream, f"{github}-plain"))["calls"] == 2
            # Excluded response headers are not replayed.
            cookies = f"{proxy}/cookies?id={github}"
            first = await client.post(cookies, headers={"Idempotency-Key": f"c-{github}"})
            again = await client.post(cookies, headers={"Idempotency-Key": f"c-{github}"})
            assert len(first.headers.get_list("set-cookie")) == 2
            assert again.headers.get("idempotent-replayed") == "true" and "set-cookie" not in again.headers
