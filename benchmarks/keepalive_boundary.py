"""Requests sent just as the upstream closes an idle keep-alive connection: how many fail, per client.

    python -m benchmarks.keepalive_boundary [--client httptools|aiohttp] [--warm]

The upstream is tests/proxy_upstream.py under uvicorn with a 0.2 s keep-alive. 8 workers, each with
its own pooled client (so its one connection is idle for exactly the gap), send 25 POSTs each, one
every 0.2 s ± 12 ms. ``--warm`` first lets the upstream close one idle connection per pool (what a
pool that has been running for a while has seen). Prints how many requests failed, how many of
those the upstream never saw, and how many it saw twice (issue 9, item 4).
"""

from __future__ import annotations

import argparse
import asyncio

import httpx
import uvloop

from relay_idem.upstream import UPSTREAM_CLIENTS, UpstreamError, open_upstream
from tests.relay_processes import running_upstream

KEEP_ALIVE, WORKERS, ROUNDS = 0.2, 8, 25


async def measure(client_name: str, warm: bool) -> str:
    failed: list[str] = []
    with running_upstream(keep_alive=KEEP_ALIVE) as url:

        async def worker(number: int) -> None:
            upstream = open_upstream(client_name, url, timeout=5)  # type: ignore[arg-type]
            try:
                if warm:
                    response = await upstream.send("GET", "/calls", [], None)
                    await response.close()
                    await asyncio.sleep(KEEP_ALIVE * 1.5)
                for round_number in range(ROUNDS):
                    name = f"w{number}-r{round_number}"
                    try:
                        response = await upstream.send("POST", f"/echo?id={name}", [], b"{}")
                        [chunk async for chunk in response.body()]
                        await response.close()
                    except UpstreamError:
                        failed.append(name)
                    await asyncio.sleep(KEEP_ALIVE + ((number * ROUNDS + round_number) % 25 - 12) / 1000)
            finally:
                await upstream.close()

        await asyncio.gather(*(worker(number) for number in range(WORKERS)))
        async with httpx.AsyncClient() as client:
            counts = {
                name: (await client.get(f"{url}/calls", params={"id": name})).json()["calls"]
                for name in (f"w{n}-r{r}" for n in range(WORKERS) for r in range(ROUNDS))
            }
    unseen = sum(1 for name in failed if counts[name] == 0)
    twice = sum(1 for count in counts.values() if count > 1)
    return (
        f"{client_name} ({'warm' if warm else 'cold'}): {len(counts)} requests, {len(failed)} failed "
        f"({unseen} of them never reached the upstream), {twice} executed twice"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", choices=UPSTREAM_CLIENTS, default="httptools")
    parser.add_argument("--warm", action="store_true")
    options = parser.parse_args()
    print(uvloop.run(measure(options.client, options.warm)))


if __name__ == "__main__":
    main()
