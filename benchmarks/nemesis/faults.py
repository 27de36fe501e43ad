"""Faults at random times, several at once, each recorded with when it began and ended.

Every fault heals itself (the killed process is restarted, the stopped one continued, the relay
fast again) before its thread ends; a fault that cannot be applied at that moment (no worker to
kill, Sentinel between two primaries) is recorded with its error and changes nothing. Faults on
Redis's topology (kill, failover, stall) hold one lock, so the topology settles between them.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from benchmarks.nemesis.system import LOCK_TTL, System

MAX_CONCURRENT = 3  # faults in progress at once
MEAN_GAP = 3.0  # seconds between fault starts, on average (exponential)


@dataclass
class Fault:
    kind: str
    started: float
    ended: float | None = None
    proxy: int | None = None  # the proxy process a worker fault hit
    detail: str = ""
    error: str | None = None


class Nemesis:
    """Starts faults until :meth:`stop`; ``faults`` is the record the checker reads."""

    def __init__(self, system: System, rng: random.Random, only: str | None = None) -> None:
        self.system = system
        self.rng = rng
        self.faults: list[Fault] = []
        self.redis_lock = threading.Lock()
        # One fault at a time per target: two overlapping upstream kills would start two upstreams
        # (the second one's port taken), two stalls of one relay would end each other early.
        self.busy: set[str] = set()
        self.busy_lock = threading.Lock()
        self.running: list[threading.Thread] = []
        self.stopping = threading.Event()
        self.kinds: dict[str, Callable[[Fault], None]] = {
            "worker SIGKILL": self.kill_worker,
            "worker SIGSTOP/SIGCONT": self.stop_worker,
            "upstream killed+restarted": self.kill_upstream,
            "proxy-upstream cut": self.cut_upstream,
            "proxy-upstream stalled": self.stall_upstream,
        }
        if system.sentinel is not None:
            self.kinds |= {
                "Redis primary killed+restarted": self.kill_primary,
                "Sentinel failover": self.failover,
                "Redis slow (CLIENT PAUSE)": self.pause_redis,
                "proxy-Redis cut (CLIENT KILL)": self.cut_redis_clients,
            }
        else:
            self.kinds |= {
                "Redis killed+restarted": self.kill_standalone,
                "Redis slow (relay delay)": self.slow_relay,
                "proxy-Redis stalled (relay)": self.stall_relay,
                "proxy-Redis cut (relay)": self.cut_relay,
            }
        if only is not None:  # --faults: the kinds whose name contains it
            self.kinds = {kind: apply for kind, apply in self.kinds.items() if only.lower() in kind.lower()}
            if not self.kinds:
                raise ValueError(f"no fault kind of the {system.configuration} configuration contains {only!r}")

    def run(self, seconds: float) -> None:
        """Start faults for ``seconds``, then wait for every fault to heal."""
        deadline = time.monotonic() + seconds
        while not self.stopping.wait(self.rng.expovariate(1 / MEAN_GAP)) and time.monotonic() < deadline:
            self.running = [thread for thread in self.running if thread.is_alive()]
            if len(self.running) >= MAX_CONCURRENT:
                continue
            kind = self.rng.choice(sorted(self.kinds))
            fault = Fault(kind, time.time())
            self.faults.append(fault)
            thread = threading.Thread(target=self.apply, args=(fault,), name=f"fault-{kind}", daemon=True)
            thread.start()
            self.running.append(thread)
        for thread in self.running:
            thread.join()

    def apply(self, fault: Fault) -> None:
        try:
            self.kinds[fault.kind](fault)
        except Exception as exc:  # a fault that could not be applied is recorded, not fatal
            fault.error = f"{type(exc).__name__}: {exc}"
        finally:
            fault.ended = time.time()

    @contextlib.contextmanager
    def exclusive(self, target: str) -> Iterator[None]:
        """Hold ``target`` for the fault; a fault on a target already held is not applicable."""
        with self.busy_lock:
            if target in self.busy:
                raise RuntimeError(f"{target} is already under another fault")
            self.busy.add(target)
        try:
            yield
        finally:
            with self.busy_lock:
                self.busy.discard(target)

    def pick_worker(self, fault: Fault) -> int:
        index = self.rng.randrange(len(self.system.proxies))
        workers = self.system.proxies[index].workers()
        if not workers:
            raise RuntimeError(f"proxy{index} has no worker right now")
        fault.proxy = index
        pid = self.rng.choice(workers)
        fault.detail = f"proxy{index} pid {pid}"
        return pid

    def kill_worker(self, fault: Fault) -> None:
        os.kill(self.pick_worker(fault), signal.SIGKILL)

    def stop_worker(self, fault: Fault) -> None:
        pid = self.pick_worker(fault)
        seconds = self.rng.uniform(0.3, 2 * LOCK_TTL)
        fault.detail += f" for {seconds:.1f} s"
        with self.exclusive(f"worker {pid}"):
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(seconds)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def kill_upstream(self, fault: Fault) -> None:
        seconds = self.rng.uniform(0.2, 3.0)
        fault.detail = f"down {seconds:.1f} s"
        with self.exclusive("upstream"):
            self.system.upstream.kill()
            time.sleep(seconds)
            self.system.upstream.start()

    def cut_upstream(self, fault: Fault) -> None:
        index = self.rng.randrange(len(self.system.upstream_relays))
        fault.detail = f"proxy{index}"
        self.system.upstream_relays[index].drop_connections()

    def stall_upstream(self, fault: Fault) -> None:
        index = self.rng.randrange(len(self.system.upstream_relays))
        relay = self.system.upstream_relays[index]
        seconds = self.rng.uniform(0.5, 7.0)  # past --upstream-timeout (5 s) at times: a 504
        fault.detail = f"proxy{index}, replies held {seconds:.1f} s"
        with self.exclusive(f"upstream relay {index}"):
            relay.delay_s = seconds
            time.sleep(seconds)
            relay.delay_s = 0.0

    # --- sentinel configuration -----------------------------------------------------------------

    def kill_primary(self, fault: Fault) -> None:
        """SIGKILL the primary; once Sentinel has promoted the replica, restart it as a replica (empty,
        as a server without persistence restarts: the safe way to bring it back under Sentinel)."""
        topology = self.system.sentinel
        assert topology is not None
        with self.redis_lock:
            old = topology.primary
            fault.detail = f"port {old.port}"
            old.kill()
            topology.wait_primary_changed(old.port, 60)
            time.sleep(self.rng.uniform(0, 3))
            topology.rejoin(old, 60)

    def failover(self, fault: Fault) -> None:
        topology = self.system.sentinel
        assert topology is not None
        with self.redis_lock:
            new = topology.failover(60)
            fault.detail = f"to port {new.port}"
            topology.wait_ready(60)  # Sentinel demotes the old primary by itself, some 10 s later

    def pause_redis(self, fault: Fault) -> None:
        milliseconds = self.rng.randint(200, 900)  # under Sentinel's down-after (1 s)
        fault.detail = f"{milliseconds} ms"
        with self.redis_lock:
            self.system.primary().execute("CLIENT", "PAUSE", milliseconds, "ALL")
            time.sleep(milliseconds / 1000)

    def cut_redis_clients(self, fault: Fault) -> None:
        """Close every connection to the primary but those of sentinels, replicas and this one."""
        primary = self.system.primary()
        with primary.client() as connection:
            own = connection.client_id()
            killed = 0
            for client in connection.client_list():
                flags, name = client.get("flags", ""), client.get("name", "")
                if int(client["id"]) == own or "S" in flags or "M" in flags or name.startswith("sentinel"):
                    continue
                with contextlib.suppress(Exception):
                    killed += connection.execute_command("CLIENT", "KILL", "ID", client["id"])
        fault.detail = f"{killed} connections"

    # --- standalone configuration ---------------------------------------------------------------

    def kill_standalone(self, fault: Fault) -> None:
        server = self.system.server
        assert server is not None
        seconds = self.rng.uniform(0.2, 3.0)
        fault.detail = f"down {seconds:.1f} s"
        with self.redis_lock:
            server.kill()
            time.sleep(seconds)
            server.start()

    def delay_relay(self, delay: float, seconds: float) -> None:
        """Every reply of the proxy-Redis relay ``delay`` seconds late, for ``seconds``."""
        relay = self.system.redis_relay
        assert relay is not None
        with self.redis_lock:
            relay.delay_s = delay
            time.sleep(seconds)
            relay.delay_s = 0.0

    def slow_relay(self, fault: Fault) -> None:
        delay, seconds = self.rng.uniform(0.05, 0.8), self.rng.uniform(1, 5)
        fault.detail = f"every reply {delay * 1000:.0f} ms late for {seconds:.1f} s"
        self.delay_relay(delay, seconds)

    def stall_relay(self, fault: Fault) -> None:
        seconds = self.rng.uniform(0.5, 2 * LOCK_TTL)
        fault.detail = f"replies held {seconds:.1f} s"
        self.delay_relay(seconds, seconds)

    def cut_relay(self, fault: Fault) -> None:
        relay = self.system.redis_relay
        assert relay is not None
        relay.drop_connections()
