"""Errors relay-idem raises.

RelayIdemError
├── StoreUnavailable   the store did not answer (connection, timeout, failover)
├── ClientDisconnected the client went away before its request body arrived
├── KeyInProgress      an idempotent function's key is still being run by another call
└── KeyReused          an idempotent function's key was first used with other arguments
"""

from __future__ import annotations


class RelayIdemError(Exception):
    """Base of every error relay-idem raises."""


class StoreUnavailable(RelayIdemError):
    """The store could not be reached or did not answer in time."""


class ClientDisconnected(RelayIdemError):
    """An ``http.disconnect`` arrived while the request body was being read."""


class KeyInProgress(RelayIdemError):
    """Another call still runs this key (``@idempotent``, ``on_conflict="reject"`` or a wait that timed out).

    Nothing ran: a job runner that retries the call later gets the stored value then.
    """

    def __init__(self, key: str) -> None:
        super().__init__(f"key {key!r} is still being run by another call; retry later")
        self.key = key


class KeyReused(RelayIdemError):
    """The key was first used with a different fingerprint (``@idempotent(fingerprint=...)``). Nothing ran."""

    def __init__(self, key: str) -> None:
        super().__init__(f"key {key!r} was first used with different arguments (fingerprint mismatch)")
        self.key = key
