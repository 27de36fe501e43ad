"""The history-recording client: many logical requests, each retried with its key the way SDKs do.

The retry policy is the Stripe SDK's: retry on a connection error or timeout, 409, 429 and every
5xx, with exponential backoff and jitter (0.5 s doubling up to 5 s here, as stripe-python), a
``Retry-After`` honoured up to that cap, the same key and body every time. Each logical request
keeps trying for ``retry_budget`` seconds (``RETRY_BUDGET`` by default). After its first 2xx,
some logical requests repeat once or twice more later (a client that did not see the answer, a
redelivered job), and some start with two attempts at once (a double submit): their answers are
what the checker compares with that first 2xx. Every attempt and every answer is recorded.
"""

from __future__ import annotations

import asyncio
import json
import random
import string
import time
from dataclasses import dataclass, field

import httpx

INITIAL_DELAY = 0.5
MAX_DELAY = 5.0
RETRY_BUDGET = 60.0  # seconds a logical request keeps retrying
ATTEMPT_TIMEOUT = 10.0
REPEAT_SHARE = 0.3  # logical requests repeated after their first 2xx
DOUBLE_SUBMIT_SHARE = 0.1
KEY_ALPHABET = string.ascii_letters + string.digits


def key_for(index: int, seed: int) -> str:
    """A key whose first 4 characters are unique per index: the proxies log those 4 as the key's hint."""
    head = "".join(KEY_ALPHABET[(index // len(KEY_ALPHABET) ** power) % len(KEY_ALPHABET)] for power in range(4))
    return f"{head}-{seed}-{index}"


@dataclass
class Attempt:
    key: str
    kind: str  # "first", "retry", "double" or "repeat"
    proxy: int
    started: float
    ended: float = 0.0
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    error: str | None = None

    def header(self, name: str) -> str | None:
        return next((value for header, value in self.headers if header == name), None)


def retryable(attempt: Attempt) -> bool:
    return attempt.status is None or attempt.status in (409, 429) or attempt.status >= 500


def backoff(retries: int, attempt: Attempt, rng: random.Random) -> float:
    delay: float = min(INITIAL_DELAY * 2**retries, MAX_DELAY) * rng.uniform(0.5, 1.0)
    retry_after = attempt.header("retry-after")
    if retry_after is not None and retry_after.isdigit():
        delay = max(delay, min(float(retry_after), MAX_DELAY))
    return delay


class Client:
    """``concurrency`` logical requests in flight at once, against the proxies chosen at random."""

    def __init__(self, proxies: list[str], seed: int, concurrency: int, retry_budget: float = RETRY_BUDGET) -> None:
        self.proxies = proxies
        self.retry_budget = retry_budget
        self.seed = seed
        self.rng = random.Random(seed)
        self.concurrency = concurrency
        self.history: list[Attempt] = []
        self.logical = 0
        self.gave_up: list[str] = []
        self.http = httpx.AsyncClient(timeout=ATTEMPT_TIMEOUT, limits=httpx.Limits(max_connections=concurrency * 2))

    async def attempt(self, key: str, kind: str, body: bytes) -> Attempt:
        proxy = self.rng.randrange(len(self.proxies))
        record = Attempt(key, kind, proxy, time.time())
        self.history.append(record)
        headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
        try:
            response = await self.http.post(
                f"{self.proxies[proxy]}/exec", params={"key": key}, content=body, headers=headers
            )
        except httpx.HTTPError as exc:
            record.error = type(exc).__name__
        else:
            record.status = response.status_code
            record.headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in response.headers.raw]
            record.body = response.content
        record.ended = time.time()
        return record

    async def until_answered(self, key: str, body: bytes, kind: str, deadline: float) -> Attempt | None:
        """Attempts with backoff until one is not retryable; None if the budget ran out."""
        retries = 0
        while True:
            answer = await self.attempt(key, kind, body)
            if not retryable(answer):
                return answer
            delay = backoff(retries, answer, self.rng)
            if time.monotonic() + delay > deadline:
                return None
            retries += 1
            kind = "retry"
            await asyncio.sleep(delay)

    async def logical_request(self, index: int) -> None:
        key = key_for(index, self.seed)
        body = json.dumps({"to": f"+55119{index:08d}", "template": "nemesis", "n": index}).encode()
        deadline = time.monotonic() + self.retry_budget
        if self.rng.random() < DOUBLE_SUBMIT_SHARE:
            answers = await asyncio.gather(
                self.until_answered(key, body, "first", deadline), self.until_answered(key, body, "double", deadline)
            )
            answer = next((a for a in answers if a is not None and a.status and a.status < 300), answers[0])
        else:
            answer = await self.until_answered(key, body, "first", deadline)
        if answer is None:
            self.gave_up.append(key)
            return
        if answer.status is not None and 200 <= answer.status < 300 and self.rng.random() < REPEAT_SHARE:
            for _ in range(self.rng.randint(1, 2)):
                await asyncio.sleep(self.rng.uniform(0, 3))
                if await self.until_answered(key, body, "repeat", time.monotonic() + self.retry_budget) is None:
                    self.gave_up.append(key)

    async def run(self, seconds: float) -> None:
        """Start logical requests for ``seconds``; then let those in flight finish."""
        deadline = time.monotonic() + seconds

        async def lane() -> None:
            while time.monotonic() < deadline:
                index = self.logical
                self.logical += 1
                await self.logical_request(index)

        try:
            await asyncio.gather(*(lane() for _ in range(self.concurrency)))
        finally:
            await self.http.aclose()
