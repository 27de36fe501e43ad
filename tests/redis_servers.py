"""Real Redis topologies for fault and scale tests, started from the installed binaries.

Every server listens on 127.0.0.1 only, on a free port found by binding to port 0, runs
from its own temporary directory with ``save ""`` and ``appendonly no``, and is waited
for with a bounded timeout until it answers with its own pid (so a port that another
process grabbed meanwhile is noticed): a server that does not come up raises
:class:`RedisServerError` with the tail of its log.

    start_standalone() -> RedisServer
        .url .port .stop() .kill() .restart() .pause() .resume()
    start_cluster(primaries=3, replicas=0) -> RedisCluster
        .url = "redis+cluster://127.0.0.1:p1,..." .nodes .primaries .node_for_key() .wait_failed_over() .stop()
    start_sentinel() -> RedisSentinel
        .url = "redis+sentinel://127.0.0.1:s1,.../relay" .primary .failover() .wait_primary_changed() .rejoin() .stop()
    DelayProxy(target_port, delay_s)
        a TCP relay that holds every reply back by ``delay_s``; .start() .stop() .drop_connections() .cut() .heal()

All of them are context managers, and anything still running when the interpreter exits
is stopped by an ``atexit`` hook, so a failed test run leaves no ``redis-server`` behind
(a SIGKILLed interpreter runs no hook: its servers outlive it).
The only dependency is redis-py (sync client), for readiness and topology checks.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis

HOST = "127.0.0.1"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
SERVICE_NAME = "relay"

_live: set[RedisServer] = set()
_live_dirs: set[Path] = set()


class RedisServerError(RuntimeError):
    """A Redis process could not be started, or a topology did not become ready in time."""


def free_ports(count: int = 1) -> list[int]:
    """Return ``count`` distinct ports that were free on 127.0.0.1 a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``predicate`` until it is true; raise :class:`RedisServerError` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            if predicate():
                return
        except (redis.RedisError, OSError) as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise RedisServerError(f"timed out after {timeout:.1f}s waiting for {what}{detail}")
        time.sleep(interval)


class RedisServer:
    """One ``redis-server`` process (a data node or a sentinel) on a fixed port.

    The port and directory survive :meth:`kill` and :meth:`restart`; :meth:`stop` ends the
    process and removes the directory. With ``sentinel=True`` the process runs in sentinel
    mode. ``config`` lines are appended to the generated config file.
    """

    def __init__(
        self,
        port: int,
        directory: Path,
        *,
        config: list[str] | None = None,
        sentinel: bool = False,
        password: str | None = None,
    ) -> None:
        self.port = port
        self.password = password  # what this module's own clients authenticate with
        self.host = HOST
        self.dir = directory
        self.sentinel = sentinel
        self.extra_config = list(config or [])
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        kind = "sentinel" if self.sentinel else "redis"
        return f"<RedisServer {kind} {self.host}:{self.port} {state}>"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def config_file(self) -> Path:
        return self.dir / ("sentinel.conf" if self.sentinel else "redis.conf")

    @property
    def log_file(self) -> Path:
        return self.dir / "server.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, **kwargs: Any) -> redis.Redis:
        """A sync client for this server; the caller closes it."""
        kwargs.setdefault("socket_timeout", 2.0)
        kwargs.setdefault("password", self.password)
        kwargs.setdefault("socket_connect_timeout", 2.0)
        return redis.Redis(host=self.host, port=self.port, **kwargs)

    def execute(self, *args: Any, timeout: float = 2.0) -> Any:
        """Run one command on a fresh connection."""
        with self.client(socket_timeout=timeout, socket_connect_timeout=timeout) as conn:
            return conn.execute_command(*args)

    def start(self, timeout: float = STARTUP_TIMEOUT) -> Self:
        if self.running:
            raise RedisServerError(f"{self!r} is already running")
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.config_file.exists():
            self._write_config()
        args = [REDIS_SERVER, str(self.config_file)]
        if self.sentinel:
            args.append("--sentinel")
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir
        )
        self.paused = False
        _live.add(self)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self._terminate(signal.SIGKILL)
            raise
        return self

    def _write_config(self) -> None:
        lines = [
            f"port {self.port}",
            f"bind {self.host}",
            "protected-mode no",
            "daemonize no",
            f"dir {self.dir}",
            f"logfile {self.log_file}",
        ]
        if not self.sentinel:
            # no diskless-sync delay (5 s by default): a replica that (re)attaches syncs at once
            lines += ['save ""', "appendonly no", "repl-diskless-sync-delay 0"]
        lines += self.extra_config
        self.config_file.write_text("\n".join(lines) + "\n")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.client(socket_timeout=0.5, socket_connect_timeout=0.5) as conn:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RedisServerError(
                        f"redis-server on port {self.port} exited with {self.process.returncode}:\n{self.log_tail()}"
                    )
                try:
                    # PING alone could be answered by a server that already held the port.
                    if int(conn.info("server")["process_id"]) == self.process.pid:
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                if time.monotonic() >= deadline:
                    raise RedisServerError(
                        f"redis-server (pid {self.process.pid}) on port {self.port} not answering"
                        f" after {timeout:.1f}s:\n{self.log_tail()}"
                    )
                time.sleep(0.02)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _terminate(self, sig: signal.Signals) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            if self.paused and sig != signal.SIGKILL:
                process.send_signal(signal.SIGCONT)
            process.send_signal(sig)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        else:
            process.wait()
        self.process = None
        self.paused = False
        _live.discard(self)

    def kill(self) -> None:
        """SIGKILL, like a crash: the port and directory stay for :meth:`restart`."""
        self._terminate(signal.SIGKILL)

    def shutdown(self) -> None:
        """SIGTERM and wait; the port and directory stay for :meth:`restart`."""
        self._terminate(signal.SIGTERM)

    def restart(self, timeout: float = STARTUP_TIMEOUT) -> Self:
        """Stop the process if it runs, then start it again on the same port (empty, since nothing is saved)."""
        self.shutdown()
        return self.start(timeout)

    def pause(self) -> None:
        """SIGSTOP: the port stays open, connections hang, nothing answers."""
        if not self.running:
            raise RedisServerError(f"{self!r} is not running")
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.process is not None and self.paused:
            self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        """End the process and remove its directory. Safe to call twice."""
        self._terminate(signal.SIGTERM)
        _remove_dir(self.dir)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _new_dir(prefix: str) -> Path:
    directory = Path(tempfile.mkdtemp(prefix=f"relay-idem-{prefix}-"))
    _live_dirs.add(directory)
    return directory


def _remove_dir(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    _live_dirs.discard(directory)


def _start_server(
    directory: Path,
    *,
    config: Callable[[int], list[str]] | None = None,
    sentinel: bool = False,
    attempts: int = 3,
    password: str | None = None,
) -> RedisServer:
    """Start a server on a fresh free port, trying another port if the chosen one was taken meanwhile."""
    error: RedisServerError | None = None
    for _ in range(attempts):
        port = free_port()
        extra = config(port) if config else []
        if password is not None:
            extra = [f"requirepass {password}", *extra]
        server = RedisServer(port, directory, config=extra, sentinel=sentinel, password=password)
        try:
            return server.start()
        except RedisServerError as exc:
            error = exc
            server.stop()
    assert error is not None
    raise error


def start_standalone(*, config: list[str] | None = None) -> RedisServer:
    """One standalone server; ``.stop()`` (or ``with``) removes it."""
    return _start_server(_new_dir("standalone"), config=(lambda _port: list(config or [])))


class RedisCluster:
    """A Redis Cluster created with ``redis-cli --cluster create``; ``nodes`` in creation order.

    Nodes keep their ``nodes.conf`` across :meth:`RedisServer.kill` and
    :meth:`RedisServer.restart`, so a restarted node rejoins with its slots (but no data).
    """

    def __init__(self, nodes: list[RedisServer], directory: Path) -> None:
        self.nodes = nodes
        self.dir = directory

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [node.address for node in self.nodes]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{port}" for port in self.ports)

    def node_for_slot(self, slot: int) -> RedisServer:
        """The primary serving ``slot``, as the first running node sees it (CLUSTER SLOTS)."""
        for entry in self._any_node().execute("CLUSTER", "SLOTS"):
            start, end, primary = entry[0], entry[1], entry[2]
            if start <= slot <= end:
                port = int(primary[1])
                return next(node for node in self.nodes if node.port == port)
        raise RedisServerError(f"slot {slot} is not served")

    def node_for_key(self, key: str | bytes) -> RedisServer:
        return self.node_for_slot(int(self._any_node().execute("CLUSTER", "KEYSLOT", key)))

    def _any_node(self) -> RedisServer:
        for node in self.nodes:
            if node.running and not node.paused:
                return node
        raise RedisServerError("no cluster node is running")

    def wait_ok(self, timeout: float = 15.0) -> None:
        """Wait until every running (not paused) node reports ``cluster_state:ok``."""

        def all_ok() -> bool:
            for node in self.nodes:
                if not node.running or node.paused:
                    continue
                info = node.execute("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text:
                    return False
            return True

        wait_until(all_ok, timeout, f"cluster_state:ok on ports {self.ports}", interval=0.1)

    def role(self, node: RedisServer) -> str:
        """``"master"`` or ``"slave"``, as the node itself reports (ROLE)."""
        role = node.execute("ROLE")[0]
        return role.decode() if isinstance(role, bytes) else str(role)

    @property
    def primaries(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.running and not node.paused and self.role(node) == "master"]

    @property
    def replicas(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.running and not node.paused and self.role(node) == "slave"]

    def wait_replicas_synced(self, timeout: float = 15.0) -> None:
        def synced() -> bool:
            return all(node.execute("INFO", "replication").get("master_link_status") == "up" for node in self.replicas)

        wait_until(synced, timeout, "every cluster replica to be in sync", interval=0.1)

    def wait_failed_over(self, dead: RedisServer, timeout: float = 20.0) -> None:
        """After ``dead`` was killed or paused: wait until every running node flags it ``fail``
        and reports ``cluster_state:ok`` again (its replica, if it had one, now serves its slots)."""

        def flagged_everywhere() -> bool:
            for node in self.nodes:
                if node is dead or not node.running or node.paused:
                    continue
                raw = node.execute("CLUSTER", "NODES")
                text = raw.decode() if isinstance(raw, bytes) else str(raw)
                # <id> <ip:port@cport> <flags> ...; "fail?" is only a suspicion (PFAIL)
                rows = [row.split() for row in text.splitlines()]
                flags = next((row[2].split(",") for row in rows if row[1].startswith(f"{HOST}:{dead.port}@")), [])
                if "fail" not in flags:
                    return False
            return True

        deadline = time.monotonic() + timeout
        wait_until(flagged_everywhere, timeout, f"every node to flag {dead.port} as failed", interval=0.1)
        self.wait_ok(max(deadline - time.monotonic(), 0.1))

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        _remove_dir(self.dir)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_cluster(
    primaries: int = 3, *, replicas: int = 0, node_timeout_ms: int = 2000, timeout: float = 30.0
) -> RedisCluster:
    """``primaries`` cluster-enabled primaries (3 at least), each with ``replicas`` replicas.

    Returns once all 16384 slots are assigned, every node reports ``cluster_state:ok`` and
    every replica is in sync. ``node_timeout_ms`` is how long a silent node takes to be failed
    over (when it has a replica) or to turn the cluster down.
    """
    if primaries < 3:
        raise ValueError("redis-cli --cluster create needs at least 3 primaries")
    root = _new_dir("cluster")
    cluster = RedisCluster([], root)
    try:

        def node_config(port: int) -> list[str]:
            bus_port = next(candidate for candidate in free_ports(2) if candidate != port)
            return [
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                f"cluster-node-timeout {node_timeout_ms}",
                f"cluster-port {bus_port}",
            ]

        for index in range(primaries * (1 + replicas)):
            cluster.nodes.append(_start_server(root / f"node{index}", config=node_config))
        create = [REDIS_CLI, "--cluster", "create", *(f"{HOST}:{port}" for port in cluster.ports)]
        create += ["--cluster-replicas", str(replicas), "--cluster-yes"]
        try:
            result = subprocess.run(create, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired as exc:
            raise RedisServerError(f"redis-cli --cluster create did not finish in {timeout:.0f}s") from exc
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise RedisServerError(f"redis-cli --cluster create failed ({result.returncode}):\n{output}")
        cluster.wait_ok(timeout)
        if replicas:
            cluster.wait_replicas_synced(timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


class RedisSentinel:
    """One primary, one replica and three sentinels (quorum 2) watching service ``relay``."""

    def __init__(
        self,
        servers: list[RedisServer],
        sentinels: list[RedisServer],
        directory: Path,
        service: str,
        failover_timeout_s: float = 3.0,
    ) -> None:
        self.servers = servers
        self.sentinels = sentinels
        self.dir = directory
        self.service = service
        self.failover_timeout_s = failover_timeout_s

    @property
    def sentinel_ports(self) -> list[int]:
        return [sentinel.port for sentinel in self.sentinels]

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"{HOST}:{port}" for port in self.sentinel_ports) + f"/{self.service}"

    def primary_port(self, sentinel: RedisServer | None = None) -> int:
        """The primary's port as one sentinel (by default the first running one) reports it."""
        sentinel = sentinel or next(s for s in self.sentinels if s.running)
        _host, port = sentinel.execute("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(port)

    @property
    def primary(self) -> RedisServer:
        port = self.primary_port()
        return next(server for server in self.servers if server.port == port)

    @property
    def replica(self) -> RedisServer:
        port = self.primary_port()
        return next(server for server in self.servers if server.port != port)

    def _accepts_writes(self, server: RedisServer) -> bool:
        role = server.execute("ROLE")
        if role[0] not in (b"master", "master"):
            return False
        server.execute("SET", "relay-idem:topology-probe", "1", "PX", "1000")
        return True

    def _replica_synced(self, server: RedisServer, primary_port: int) -> bool:
        info = server.execute("INFO", "replication")
        return bool(
            info.get("role") == "slave"
            and int(info.get("master_port", 0)) == primary_port
            and info.get("master_link_status") == "up"
        )

    def _sentinel_sees(self, sentinel: RedisServer, primary_port: int, replica_ports: set[int]) -> bool:
        if self.primary_port(sentinel) != primary_port:
            return False
        seen = set()
        for replica in sentinel.execute("SENTINEL", "REPLICAS", self.service):
            fields = {str(k, "ascii"): str(v, "ascii") for k, v in replica.items()}
            # "role-reported" may lag by one INFO period (10 s) on sentinels that did not lead a
            # failover; the flags (no s_down, not disconnected) are what makes a replica promotable.
            if fields["flags"] == "slave":
                seen.add(int(fields["port"]))
        peers = sentinel.execute("SENTINEL", "SENTINELS", self.service)
        return replica_ports <= seen and len(peers) >= len(self.sentinels) - 1

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until every running replica is in sync with the primary, and every sentinel names that
        primary, sees each replica as a healthy replica and knows the other sentinels."""
        primary_port = self.primary_port()
        replica_ports = {server.port for server in self.servers if server.port != primary_port and server.running}

        def settled() -> bool:
            for server in self.servers:
                if server.port in replica_ports and not self._replica_synced(server, primary_port):
                    return False
            return all(self._sentinel_sees(s, primary_port, replica_ports) for s in self.sentinels if s.running)

        wait_until(settled, timeout, f"sentinel service {self.service!r} to settle", interval=0.1)

    def wait_primary_changed(self, old_port: int, timeout: float = 30.0) -> RedisServer:
        """Wait until every running sentinel names one primary other than ``old_port`` and it accepts writes
        (after :meth:`failover`, or after the primary was killed or paused past ``down_after_ms``)."""
        deadline = time.monotonic() + timeout

        def switched() -> bool:
            ports = {self.primary_port(sentinel) for sentinel in self.sentinels if sentinel.running}
            return len(ports) == 1 and old_port not in ports

        wait_until(switched, timeout, f"every sentinel to report a primary other than {old_port}")
        new_primary = self.primary
        wait_until(
            lambda: self._accepts_writes(new_primary),
            max(deadline - time.monotonic(), 0.1),
            f"new primary {new_primary.port} to accept writes",
        )
        return new_primary

    def failover(self, timeout: float = 30.0, *, settle: bool = False) -> RedisServer:
        """SENTINEL FAILOVER, then wait until every sentinel names the new primary and it accepts writes.

        Takes well under a second. The old primary is then still a primary that accepts writes,
        as in a real forced failover: Sentinel demotes it only some 10-15 s later. With
        ``settle=True`` it is demoted at once (REPLICAOF, what Sentinel would send) and this
        waits for :meth:`wait_ready`, so another failover can follow. Returns the new primary.
        """
        deadline = time.monotonic() + timeout
        old = self.primary

        def issue() -> bool:
            try:
                self.sentinels[0].execute("SENTINEL", "FAILOVER", self.service)
            except redis.ResponseError as exc:
                if "NOGOODSLAVE" in str(exc) or "INPROG" in str(exc):
                    return False  # no replica selectable yet, or the last attempt is still winding down
                raise
            return True

        while True:
            remaining = max(deadline - time.monotonic(), 0.1)
            wait_until(issue, remaining, f"SENTINEL FAILOVER {self.service} to be accepted", interval=0.2)
            try:
                # A failover that Sentinel aborts (promotion not seen within failover-timeout, as on
                # a loaded machine) leaves the old primary in place: ask again.
                attempt = min(max(deadline - time.monotonic(), 0.1), 3 * self.failover_timeout_s + 2.0)
                new_primary = self.wait_primary_changed(old.port, attempt)
                break
            except RedisServerError:
                if time.monotonic() >= deadline:
                    raise
        if settle:
            if old.running:
                old.execute("REPLICAOF", new_primary.host, new_primary.port)
            self.wait_ready(max(deadline - time.monotonic(), 0.1))
        return new_primary

    def rejoin(self, server: RedisServer, timeout: float = 30.0) -> None:
        """Start ``server`` again if needed and make it a replica of the current primary at once
        (Sentinel itself would demote a returning old primary only some 10 s later), then :meth:`wait_ready`."""
        if not server.running:
            server.start()
        primary = self.primary
        if server is not primary:
            server.execute("REPLICAOF", primary.host, primary.port)
        self.wait_ready(timeout)

    def stop(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.stop()
        _remove_dir(self.dir)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_sentinel(
    *,
    service: str = SERVICE_NAME,
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 3000,
    timeout: float = 30.0,
    replicas: int = 1,
    password: str | None = None,
    sentinel_password: str | None = None,
) -> RedisSentinel:
    """A primary, ``replicas`` replicas of it and three sentinels with quorum 2, all settled.

    ``password`` protects the data nodes (``requirepass``, ``masterauth``, and the sentinels'
    ``auth-pass``), ``sentinel_password`` the sentinels themselves (``requirepass``, and
    ``sentinel-pass`` between them). See :meth:`RedisSentinel.wait_ready`; startup takes about 5 s,
    as sentinels find each other through hello messages sent every 2 s.
    """
    root = _new_dir("sentinel")
    topology = RedisSentinel([], [], root, service, failover_timeout_ms / 1000)
    auth = [f"masterauth {password}"] if password else []
    try:
        primary = _start_server(root / "redis0", config=lambda _port: auth, password=password)
        topology.servers.append(primary)
        for index in range(1, replicas + 1):
            topology.servers.append(
                _start_server(
                    root / f"redis{index}",
                    config=lambda _port: [*auth, f"replicaof {HOST} {primary.port}"],
                    password=password,
                )
            )
        sentinel_config = [
            f"sentinel monitor {service} {HOST} {primary.port} 2",
            f"sentinel down-after-milliseconds {service} {down_after_ms}",
            f"sentinel failover-timeout {service} {failover_timeout_ms}",
            f"sentinel parallel-syncs {service} 1",
            *([f"sentinel auth-pass {service} {password}"] if password else []),
            *([f"sentinel sentinel-pass {sentinel_password}"] if sentinel_password else []),
        ]
        for index in range(3):
            topology.sentinels.append(
                _start_server(
                    root / f"sentinel{index}",
                    config=lambda _port: sentinel_config,
                    sentinel=True,
                    password=sentinel_password,
                )
            )
        topology.wait_ready(timeout)
    except BaseException:
        topology.stop()
        raise
    return topology


class DelayProxy:
    """A TCP relay on 127.0.0.1 that delivers every reply from ``target_port`` ``delay_s`` seconds late.

    Requests go through at once; data coming back is held for ``delay_s`` (latency, not a
    bandwidth limit: pipelined replies keep their spacing). ``delay_s`` may be changed while
    the proxy runs and applies to data read afterwards. It runs an asyncio loop in a daemon
    thread, so it serves sync and async clients alike.
    """

    def __init__(self, target_port: int, delay_s: float = 0.0, *, target_host: str = HOST) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.delay_s = delay_s
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self.refusing = False

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    def start(self, timeout: float = 5.0) -> Self:
        if self._thread is not None:
            raise RuntimeError("DelayProxy is already started")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=f"DelayProxy->{self.target_port}", daemon=True)
        self._loop, self._thread = loop, thread
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._listen(), loop).result(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        # Never cancelled from outside (asyncio 3.11 logs a cancelled connection handler as an error):
        # drop_connections() and stop() abort the sockets, and the pipes end on their own.
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        writers = [client_writer]
        self._writers.add(client_writer)
        try:
            if self.refusing:
                return
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError:
                return
            writers.append(upstream_writer)
            self._writers.add(upstream_writer)
            forward = asyncio.create_task(self._pipe(client_reader, upstream_writer, delayed=False))
            backward = asyncio.create_task(self._pipe(upstream_reader, client_writer, delayed=True))
            try:
                await asyncio.wait({forward, backward}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in (forward, backward):
                    pipe.cancel()
                await asyncio.gather(forward, backward, return_exceptions=True)
        finally:
            for writer in writers:
                self._writers.discard(writer)
                writer.close()
            for writer in writers:
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            self._handlers.discard(handler)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, delayed: bool) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while True:
                data = await reader.read(65536)
                queue.put_nowait((loop.time() + (self.delay_s if delayed else 0.0), data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender

    def cut(self) -> None:
        """A partition: relayed connections are aborted and new ones closed at once, until :meth:`heal`."""
        self.refusing = True
        self.drop_connections()

    def heal(self) -> None:
        self.refusing = False

    def drop_connections(self, timeout: float = STOP_TIMEOUT) -> None:
        """Abort every relayed connection, both sides (the listener stays open): a network blip."""
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._abort_all(), self._loop).result(timeout)

    async def _abort_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=2.0)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self._abort_all()

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if thread.is_alive():
                with contextlib.suppress(Exception):
                    asyncio.run_coroutine_threadsafe(self._close(), loop).result(STOP_TIMEOUT)
                loop.call_soon_threadsafe(loop.stop)
                thread.join(STOP_TIMEOUT)
        finally:
            if not thread.is_alive():
                loop.close()
            self._loop = self._thread = self._server = None

    def __enter__(self) -> Self:
        return self if self._thread is not None else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@contextlib.contextmanager
def paused(server: RedisServer) -> Iterator[RedisServer]:
    """``with paused(server):`` SIGSTOP for the duration of the block."""
    server.pause()
    try:
        yield server
    finally:
        server.resume()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.stop()
    for directory in list(_live_dirs):
        _remove_dir(directory)


__all__ = [
    "HOST",
    "SERVICE_NAME",
    "DelayProxy",
    "RedisCluster",
    "RedisSentinel",
    "RedisServer",
    "RedisServerError",
    "free_port",
    "free_ports",
    "paused",
    "start_cluster",
    "start_sentinel",
    "start_standalone",
    "wait_until",
]
