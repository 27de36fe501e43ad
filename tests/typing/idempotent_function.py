"""Type-checked by mypy --strict (pyproject's mypy files): SPEC §8.4's example, and ``drain``.

Not a test module; it only has to type-check. The decorated function keeps its return type and
has ``drain()`` for shutdown. (Its parameters are typed as ``key``'s: a lambda's are ``Any``.)
"""

from relay_idem import MemoryStore, drain_pending_writes, idempotent

store = MemoryStore()


@idempotent(store, key=lambda job: f"reminder-{job['appointment_id']}", ttl=86400, complete_retry=30)
async def send_reminder(job: dict[str, int]) -> str:
    return f"sent {job['appointment_id']}"


async def worker() -> None:
    message: str = await send_reminder({"appointment_id": 42})
    print(message)
    await send_reminder.drain()
    await drain_pending_writes()
