"""A/B of the proxy's front: CPU µs per request of the proxy process, uvicorn against relay-idem's own front.

Both serve the same ``ProxyApp`` (same upstream client, same store) in one process each, in front
of nginx answering ``return 202`` with a fixed JSON body; nginx ``proxy_pass`` with a keep-alive
pool is the reference. Rounds are interleaved (A B nginx, A B nginx, ...); CPU is utime + stime of
the proxy's process from /proc over each wrk run, divided by the requests wrk completed.

    python scripts/measure_front.py --redis redis://127.0.0.1:6379/1 --rounds 2 --seconds 5
    python scripts/measure_front.py --app trivial --modes none --rounds 3   # the front alone
    python scripts/measure_front.py --app forwarder --modes none --rounds 3 # no middleware: a direct path's bound

This is the quick check behind benchmarks/README.md's front rows; ``python -m benchmarks`` makes
the official proxy numbers.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

BODY = '{"to": "+5511999998888", "template": "lembrete_consulta", "language": "pt_BR"}'
NGINX_CONF = """
worker_processes 1;
daemon off;
error_log {dir}/error.log warn;
pid {dir}/nginx-{name}.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body-{name};
    proxy_temp_path {dir}/proxy-{name};
    {upstream}
    server {{
        listen 127.0.0.1:{port};
        default_type application/json;
        {location}
    }}
}}
"""
UPSTREAM_LOCATION = """location / { return 202 '{"id": "msg_1", "status": "queued"}'; }"""
PROXY_LOCATION = """location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }"""
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
local mode = "{mode}"
local counter = 0
local prefix = "{prefix}" .. tostring(math.random(1, 1000000000))
request = function()
  if mode == "unique" then
    counter = counter + 1
    wrk.headers["Idempotency-Key"] = prefix .. "-" .. counter
  elseif mode == "same" then
    wrk.headers["Idempotency-Key"] = "{prefix}-same"
  end
  return wrk.format(nil, "/v1/messages")
end
"""
# argv: upstream port redis prefix front(uvicorn|front) app(proxy|trivial|forwarder)
SERVE = """
import asyncio, sys, uvicorn, uvloop
from relay_idem.config import Config
from relay_idem.proxy import Forwarder, build_proxy_app
from relay_idem.server import serve

BODY = b'{"id": "msg_1", "status": "queued"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]

async def trivial(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
        return
    await receive()
    await send({"type": "http.response.start", "status": 202, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})

config = Config(upstream=sys.argv[1], port=int(sys.argv[2]), redis=sys.argv[3] or None, prefix=sys.argv[4])
proxy = build_proxy_app(config)
forwarder = Forwarder(proxy.upstream)

async def forwarder_only(scope, receive, send):  # the proxy without ProxyApp and the middleware
    await (proxy if scope["type"] == "lifespan" else forwarder)(scope, receive, send)

app = {"proxy": proxy, "trivial": trivial, "forwarder": forwarder_only}[sys.argv[6]]
if sys.argv[5] == "front":
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(config, app=app))
else:
    uvicorn.run(app, host="127.0.0.1", port=config.port, loop="uvloop", http="httptools", lifespan="on",
                proxy_headers=False, server_header=False, date_header=False, access_log=False, log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=0.5)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def nginx(workdir: Path, name: str, port: int, location: str, upstream: int = 0) -> subprocess.Popen[bytes]:
    conf = workdir / f"{name}.conf"
    pool = f"upstream app {{ server 127.0.0.1:{upstream}; keepalive 64; }}" if upstream else ""
    conf.write_text(NGINX_CONF.format(dir=workdir, name=name, upstream=pool, port=port, location=location))
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    return subprocess.Popen([exe, "-c", str(conf), "-p", str(workdir)], stderr=subprocess.DEVNULL)


def wrk(port: int, mode: str, seconds: float, workdir: Path) -> int:
    script = workdir / f"{mode}.lua"
    script.write_text(WRK_SCRIPT.format(body=BODY, mode=mode, prefix=uuid.uuid4().hex[:8]))
    argv = ["wrk", "-t1", "-c32", f"-d{seconds:g}s", "-s", str(script), f"http://127.0.0.1:{port}"]
    output = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    match = re.search(r"(\d+) requests in", output)
    assert match, output
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if errors and mode != "same":
        print(f"  ! {errors.group(1)} non-2xx responses", file=sys.stderr)
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default="", help="Redis URL for both proxies (default: the memory store)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--modes", default="none,unique,same")
    parser.add_argument(
        "--app",
        choices=("proxy", "trivial", "forwarder"),
        default="proxy",
        help="proxy: relay-idem's ProxyApp; trivial: an ASGI app answering 202 itself (the front alone); "
        "forwarder: the Forwarder without ProxyApp and the middleware",
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="measure-front-"))
    upstream_port, nginx_port, uvicorn_port, front_port = (free_port() for _ in range(4))
    upstream = f"http://127.0.0.1:{upstream_port}"
    prefix = f"front-ab-{uuid.uuid4().hex[:6]}"
    children = [nginx(workdir, "upstream", upstream_port, UPSTREAM_LOCATION)]
    try:
        children.append(nginx(workdir, "proxy", nginx_port, PROXY_LOCATION, upstream_port))
        for port, front in ((uvicorn_port, "uvicorn"), (front_port, "front")):
            argv = [sys.executable, "-c", SERVE, upstream, str(port), args.redis, prefix, front, args.app]
            children.append(subprocess.Popen(argv))
        for port in (upstream_port, nginx_port, uvicorn_port, front_port):
            wait_ready(f"http://127.0.0.1:{port}/")
        nginx_worker = int(subprocess.run(["pgrep", "-P", str(children[1].pid)], capture_output=True,
                                          text=True, check=True).stdout.split()[0])  # fmt: skip
        if args.app == "trivial":  # the reference is nginx answering by itself
            nginx_port = upstream_port
            nginx_worker = int(subprocess.run(["pgrep", "-P", str(children[0].pid)], capture_output=True,
                                              text=True, check=True).stdout.split()[0])  # fmt: skip
        targets = {"nginx": (nginx_port, nginx_worker), "uvicorn": (uvicorn_port, children[2].pid),
                   "front": (front_port, children[3].pid)}  # fmt: skip
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for round_ in range(args.rounds):
            for mode in args.modes.split(","):
                for name, (port, pid) in targets.items():
                    before, started = cpu_seconds(pid), time.monotonic()
                    requests = wrk(port, mode, args.seconds, workdir)
                    elapsed, cpu = time.monotonic() - started, cpu_seconds(pid) - before
                    results.setdefault((mode, name), []).append((cpu / requests * 1e6, requests / elapsed))
                    print(f"round {round_ + 1} {mode:6} {name:7} {cpu / requests * 1e6:6.1f} µs/req "
                          f"{requests / elapsed:8.0f} rps", flush=True)  # fmt: skip
        print("\nmedians (CPU µs per request of the proxy process, requests/s):")
        for mode in args.modes.split(","):
            row = {name: results[(mode, name)] for name in targets}
            cells = [f"{name} {statistics.median(c for c, _ in v):.1f} µs {statistics.median(r for _, r in v):.0f} rps"
                     for name, v in row.items()]  # fmt: skip
            nginx_cpu = statistics.median(c for c, _ in row["nginx"])
            ratios = [f"{name} {statistics.median(c for c, _ in row[name]) / nginx_cpu:.2f}x nginx"
                      for name in ("uvicorn", "front")]  # fmt: skip
            print(f"{mode:6} | " + " | ".join(cells) + " | " + ", ".join(ratios))
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
