"""The ``relay-idem`` command (SPEC §2): flags and their environment variables, errors, inspect and purge."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from click.testing import CliRunner

from relay_idem import RedisStore, __version__, authorization_scope
from relay_idem import cli as cli_module
from relay_idem.cli import cli, main
from relay_idem.config import WORKER_CONFIG_ENV, Config, ConfigError, open_store
from relay_idem.keys import record_key
from relay_idem.records import describe, tenant_scope
from relay_idem.store import MemoryStore
from relay_idem.store.base import Record, RecordInfo, StoredResponse
from tests.servers import free_port

CONSOLE_SCRIPT = Path(sys.executable).with_name("relay-idem")


@pytest.fixture
def captured_run() -> Iterator[mock.MagicMock]:
    with mock.patch.object(cli_module, "run") as run:
        yield run


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


# --- flags, environment variables, Config -------------------------------------------------------


def test_every_proxy_flag_reaches_a_config(captured_run: mock.MagicMock) -> None:
    result = invoke(
        "proxy", "--upstream", "http://app:8000", "--redis", "redis://r:6379/0", "--prefix", "p", "--host", "0.0.0.0",
        "--port", "9000", "--workers", "3", "--upstream-timeout", "5", "--upstream-client", "aiohttp",
        "--min-replicas", "1", "--min-replicas-timeout", "0.3", "--header-name", "X-Key", "--methods", "post,put",
        "--require-key", "/a*",
        "--require-key", "/b*,/c*", "--ttl", "60", "--lock-ttl", "3", "--on-conflict", "wait", "--wait-timeout", "2",
        "--on-mismatch", "replay", "--fingerprint", "json", "--fingerprint-header", "X-Tenant", "--scope-header",
        "X-Api-Key", "--max-waiters", "7", "--max-request-bytes", "2MiB", "--max-response-bytes", "512KiB",
        "--on-store-error", "open", "--complete-retry", "5", "--log-level", "debug", "--access-log", "--key",
        "json:event.id", "--replay-exclude-header", "set-cookie", "--replay-exclude-header", "x-a,x-b",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = Config(**captured_run.call_args.kwargs)
    assert config == Config(
        upstream="http://app:8000", redis="redis://r:6379/0", prefix="p", host="0.0.0.0", port=9000, workers=3,
        upstream_timeout=5.0, upstream_client="aiohttp", min_replicas=1,
        min_replicas_timeout=0.3, header_name="X-Key", methods=("post", "put"),
        require_key=("/a*", "/b*", "/c*"), ttl=60.0, lock_ttl=3.0, on_conflict="wait", wait_timeout=2.0,
        on_mismatch="replay", fingerprint="json", fingerprint_header=("X-Tenant",), scope_header="X-Api-Key",
        max_waiters=7, max_request_bytes=2 * 1024 * 1024, max_response_bytes=512 * 1024, on_store_error="open",
        complete_retry=5.0, log_level="debug", access_log=True, key="json:event.id",
        replay_exclude_header=("set-cookie", "x-a", "x-b"),
    )  # fmt: skip
    idempotency = config.idempotency()
    assert idempotency.methods == ("POST", "PUT")
    assert idempotency.complete_retry == 5.0
    assert idempotency.scope({"headers": [(b"x-api-key", b"k")]}) != "anonymous"


def test_defaults_match_the_middleware(captured_run: mock.MagicMock) -> None:
    assert invoke("proxy", "--upstream", "http://app:8000").exit_code == 0
    config = Config(**captured_run.call_args.kwargs)
    assert config == Config(upstream="http://app:8000")
    assert (config.host, config.port, config.workers, config.upstream_timeout) == ("127.0.0.1", 8080, 1, 60.0)
    idempotency = config.idempotency()
    assert idempotency.scope is authorization_scope
    assert (idempotency.max_request_bytes, idempotency.ttl, idempotency.methods) == (
        1024 * 1024,
        86400,
        ("POST", "PATCH"),
    )


def test_every_flag_has_an_environment_variable(captured_run: mock.MagicMock) -> None:
    env = {
        "RELAY_IDEM_UPSTREAM": "http://app:8000",
        "RELAY_IDEM_REDIS": "redis://r:6379/0",
        "RELAY_IDEM_WORKERS": "2",
        "RELAY_IDEM_REQUIRE_KEY": "/v1/messages*, /v1/orders*",
        "RELAY_IDEM_FINGERPRINT_HEADER": "X-A,X-B",
        "RELAY_IDEM_METHODS": "POST,PUT,PATCH",
        "RELAY_IDEM_TTL": "120",
        "RELAY_IDEM_ON_CONFLICT": "wait",
        "RELAY_IDEM_MAX_RESPONSE_BYTES": "2MiB",
        "RELAY_IDEM_ACCESS_LOG": "true",
        "RELAY_IDEM_SCOPE_HEADER": "X-Api-Key",
        "RELAY_IDEM_COMPLETE_RETRY": "2.5",
        "RELAY_IDEM_MAX_HEADER_BYTES": "16KiB",
        "RELAY_IDEM_HEADER_TIMEOUT": "5",
        "RELAY_IDEM_BODY_TIMEOUT": "6",
        "RELAY_IDEM_SEND_TIMEOUT": "7",
        "RELAY_IDEM_MAX_CONNECTIONS": "500",
    }
    assert invoke("proxy", env=env).exit_code == 0
    kwargs = captured_run.call_args.kwargs
    assert kwargs["upstream"] == "http://app:8000"
    assert kwargs["redis"] == "redis://r:6379/0"
    assert kwargs["workers"] == 2
    assert kwargs["require_key"] == ("/v1/messages*", "/v1/orders*")
    assert kwargs["fingerprint_header"] == ("X-A", "X-B")
    assert kwargs["methods"] == ("POST", "PUT", "PATCH")
    assert kwargs["ttl"] == 120.0
    assert kwargs["on_conflict"] == "wait"
    assert kwargs["max_response_bytes"] == 2 * 1024 * 1024
    assert kwargs["access_log"] is True
    assert kwargs["scope_header"] == "X-Api-Key"
    assert kwargs["complete_retry"] == 2.5
    assert kwargs["max_header_bytes"] == 16 * 1024
    assert (kwargs["header_timeout"], kwargs["body_timeout"], kwargs["send_timeout"]) == (5.0, 6.0, 7.0)
    assert kwargs["max_connections"] == 500


def test_a_flag_beats_its_environment_variable(captured_run: mock.MagicMock) -> None:
    invoke("proxy", "--upstream", "http://flag:1", env={"RELAY_IDEM_UPSTREAM": "http://env:1"})
    assert captured_run.call_args.kwargs["upstream"] == "http://flag:1"


def test_help_names_the_environment_variables() -> None:
    for command in ("proxy", "demo", "inspect", "purge"):
        result = invoke(command, "--help")
        assert result.exit_code == 0
        assert "RELAY_IDEM_REDIS" in result.output
    assert "RELAY_IDEM_REQUIRE_KEY" in invoke("proxy", "--help").output


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"relay-idem {__version__}\n"


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([])
    assert "proxy" in capsys.readouterr().out


def test_config_round_trips_through_json() -> None:
    config = Config(upstream="http://app:8000", redis="redis://r/0", workers=2, require_key=("/a*",), ttl=5.0)
    assert Config.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"upstream": "ftp://app"}, "http:// or https://"),
        ({"upstream": "http://app/?x=1"}, "query"),
        ({"upstream": "http://app:8000", "redis": "memcached://r"}, "--redis must be"),
        ({"upstream": "http://app:8000", "workers": 0}, "at least 1"),
        ({"upstream": "http://app:8000", "min_replicas": 1}, "needs --redis"),
        ({"upstream": "http://app:8000", "upstream_timeout": 0}, "positive"),
        ({"upstream": "http://app:8000", "header_timeout": 0}, "--header-timeout must be positive"),
        ({"upstream": "http://app:8000", "body_timeout": -1}, "--body-timeout must be positive"),
        ({"upstream": "http://app:8000", "send_timeout": 0}, "--send-timeout must be positive"),
        ({"upstream": "http://app:8000", "max_header_bytes": 100}, "--max-header-bytes must be at least 1024"),
        ({"upstream": "http://app:8000", "max_connections": 0}, "--max-connections must be at least 1"),
        ({"upstream": "http://app:8000", "redis": "redis://r", "min_replicas_timeout": 0.5}, "socket timeout"),
        ({"upstream": "http://app:8000", "ttl": -1}, "ttl must be positive"),
    ],
)
def test_config_refuses_what_cannot_work(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config(**options)


def test_open_store_passes_min_replicas_only_when_set() -> None:
    assert isinstance(open_store(None, prefix="p"), MemoryStore)
    with mock.patch.object(RedisStore, "from_url") as from_url:
        open_store("redis://r/0", prefix="p")
        open_store("redis://r/0", prefix="p", min_replicas=2)
        Config(upstream="http://app", redis="redis://r/0", min_replicas=1, min_replicas_timeout=0.3).open_store()
    assert from_url.call_args_list == [
        mock.call("redis://r/0", prefix="p"),
        mock.call("redis://r/0", prefix="p", min_replicas=2, min_replicas_timeout=0.4),
        mock.call("redis://r/0", prefix="relay-idem", min_replicas=1, min_replicas_timeout=0.3),
    ]


# --- run(): one process, or workers built from the environment -------------------------------------


def test_run_serves_one_worker_in_this_process(redis_url: str) -> None:
    with mock.patch("relay_idem.server.run_worker") as run_worker:
        cli_module.run(upstream="http://app:8000", redis=redis_url, port=9999, header_timeout=5.0)
    (config,) = run_worker.call_args.args
    assert config == Config(upstream="http://app:8000", redis=redis_url, port=9999, header_timeout=5.0)


def test_run_hands_workers_the_config_and_a_metrics_directory(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv(WORKER_CONFIG_ENV, raising=False)
    seen: dict[str, Any] = {}

    def fake_start_worker(sock: socket.socket) -> mock.Mock:
        # What a worker process finds: the parent's config, a metrics directory, a listening socket.
        seen.update(metrics_dir=os.environ["PROMETHEUS_MULTIPROC_DIR"], config=Config.from_environment())
        seen["listening"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        seen["inheritable"] = sock.get_inheritable()
        assert Path(seen["metrics_dir"]).is_dir()
        worker = mock.Mock()
        worker.poll.return_value = None
        seen.setdefault("workers", []).append(worker)
        if len(seen["workers"]) == 2:
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # as if the parent got SIGTERM now
        return worker

    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        with (
            mock.patch("relay_idem.server.start_worker", fake_start_worker),
            mock.patch("relay_idem.server.configure_logging"),
        ):
            cli_module.run(upstream="http://app:8000", redis=redis_url, workers=2, ttl=30.0, port=free_port())
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
    # Each worker was told to stop, and waited for.
    for worker in seen["workers"]:
        worker.send_signal.assert_called_once_with(signal.SIGTERM)
        worker.wait.assert_called_once_with()
    port = seen["config"].port
    assert seen["config"] == Config(upstream="http://app:8000", redis=redis_url, workers=2, ttl=30.0, port=port)
    assert (seen["listening"], seen["inheritable"]) == (1, True)
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    assert not Path(seen["metrics_dir"]).exists()


def test_workers_keep_a_metrics_directory_they_were_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with cli_module.multiprocess_metrics():
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path)
    assert tmp_path.is_dir()


def test_a_worker_without_a_parent_config_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WORKER_CONFIG_ENV, raising=False)
    with pytest.raises(RuntimeError, match="relay-idem proxy --workers"):
        Config.from_environment()


# --- bad input: one line, non-zero, no traceback ---------------------------------------------------


BAD_INPUT = {
    "no upstream": ["proxy"],
    "malformed upstream": ["proxy", "--upstream", "not-a-url"],
    "port out of range": ["proxy", "--upstream", "http://app:99999"],
    "unknown choice": ["proxy", "--upstream", "http://app:8000", "--on-conflict", "sometimes"],
    "memory store with workers": ["proxy", "--upstream", "http://app:8000", "--workers", "2"],
    "negative complete retry": ["proxy", "--upstream", "http://app:8000", "--complete-retry", "-1"],
    "bad size": ["proxy", "--upstream", "http://app:8000", "--max-request-bytes", "lots"],
    "bad redis url": ["proxy", "--upstream", "http://app:8000", "--redis", "localhost:6379"],
    "unknown command": ["serve"],
    "unknown flag": ["proxy", "--upstream", "http://app:8000", "--turbo"],
    "inspect without redis": ["inspect", "k"],
    "inspect with both tenants": ["inspect", "k", "--redis", "redis://r/0", "--authorization", "a", "--scope", "s"],
    "inspect a malformed key": ["inspect", '"unterminated', "--redis", "redis://r/0"],
}


@pytest.mark.parametrize("argv", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_one_line_and_a_non_zero_exit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    output = capsys.readouterr()
    assert exit_info.value.code not in (0, None)
    assert output.out == ""
    assert len(output.err.strip().splitlines()) == 1, output.err
    assert output.err.startswith("Error: ")


def test_unreachable_redis_at_start_up_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://user:hunter2@127.0.0.1:{free_port()}/0"
    with pytest.raises(SystemExit) as exit_info:
        main(["proxy", "--upstream", "http://app:8000", "--redis", url])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err.startswith("Error: Redis at redis://user:***@127.0.0.1:")
    assert "hunter2" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_console_script_fails_in_one_line_without_a_traceback() -> None:
    cases = [
        ["proxy"],
        ["proxy", "--upstream", "not-a-url"],
        ["proxy", "--upstream", "http://app:8000", "--on-conflict", "sometimes"],
        ["proxy", "--upstream", "http://app:8000", "--workers", "2"],
        ["proxy", "--upstream", "http://app:8000", "--redis", f"redis://127.0.0.1:{free_port()}/0"],
        ["demo", "--redis", f"redis://127.0.0.1:{free_port()}/0"],
    ]
    processes = [
        subprocess.Popen([str(CONSOLE_SCRIPT), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for argv in cases
    ]
    for argv, process in zip(cases, processes, strict=True):
        out, err = process.communicate(timeout=30)
        assert process.returncode != 0, argv
        assert out == ""
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, (argv, err)


# --- inspect and purge -------------------------------------------------------------------------------


def store_record(redis_url: str, prefix: str, scope: str, key: str, response: StoredResponse | None) -> None:
    async def write() -> None:
        store = RedisStore.from_url(redis_url, prefix=prefix)
        try:
            store_key = record_key(prefix, scope, key)
            claim = await store.begin(store_key, b"fingerprint", 30)
            assert claim.token is not None
            if response is not None:
                await store.complete(
                    store_key, claim.token, Record(b"fingerprint", claim.record.created_at, response), 600
                )
        finally:
            await store.close()

    asyncio.run(write())


def run_cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    output = capsys.readouterr()
    return int(exit_info.value.code or 0), output.out, output.err


def test_inspect_and_purge_a_completed_record(redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    tenant = authorization_scope({"headers": [(b"authorization", b"Bearer sk_live_1")]})
    body = b'{"id": "msg_1", "status": "queued"}'
    store_record(redis_url, prefix, tenant, "pedido-42-lembrete", StoredResponse(202, ((b"a", b"b"),), body))
    tenant_flags = ("--redis", redis_url, "--prefix", prefix, "--authorization", "Bearer sk_live_1")

    code, out, _ = run_cli("inspect", "pedido-42-lembrete", *tenant_flags, capsys=capsys)
    assert code == 0
    lines = dict(line.split(None, 1) for line in out.replace("redis key", "redis_key").splitlines())
    assert lines["state"] == "completed"
    assert lines["status"] == "202"
    assert lines["body"] == f"{len(body)} bytes"
    assert lines["scope"] == tenant
    assert float(lines["age"].split()[0]) < 60
    assert re.fullmatch(r"9m 5\ds|10m 00s", lines["ttl"])

    code, _, err = run_cli("inspect", "pedido-42-lembrete", "--redis", redis_url, "--prefix", prefix, capsys=capsys)
    assert code == 1
    assert "no record" in err  # the anonymous scope is another tenant

    code, out, _ = run_cli("purge", "pedido-42-lembrete", *tenant_flags, capsys=capsys)
    assert code == 0
    assert "purged" in out
    code, _, err = run_cli("inspect", "pedido-42-lembrete", *tenant_flags, capsys=capsys)
    assert code == 1
    assert err.startswith("Error: no record for key 'pedido-42-lembrete'")
    code, _, _ = run_cli("purge", "pedido-42-lembrete", *tenant_flags, capsys=capsys)
    assert code == 1


def test_inspect_an_in_progress_record_by_raw_scope(
    redis_url: str, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store_record(redis_url, prefix, "tenant-7", "quoted", None)
    # A key given as an sf-string is unquoted, as the middleware does.
    code, out, _ = run_cli("inspect", '"quoted"', "--redis", redis_url, "--prefix", prefix, "--scope", "tenant-7",
                           capsys=capsys)  # fmt: skip
    assert code == 0
    assert "in_progress" in out
    assert "still running" in out


def test_inspect_with_redis_down_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli("inspect", "k", "--redis", f"redis://127.0.0.1:{free_port()}/0", capsys=capsys)
    assert code == 1
    assert err.startswith("Error: Redis at")
    assert len(err.strip().splitlines()) == 1


def test_describe_reads_well() -> None:
    tombstone = RecordInfo(Record(b"f", 1000.0, StoredResponse(200, (), b"", body_omitted=True)), ttl=7300.0)
    text = describe("k", "anonymous", "relay-idem:abc", tombstone, now=1000.0 + 3 * 60 + 5)
    assert text.splitlines() == [
        "key        k",
        "scope      anonymous",
        "redis key  relay-idem:abc",
        "state      completed",
        "age        3m 05s",
        "ttl        2h 01m 40s",
        "status     200",
        "body       not retained (over max_response_bytes, or the response broke off)",
        "headers    0",
    ]
    no_expiry = RecordInfo(Record(b"f", 1000.0), ttl=None)
    assert "ttl        none" in describe("k", "s", "p:x", no_expiry, now=1001.5)
    assert "age        1.5 s" in describe("k", "s", "p:x", no_expiry, now=1001.5)


def test_tenant_scope_matches_the_middleware() -> None:
    assert tenant_scope(None, None) == "anonymous"
    assert tenant_scope(None, "raw") == "raw"
    assert tenant_scope("Bearer x", None) == authorization_scope({"headers": [(b"authorization", b"Bearer x")]})


def test_sentinel_urls_take_only_sentinel_credentials_as_parameters_and_errors_hide_them() -> None:
    with pytest.raises(ValueError, match="unknown parameter 'db'"):
        RedisStore.from_url("redis+sentinel://127.0.0.1:26379/relay?db=2")
    url = "redis+sentinel://u:data@127.0.0.1:26379/relay?sentinel_username=s&sentinel_password=secret"
    assert cli_module.redact(url) == (
        "redis+sentinel://u:***@127.0.0.1:26379/relay?sentinel_username=s&sentinel_password=***"
    )
