"""A/B of the proxy between git revisions: CPU µs per request of each proxy process, nginx beside them.

Each revision's ``relay_idem`` is exported (``git archive``) to a directory of its own and served by
the same interpreter (this venv's dependencies), one process each, Redis store, in front of nginx
answering ``return 202`` with a fixed JSON body; nginx ``proxy_pass`` with a keep-alive pool is the
reference. Rounds are interleaved and the order of the proxies alternates round by round; each wrk
run is ``-t1 -c32`` for ``--seconds``; CPU is utime + stime of the proxy's process from /proc over
the run, divided by the requests wrk completed. The table gives medians and, per revision, the
median of its per-round ratios to the first revision and to nginx: on a shared machine only those
ratios mean anything.

    python scripts/measure_proxy_ab.py --rounds 4 --seconds 3 cace843 HEAD
    python scripts/measure_proxy_ab.py --modes unique main .   # the working tree against main

This is the quick check behind benchmarks/README.md's "The proxy's CPU per request" rows;
``python -m benchmarks --only proxy`` makes the official proxy numbers.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from io import BytesIO
from pathlib import Path

from measure_front import PROXY_LOCATION, UPSTREAM_LOCATION, cpu_seconds, free_port, nginx, wait_ready, wrk

ROOT = Path(__file__).resolve().parent.parent
# argv: upstream port redis prefix tree
SERVE = """
import asyncio, sys
sys.path.insert(0, sys.argv[5])
import uvloop
import relay_idem
from relay_idem.config import Config
from relay_idem.server import serve
assert relay_idem.__file__.startswith(sys.argv[5]), relay_idem.__file__
config = Config(upstream=sys.argv[1], port=int(sys.argv[2]), redis=sys.argv[3], prefix=sys.argv[4])
with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
    runner.run(serve(config))
"""
MODE_NAMES = {"none": "no key", "unique": "first execution", "same": "replay"}


def export(revision: str, directory: Path) -> Path:
    """``relay_idem`` as of ``revision`` (or the working tree for ``.``) under ``directory``."""
    directory.mkdir(parents=True)
    if revision == ".":
        shutil.copytree(ROOT / "relay_idem", directory / "relay_idem")
    else:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", revision, "relay_idem"], capture_output=True, check=True
        ).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(directory, filter="data")
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revisions", nargs="*", default=["main", "."], help="git revisions; '.' is the working tree")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--modes", default="none,unique,same")
    args = parser.parse_args()
    if len(args.revisions) < 2:
        parser.error("give at least two revisions")
    workdir = Path(tempfile.mkdtemp(prefix="measure-proxy-ab-"))
    upstream_port, nginx_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    prefix = f"proxy-ab-{uuid.uuid4().hex[:6]}"
    children = [nginx(workdir, "upstream", upstream_port, UPSTREAM_LOCATION)]
    try:
        children.append(nginx(workdir, "proxy", nginx_port, PROXY_LOCATION, upstream_port))
        targets: dict[str, tuple[int, int]] = {}
        for index, revision in enumerate(args.revisions):
            tree = export(revision, workdir / f"tree-{index}")
            port = free_port()
            argv = [sys.executable, "-c", SERVE, upstream, str(port), args.redis, prefix, str(tree)]
            child = subprocess.Popen(argv)
            children.append(child)
            targets[revision] = (port, child.pid)
        for port in (upstream_port, nginx_port, *(port for port, _ in targets.values())):
            wait_ready(f"http://127.0.0.1:{port}/")
        nginx_worker = int(subprocess.run(["pgrep", "-P", str(children[1].pid)], capture_output=True,
                                          text=True, check=True).stdout.split()[0])  # fmt: skip
        results: dict[tuple[str, str], list[float]] = {}
        modes = args.modes.split(",")
        for round_ in range(args.rounds):
            for mode in modes:
                order = list(targets) if round_ % 2 == 0 else list(reversed(targets))
                for name, (port, pid) in [("nginx", (nginx_port, nginx_worker))] + [(n, targets[n]) for n in order]:
                    before, started = cpu_seconds(pid), time.monotonic()
                    requests = wrk(port, mode, args.seconds, workdir)
                    elapsed, cpu = time.monotonic() - started, cpu_seconds(pid) - before
                    results.setdefault((mode, name), []).append(cpu / requests * 1e6)
                    print(f"round {round_ + 1} {mode:6} {name:10} {cpu / requests * 1e6:6.1f} µs/req "
                          f"{requests / elapsed:8.0f} rps", flush=True)  # fmt: skip
        first = args.revisions[0]
        print("\nmedians (CPU µs per request of the proxy process; ratios: medians of the per-round ratios):")
        for mode in modes:
            reference = results[(mode, "nginx")]
            cells = [f"nginx {statistics.median(reference):.1f} µs"]
            for name in targets:
                own = results[(mode, name)]
                to_nginx = statistics.median(a / b for a, b in zip(own, reference, strict=True))
                to_first = statistics.median(a / b for a, b in zip(own, results[(mode, first)], strict=True))
                cells.append(f"{name} {statistics.median(own):.1f} µs ({to_nginx:.2f}x nginx, {to_first:.2f}x {first})")
            print(f"{MODE_NAMES.get(mode, mode):16} | " + " | ".join(cells))
    finally:
        for child in reversed(children):
            child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
