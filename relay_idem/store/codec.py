"""Records as bytes: one msgpack array, the same for every store that keeps bytes."""

from __future__ import annotations

from typing import Any

import msgpack

from relay_idem.store.base import Record, StoredResponse


def encode_record(record: Record) -> bytes:
    response = record.response
    if response is None:
        return msgpack.packb((record.fingerprint, record.created_at))  # type: ignore[no-any-return]
    headers = [item for pair in response.headers for item in pair]
    return msgpack.packb(  # type: ignore[no-any-return]
        (record.fingerprint, record.created_at, response.status, headers, response.body, response.body_omitted)
    )


def decode_record(data: bytes) -> Record:
    fields: list[Any] = msgpack.unpackb(data)
    if len(fields) == 2:
        return Record(fingerprint=fields[0], created_at=fields[1])
    fingerprint, created_at, status, flat_headers, body, body_omitted = fields
    headers = tuple(zip(flat_headers[::2], flat_headers[1::2], strict=True))
    return Record(fingerprint, created_at, StoredResponse(status, headers, body, body_omitted))
