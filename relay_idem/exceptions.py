"""Errors relay-idem raises.

RelayIdemError
├── StoreUnavailable   the store did not answer (connection, timeout, failover)
└── ClientDisconnected the client went away before its request body arrived
"""

from __future__ import annotations


class RelayIdemError(Exception):
    """Base of every error relay-idem raises."""


class StoreUnavailable(RelayIdemError):
    """The store could not be reached or did not answer in time."""


class ClientDisconnected(RelayIdemError):
    """An ``http.disconnect`` arrived while the request body was being read."""
