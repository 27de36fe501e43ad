"""Stores: where records live. ``Store`` is the contract; ``MemoryStore`` and ``RedisStore`` implement it."""

from relay_idem.store.base import Claim, Record, RecordInfo, Store, StoredResponse
from relay_idem.store.memory import MemoryStore
from relay_idem.store.redis_store import RedisStore

__all__ = ["Claim", "MemoryStore", "Record", "RecordInfo", "RedisStore", "Store", "StoredResponse"]
