"""When each key last changed: lets a waiter that looked just before a change see it anyway."""

from __future__ import annotations

import time

# How long a change is remembered; a waiter looks again well within this.
CHANGE_MEMORY_SECONDS = 5.0


class RecentChanges:
    """Keys in the order they last changed, so forgetting old ones costs O(1) per change."""

    def __init__(self) -> None:
        self._changed_at: dict[str, float] = {}

    def mark(self, key: str) -> None:
        now = time.monotonic()
        changed_at = self._changed_at
        changed_at.pop(key, None)
        changed_at[key] = now
        # Forgetting up to two old changes per new one keeps the cost flat and the size bounded.
        horizon = now - CHANGE_MEMORY_SECONDS
        for _ in range(2):
            oldest = next(iter(changed_at))
            if changed_at[oldest] >= horizon:
                break
            del changed_at[oldest]

    def changed_since(self, key: str, since: float) -> bool:
        return self._changed_at.get(key, float("-inf")) >= since

    def __len__(self) -> int:
        return len(self._changed_at)
