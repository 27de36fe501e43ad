"""The ``relay-idem`` command: ``proxy``, ``demo``, ``inspect``, ``purge`` and ``--version`` (SPEC §2).

uvicorn's chain: ``main()`` (click) -> ``run(**kwargs)`` -> ``Config(**kwargs)`` -> the proxy's front
(:mod:`relay_idem.server`; the demo stays on uvicorn). Every flag
is also the environment variable ``RELAY_IDEM_<FLAG>``; repeatable flags take a comma-separated
list there. Bad input ends in one ``Error: ...`` line on stderr and a non-zero exit, never a
traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import click
from click.exceptions import NoArgsIsHelpError

from relay_idem import __version__
from relay_idem.config import DEFAULT_PREFIX, Config, ConfigError, check_redis_url, open_store
from relay_idem.exceptions import StoreUnavailable
from relay_idem.keys import InvalidKey, parse_key
from relay_idem.store.redis_store import DEFAULT_MIN_REPLICAS_TIMEOUT
from relay_idem.upstream import UPSTREAM_CLIENTS

F = TypeVar("F", bound=Callable[..., Any])

ENV_PREFIX = "RELAY_IDEM"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
EXIT_FAILURE = 1


class StartupError(Exception):
    """Something outside the flags stops the command (Redis down, no such record): one line, exit 1."""


def envvar(flag: str) -> str:
    return f"{ENV_PREFIX}_{flag.upper().replace('-', '_')}"


def flag(name: str, *decls: str, **kwargs: Any) -> Callable[[F], F]:
    """``--name`` with its ``RELAY_IDEM_NAME`` variable, shown in ``--help``."""
    kwargs.setdefault("show_default", True)
    # "access-log/--no-access-log" is one boolean flag: its variable is named after the first half.
    return click.option(f"--{name}", *decls, envvar=envvar(name.partition("/")[0]), show_envvar=True, **kwargs)


class ListType(click.ParamType[tuple[str, ...]]):
    """A comma-separated list, on the command line as in the environment; a repeated flag adds to it."""

    name = "LIST"
    envvar_list_splitter = ","

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        return tuple(item.strip() for item in str(value).split(",") if item.strip())


def flatten(ctx: click.Context, param: click.Parameter, value: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    return tuple(item for items in value for item in items)


SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2}


class ByteSize(click.ParamType[int]):
    """A number of bytes: ``1048576``, ``1MiB``, ``512KiB`` or ``2MB``."""

    name = "BYTES"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in SIZE_UNITS:
            self.fail(f"{value!r} is not a size in bytes (e.g. 1048576, 512KiB, 1MiB)", param, ctx)
        return int(match.group(1)) * SIZE_UNITS[unit]


def redact(url: str) -> str:
    """``url`` without its passwords (the user-info's and Sentinel's), fit for an error message."""
    parts = urlsplit(url)
    if parts.password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1))
    query = re.sub(r"(sentinel_password=)[^&]*", r"\1***", parts.query)
    return urlunsplit(parts._replace(query=query))


async def ping_store(url: str, prefix: str) -> None:
    store = open_store(url, prefix=prefix)
    try:
        await store.ping()
    finally:
        await store.close()


def check_redis(url: str, prefix: str = DEFAULT_PREFIX) -> None:
    """Fail at start-up, in one line, if Redis does not answer (rather than on the first request)."""
    try:
        asyncio.run(ping_store(url, prefix))
    except (StoreUnavailable, OSError, ValueError) as exc:
        raise StartupError(f"Redis at {redact(url)} does not answer: {exc}") from None


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging config, with the ``relay_idem`` logger on its handler (one line per anomaly)."""
    from uvicorn.config import LOGGING_CONFIG

    config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["relay_idem"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def uvicorn_options(host: str, port: int, log_level: str, access_log: bool) -> dict[str, Any]:
    """uvicorn's options for the demo (the proxy has its own front, relay_idem.server)."""
    return {
        "host": host,
        "port": port,
        "log_level": log_level,
        "log_config": log_config(log_level),
        "access_log": access_log,
        "lifespan": "on",
    }


@contextlib.contextmanager
def multiprocess_metrics() -> Iterator[None]:
    """A fresh ``PROMETHEUS_MULTIPROC_DIR`` for the workers (unless one is set), removed afterwards.

    Workers are spawned, so they import prometheus-client with this variable already set.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield
        return
    directory = tempfile.mkdtemp(prefix="relay-idem-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        yield
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        shutil.rmtree(directory, ignore_errors=True)


def run(**kwargs: Any) -> None:
    """Serve the proxy: validate, check Redis, then hand over to the front (relay_idem.server)."""
    from relay_idem import server

    config = Config(**kwargs)
    if config.redis is not None:
        check_redis(config.redis, config.prefix)
    if config.workers == 1:
        server.run_worker(config)
        return
    with multiprocess_metrics():
        server.run_workers(config)


def run_demo(*, host: str, port: int, redis: str | None, prefix: str, bare: bool, log_level: str) -> None:
    import uvicorn

    from relay_idem.demo import build_demo_app

    if redis is not None:
        check_redis_url(redis)
        check_redis(redis, prefix)
    app = build_demo_app(redis=redis, prefix=prefix, bare=bare)
    uvicorn.run(app, **uvicorn_options(host, port, log_level, access_log=True))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="relay-idem", message="%(prog)s %(version)s")
def cli() -> None:
    """relay-idem: retries are safe. The first request with an Idempotency-Key executes once;
    every repeat gets the first response back.

    Every flag can also be set as RELAY_IDEM_<FLAG> (e.g. --redis as RELAY_IDEM_REDIS).
    """


def redis_flag(help: str) -> Callable[[F], F]:
    return flag("redis", metavar="URL", help=help)


def prefix_flag() -> Callable[[F], F]:
    return flag("prefix", default=DEFAULT_PREFIX, help="Prefix of every Redis key relay-idem writes.")


@cli.command()
@flag("upstream", metavar="URL", help="The app to put relay-idem in front of, e.g. http://app:8000.  [required]")
@redis_flag("Redis shared by every worker and replica (redis://, rediss://, unix://, redis+cluster://, "
            "redis+sentinel://). Without it: the memory store, one process only.")  # fmt: skip
@prefix_flag()
@flag("host", default="127.0.0.1", help="Address to listen on.")
@flag("port", default=8080, type=click.IntRange(0, 65535), help="Port to listen on.")
@flag("workers", default=1, type=click.IntRange(min=1), help="Worker processes (more than 1 needs --redis).")
@flag("upstream-timeout", default=60.0, type=float, metavar="SECONDS",
      help="Longest wait for the upstream's response headers (then 504, final); also bounds each idle "
           "gap while its body streams.")  # fmt: skip
@flag("upstream-client", default="httptools", type=click.Choice(UPSTREAM_CLIENTS),
      help="HTTP client for the upstream: httptools (pooled, llhttp; the default) or aiohttp (needs "
           "relay-idem[aiohttp]). Chosen by measurement: benchmarks/README.md.")  # fmt: skip
@flag("max-header-bytes", default="64KiB", type=ByteSize(),
      help="Largest request head (request line and headers); a larger one is answered 431.")  # fmt: skip
@flag("header-timeout", default=30.0, type=float, metavar="SECONDS",
      help="A client that has not sent its whole request head by then is disconnected.")  # fmt: skip
@flag("body-timeout", default=60.0, type=float, metavar="SECONDS",
      help="Longest stall between two reads of a request body (then 408, the key released).")  # fmt: skip
@flag("send-timeout", default=60.0, type=float, metavar="SECONDS",
      help="A client that reads none of its response for this long is disconnected (the record is "
           "completed all the same).")  # fmt: skip
@flag("max-connections", default=10_000, type=click.IntRange(min=1), metavar="N",
      help="Open client connections per worker; past it a new one is answered 503 at once.")  # fmt: skip
@flag("min-replicas", default=0, type=click.IntRange(min=0), metavar="N",
      help="Make claims and completions wait for N Redis replicas (WAIT); 0: don't wait.")  # fmt: skip
@flag("min-replicas-timeout", default=DEFAULT_MIN_REPLICAS_TIMEOUT, type=float, metavar="SECONDS",
      help="Longest WAIT for --min-replicas acknowledgements (then 503); under the 0.5 s Redis socket "
           "timeout.")  # fmt: skip
@flag("header-name", default="Idempotency-Key", help="Request header that carries the key.")
@flag("methods", default="POST,PATCH", type=ListType(), help="Methods made idempotent, comma-separated.")
@flag("require-key", multiple=True, type=ListType(), callback=flatten, metavar="PATTERN",
      help="Path pattern (fnmatch, e.g. '/v1/messages*') where a covered method without a key is "
           "rejected with 400. Repeatable.")  # fmt: skip
@flag("ttl", default=86_400.0, type=float, metavar="SECONDS", help="How long a completed response is replayed.")
@flag("lock-ttl", default=10.0, type=float, metavar="SECONDS",
      help="Lease on an in-progress key, renewed while the upstream works.")  # fmt: skip
@flag("on-conflict", default="reject", type=click.Choice(["reject", "wait"]),
      help="A repeat while the first still runs: 409 (reject) or wait for its response (wait).")  # fmt: skip
@flag("wait-timeout", default=10.0, type=float, metavar="SECONDS", help="Longest wait with --on-conflict wait.")
@flag("on-mismatch", default="reject", type=click.Choice(["reject", "replay"]),
      help="Same key, different request: 422 (reject) or the stored response (replay).")  # fmt: skip
@flag("fingerprint", default="raw", type=click.Choice(["raw", "json"]),
      help="What makes two requests the same: raw body bytes, or canonical JSON.")  # fmt: skip
@flag("fingerprint-header", multiple=True, type=ListType(), callback=flatten, metavar="NAME",
      help="A request header that takes part in the fingerprint. Repeatable.")  # fmt: skip
@flag("scope-header", metavar="NAME",
      help="Credential header that names the tenant (default: the Authorization header).")  # fmt: skip
@flag("max-waiters", default=1000, type=click.IntRange(min=0), help="Repeats one process lets wait at once.")
@flag("max-request-bytes", default="1MiB", type=ByteSize(), help="Largest keyed request body (then 413).")
@flag("max-response-bytes", default="1MiB", type=ByteSize(),
      help="Largest response body kept for replay; larger ones are delivered but not kept.")  # fmt: skip
@flag("on-store-error", default="closed", type=click.Choice(["closed", "open"]),
      help="Redis fails: 503 (closed) or pass requests through unprotected (open).")  # fmt: skip
@flag("complete-retry", default=30.0, type=click.FloatRange(min=0), metavar="SECONDS",
      help="How long an outcome write that failed is retried, keeping the claim (0: not retried); "
           "shutdown waits for these writes.")  # fmt: skip
@flag("key", metavar="SOURCE",
      help="Where the key comes from: 'header:NAME' or 'json:PATH' (a field of a JSON body, e.g. "
           "'json:event.id'). Default: the --header-name header.")  # fmt: skip
@flag("replay-exclude-header", multiple=True, type=ListType(), callback=flatten, metavar="NAME",
      help="A response header neither stored nor replayed (e.g. set-cookie). Repeatable.")  # fmt: skip
@flag("config", metavar="FILE", type=click.Path(dir_okay=False),
      help="TOML file with these flags in snake_case and [[route]] tables (README: 'Routes'). "
           "Flags and variables beat it.")  # fmt: skip
@flag("log-level", default="info", type=click.Choice(LOG_LEVELS))
@flag("access-log/--no-access-log", default=False, help="Log every request.")
@click.pass_context
def proxy(ctx: click.Context, /, **kwargs: Any) -> None:
    """Reverse proxy that makes an upstream app idempotent.

    \b
    relay-idem proxy --upstream http://127.0.0.1:8000 --redis redis://127.0.0.1:6379/0

    Its own endpoints: GET /_relay/healthz, /_relay/readyz, /_relay/metrics.
    """
    config_file = kwargs.pop("config")
    if config_file is not None:
        from relay_idem import config_file as file

        file.apply(ctx, config_file, kwargs)
    if kwargs["upstream"] is None:
        raise click.UsageError("Missing option '--upstream' (or RELAY_IDEM_UPSTREAM): the URL of the app to proxy")
    run(**kwargs)


@cli.command()
@flag("host", default="127.0.0.1", help="Address to listen on.")
@flag("port", default=8000, type=click.IntRange(0, 65535), help="Port to listen on.")
@redis_flag("Keep records, messages and the dispatched count in Redis, shared by every demo process.")
@prefix_flag()
@flag("bare", is_flag=True, help="Serve the API without the middleware (an upstream or a baseline).")
@flag("log-level", default="info", type=click.Choice(LOG_LEVELS))
def demo(**kwargs: Any) -> None:
    """A sample message-sending API with relay-idem on /v1/messages.

    \b
    POST /v1/messages        {"to": "+5511999998888", "template": "lembrete_consulta"} -> 202
    GET  /v1/messages/{id}   the message, or 404
    GET  /v1/stats           {"dispatched": N}: messages really created
    """
    run_demo(**kwargs)


def record_options(command: F) -> F:
    decorators = [
        click.argument("key"),
        redis_flag("The Redis the proxy or app uses.  [required]"),
        prefix_flag(),
        flag("authorization", metavar="VALUE", help="The tenant, by the Authorization header it sends."),
        flag("scope", metavar="S", help="The tenant, by its scope id (the app's extensions['idempotency']['scope'])."),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


def record_target(key: str, redis: str | None, authorization: str | None, scope: str | None) -> tuple[str, str, str]:
    """(redis url, key, scope) for inspect and purge, or a usage error."""
    from relay_idem.records import tenant_scope

    if redis is None:
        raise click.UsageError("Missing option '--redis' (or RELAY_IDEM_REDIS): the Redis that holds the records")
    if authorization is not None and scope is not None:
        raise click.UsageError("give --authorization or --scope, not both")
    check_redis_url(redis)
    try:
        parsed = parse_key(key.encode())
    except InvalidKey as exc:
        raise click.BadParameter(str(exc), param_hint="KEY") from None
    return redis, parsed, tenant_scope(authorization, scope)


@cli.command()
@record_options
def inspect(key: str, redis: str | None, prefix: str, authorization: str | None, scope: str | None) -> None:
    """Show the record of KEY: state, status, age, TTL, body size."""
    from relay_idem.records import describe, find

    url, key, tenant = record_target(key, redis, authorization, scope)
    try:
        info, store_key = asyncio.run(find(url, prefix, tenant, key))
    except StoreUnavailable as exc:
        raise StartupError(f"Redis at {redact(url)} does not answer: {exc}") from None
    if info is None:
        raise StartupError(f"no record for key {key!r} in scope {tenant!r} (prefix {prefix!r})")
    click.echo(describe(key, tenant, store_key, info))


@cli.command()
@record_options
def purge(key: str, redis: str | None, prefix: str, authorization: str | None, scope: str | None) -> None:
    """Delete the record of KEY, so that the key executes again."""
    from relay_idem.records import remove

    url, key, tenant = record_target(key, redis, authorization, scope)
    try:
        removed = asyncio.run(remove(url, prefix, tenant, key))
    except StoreUnavailable as exc:
        raise StartupError(f"Redis at {redact(url)} does not answer: {exc}") from None
    if not removed:
        raise StartupError(f"no record for key {key!r} in scope {tenant!r} (prefix {prefix!r})")
    click.echo(f"purged key {key!r} in scope {tenant!r}: its next request executes again")


def error_line(exc: click.ClickException) -> str:
    message = exc.format_message()
    if isinstance(exc, click.UsageError) and exc.ctx is not None:
        return f"Error: {message} (see '{exc.ctx.command_path} --help')"
    return f"Error: {message}"


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: one line on stderr and a non-zero exit for every error, never a traceback."""
    try:
        code = cli.main(args=argv, prog_name="relay-idem", standalone_mode=False, auto_envvar_prefix=ENV_PREFIX)
    except NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message())
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(error_line(exc), err=True)
        sys.exit(exc.exit_code)
    except (ConfigError, StartupError) as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(EXIT_FAILURE)
    sys.exit(code if isinstance(code, int) else 0)
