"""``relay-idem proxy --config FILE`` (SPEC §8.1): flags and routes from TOML; flag > env > file > default."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from click.testing import CliRunner

from relay_idem import RoutePolicy
from relay_idem import cli as cli_module
from relay_idem.cli import cli, main
from relay_idem.config import Config

FILE = """
upstream = "http://app:8000"
redis = "redis://r:6379/0"
ttl = 3600
lock_ttl = 2.5
on_conflict = "wait"
methods = ["post", "put"]
require_key = ["/v1/*"]
max_request_bytes = "2MiB"
replay_exclude_header = ["set-cookie"]
access_log = true

[[route]]
path = "/webhooks/github"
key = "header:X-GitHub-Delivery"
require_key = true

[[route]]
path = "/webhooks/shop"
key = "json:event.id"
methods = ["POST"]
ttl = 60
max_request_bytes = "64KiB"
fingerprint_headers = ["x-shop"]

[[route]]
path = "/v1/exports*"
enabled = false
"""


@pytest.fixture
def captured_run() -> Any:
    with mock.patch.object(cli_module, "run") as run:
        yield run


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return str(path)


def test_the_file_sets_flags_and_routes(tmp_path: Path, captured_run: mock.MagicMock) -> None:
    result = CliRunner().invoke(cli, ["proxy", "--config", write(tmp_path, FILE)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = Config(**captured_run.call_args.kwargs)
    assert (config.upstream, config.redis, config.ttl, config.lock_ttl, config.on_conflict) == (
        "http://app:8000", "redis://r:6379/0", 3600, 2.5, "wait",
    )  # fmt: skip
    assert (config.methods, config.require_key, config.max_request_bytes) == (("post", "put"), ("/v1/*",), 2 << 20)
    assert (config.replay_exclude_header, config.access_log) == (("set-cookie",), True)
    assert config.idempotency().routes == (
        RoutePolicy("/webhooks/github", key="header:X-GitHub-Delivery", require_key=True),
        RoutePolicy(
            "/webhooks/shop", key="json:event.id", methods=["POST"], ttl=60, max_request_bytes=64 << 10,
            fingerprint_headers=["x-shop"],
        ),
        RoutePolicy("/v1/exports*", enabled=False),
    )  # fmt: skip
    # Routes travel to --workers processes with the rest of the config.
    assert Config.from_json(config.to_json()).idempotency().routes == config.idempotency().routes


def test_flags_and_environment_variables_beat_the_file(tmp_path: Path, captured_run: mock.MagicMock) -> None:
    path = write(tmp_path, FILE)
    env = {"RELAY_IDEM_CONFIG": path, "RELAY_IDEM_ON_CONFLICT": "reject", "RELAY_IDEM_REQUIRE_KEY": "/env/*"}
    args = ["proxy", "--ttl", "5", "--upstream", "http://flag:1"]
    result = CliRunner().invoke(cli, args, env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = Config(**captured_run.call_args.kwargs)
    assert (config.ttl, config.upstream) == (5, "http://flag:1")  # flags
    assert (config.on_conflict, config.require_key) == ("reject", ("/env/*",))  # variables
    assert (config.lock_ttl, config.redis) == (2.5, "redis://r:6379/0")  # the file
    assert config.wait_timeout == 10  # the default


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("ttl = 60\nbogus = 1\n", "unknown key 'bogus'"),
        ("ttl = 'long'\n", "ttl must be a number"),
        ("ttl = true\n", "ttl must be a number"),
        ("workers = 1.5\n", "workers must be an integer"),
        ("workers = 0\n", "workers: 0 is not in the range"),
        ("require_key = '/v1/*'\n", "require_key must be a list of strings"),
        ("on_conflict = 'queue'\n", "on_conflict: 'queue' is not one of"),
        ("access_log = 'yes'\n", "access_log must be true or false"),
        ("max_request_bytes = '1 lot'\n", "max_request_bytes: '1 lot' is not a size"),
        ("config = 'other.toml'\n", "unknown key 'config'"),
        ("ttl = \n", "not valid TOML"),
        ("route = 1\n", "route must be an array of tables"),
        ("[[route]]\nkey = 'header:X'\n", "route[0] has no path"),
        ("[[route]]\npath = '/a'\n[[route]]\npath = '/b'\nbogus = 1\n", "unknown key route[1].bogus"),
        ("[[route]]\npath = '/a'\nttl = 'soon'\n", "route[0].ttl must be a number"),
        ("[[route]]\npath = '/a'\nrequire_key = 'yes'\n", "route[0].require_key must be true or false"),
        ("[[route]]\npath = '/a'\non_conflict = 'queue'\n", "route[0].on_conflict: 'queue' is not one of"),
        ("[[route]]\npath = '/a'\nkey = 'cookie:x'\n", "route[0]: route '/a': key must be"),
        ("[[route]]\npath = 'a*'\n", "route[0]: a route's path pattern must start with '/'"),
        ("[[route]]\npath = '/a'\nfinal_status = 'x'\n", "unknown key route[0].final_status"),
    ],
)
def test_a_bad_file_is_one_line_naming_file_and_key_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, named: str
) -> None:
    path = write(tmp_path, text)
    with mock.patch.object(cli_module, "run") as run, pytest.raises(SystemExit) as exited:
        main(["proxy", "--upstream", "http://app:8000", "--config", path])
    assert exited.value.code == 2
    assert not run.called
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"Error: {path}: ") and named in lines[0], lines[0]


def test_an_unreadable_file_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "missing.toml")
    with pytest.raises(SystemExit) as exited:
        main(["proxy", "--upstream", "http://app:8000", "--config", missing])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"Error: {missing}: cannot read the config file: No such file or directory"
    ]
