"""Count the Redis commands a client sends per request, with ``MONITOR``.

Every line MONITOR prints is one command some client sent, except lines from inside a
script, which it marks ``[<db> lua]``: those are not round trips and are not counted.
Commands sent inside a pipeline or MULTI each count. Connection set-up commands
(HELLO, CLIENT SETINFO, AUTH, SELECT) are reported apart: they are paid per connection.
"""

from __future__ import annotations

import re
import secrets
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import redis

# 1732737000.123456 [0 127.0.0.1:51234] "SET" "k" "v"      /     ... [0 lua] "get" "k"
LINE = re.compile(r'^\+?(?P<ts>\d+\.\d+) \[(?P<db>\d+) (?P<client>[^\]]+)\] "(?P<command>[^"]*)"')
SETUP_COMMANDS = frozenset({"hello", "auth", "select", "client"})


@dataclass(slots=True)
class CommandCount:
    requests: int
    commands: Counter[str] = field(default_factory=Counter)  # counted, by lower-case name
    setup: Counter[str] = field(default_factory=Counter)
    lua: int = 0  # commands run inside scripts (not counted)

    @property
    def per_request(self) -> float:
        return sum(self.commands.values()) / self.requests if self.requests else 0.0

    def to_dict(self) -> dict[str, object]:
        per = {name: round(n / self.requests, 3) for name, n in sorted(self.commands.items())} if self.requests else {}
        return {
            "requests": self.requests,
            "per_request": round(self.per_request, 3),
            "by_command_per_request": per,
            "connection_setup": dict(self.setup),
            "inside_lua_not_counted": self.lua,
        }


def count_lines(lines: Iterable[str], requests: int, ignore_clients: Iterable[str] = ()) -> CommandCount:
    """Tally MONITOR output lines; lines from ``ignore_clients`` (``ip:port``) are skipped."""
    ignored = set(ignore_clients)
    result = CommandCount(requests)
    for line in lines:
        match = LINE.match(line)
        if match is None:
            continue
        client, command = match["client"], match["command"].lower()
        if client in ignored:
            continue
        if client == "lua":
            result.lua += 1
        elif command in SETUP_COMMANDS:
            result.setup[command] += 1
        else:
            result.commands[command] += 1
    return result


def _read_until(sock: socket.socket, buffer: bytes, marker: bytes, sink: list[str], done: threading.Event) -> None:
    while marker not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buffer += chunk
    sink.extend(buffer.decode("utf-8", "replace").split("\r\n"))
    done.set()


def count_commands(redis_url: str, send_requests: Callable[[], int], timeout: float = 30.0) -> CommandCount:
    """Run ``send_requests()`` (returns how many requests it sent) under MONITOR and tally."""
    parts = urlsplit(redis_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    control = redis.Redis(host=host, port=port, single_connection_client=True, socket_timeout=5.0)
    marker = "bench-monitor-end-" + secrets.token_hex(6)
    lines: list[str] = []
    done = threading.Event()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(b"MONITOR\r\n")
        greeting = b""
        while b"\r\n" not in greeting:
            greeting += sock.recv(64)
        if not greeting.startswith(b"+OK\r\n"):
            raise RuntimeError(f"MONITOR refused: {greeting!r}")
        rest = greeting[len(b"+OK\r\n") :]
        reader = threading.Thread(target=_read_until, args=(sock, rest, marker.encode(), lines, done), daemon=True)
        reader.start()
        try:
            requests = send_requests()
            own = str(control.client_info()["addr"])
            control.echo(marker)
            if not done.wait(timeout):
                raise RuntimeError("MONITOR output did not reach the end marker")
        finally:
            control.close()
            sock.shutdown(socket.SHUT_RDWR)
            reader.join(timeout)
    return count_lines(lines, requests, ignore_clients=[own])
